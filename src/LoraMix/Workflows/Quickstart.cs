using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Torch;
using LoraMix.Training;

namespace LoraMix.Workflows;

/// <summary>What <see cref="Quickstart.Run"/> trains and where it writes. Defaults per method: <c>mixlora</c> (the default) — 4
/// experts, top-2, r = 16 on all seven projections, 1,500 steps of 16 sequences over the short-answer held-out families at once
/// (<see cref="TaskWorld.ShortAnswerHeldOutFamilies"/>); <c>lora</c> — r = 16 on every linear layer, 250 steps on the first held-out
/// family (last_word).</summary>
public sealed record QuickstartOptions
{
    /// <summary>The base model directory (the embedded <c>models/loramix-tiny</c> in the CLI).</summary>
    public required string ModelDir { get; init; }
    /// <summary>Where the adapter, metrics.jsonl, loss.png and eval_results.json go (replaced if present); null for
    /// <c>out/quickstart-METHOD</c>.</summary>
    public string? OutputDir { get; init; }
    /// <summary>The adapter method: <c>mixlora</c> (default) or <c>lora</c>.</summary>
    public string Method { get; init; } = DefaultMethod;

    /// <summary>The method a run uses unless told otherwise.</summary>
    public const string DefaultMethod = "mixlora";

    /// <summary>Default optimizer steps of the MixLoRA run (three families at once).</summary>
    public const int DefaultMixLoraSteps = 1500;

    /// <summary>Default optimizer steps of the LoRA run (one family).</summary>
    public const int DefaultLoraSteps = 250;
    /// <summary>The task families to learn; null for the method's default (families the embedded model never saw).</summary>
    public IReadOnlyList<string>? Families { get; init; }
    /// <summary>Optimizer steps; null for the method's default.</summary>
    public int? Steps { get; init; }
    public int BatchSize { get; init; } = 16;
    public double LearningRate { get; init; } = 2e-3;
    public int Rank { get; init; } = 16;
    /// <summary>Experts per MixLoRA layer.</summary>
    public int NumExperts { get; init; } = 4;
    /// <summary>Test-split examples per family scored before and after training.</summary>
    public int EvalExamples { get; init; } = 64;
    public long Seed { get; init; } = 42;
    public string Device { get; init; } = "cpu";
    public int MaxNewTokens { get; init; } = 64;

    /// <summary>The families trained and scored.</summary>
    public IReadOnlyList<string> EffectiveFamilies => Families is { Count: > 0 } f ? f
        : Method == "mixlora" ? TaskWorld.ShortAnswerHeldOutFamilies : [TaskWorld.HeldOutFamilies[0]];

    /// <summary>The optimizer steps taken.</summary>
    public int EffectiveSteps => Steps ?? (Method == "mixlora" ? DefaultMixLoraSteps : DefaultLoraSteps);

    /// <summary>The output directory.</summary>
    public string EffectiveOutputDir => OutputDir ?? Path.Combine("out", $"quickstart-{Method}");

    /// <summary>The scored examples: <see cref="EvalExamples"/> per family from the test split (inputs disjoint from
    /// training), instruction in system or user half and half.</summary>
    public TaskWorldSource EvalSource => new(EffectiveFamilies, EvalExamples * EffectiveFamilies.Count, Seed: 1, TaskSplit.Test, Placement: null);

    /// <summary>The training examples: steps x batch size from the train split, families round-robin.</summary>
    public TaskWorldSource TrainSource => new(EffectiveFamilies, EffectiveSteps * BatchSize, Seed: 0, TaskSplit.Train, Placement: null);

    /// <summary>Valid method names.</summary>
    public static IReadOnlyList<string> Methods { get; } = ["mixlora", "lora"];
}

/// <summary>The outcome of <see cref="Quickstart.Run"/>.</summary>
/// <param name="Method">The adapter method.</param>
/// <param name="Families">The task families learned.</param>
/// <param name="ModelDir">The base model (full path).</param>
/// <param name="AdapterDir">The trained adapter (full path).</param>
/// <param name="Before">Exact match of the base model on the test examples.</param>
/// <param name="After">Exact match of base + adapter on the same examples.</param>
/// <param name="Example">One test example after training (the first the base got wrong, if any).</param>
/// <param name="ExampleBefore">The base model's output on the same example.</param>
/// <param name="Steps">Optimizer steps taken.</param>
/// <param name="TrainExamples">Training sequences.</param>
/// <param name="FinalLoss">The last step's training loss.</param>
/// <param name="TrainSeconds">Training wall time.</param>
/// <param name="Seconds">Wall time of the whole run (both evaluations included).</param>
/// <param name="MetricsPath">metrics.jsonl.</param>
/// <param name="LossPlotPath">loss.png.</param>
/// <param name="Specialisation">MixLoRA: per layer, how expert choice depends on the family (answer tokens); else null.</param>
/// <param name="ExpertLoadPlotPath">MixLoRA: the per-family expert-load heatmap; else null.</param>
public sealed record QuickstartResult(string Method, IReadOnlyList<string> Families, string ModelDir, string AdapterDir, ExactMatchReport Before,
    ExactMatchReport After, ExactMatchSample Example, string ExampleBefore, int Steps, int TrainExamples, double? FinalLoss,
    double TrainSeconds, double Seconds, string MetricsPath, string LossPlotPath, IReadOnlyList<LayerSpecialisation>? Specialisation = null,
    string? ExpertLoadPlotPath = null)
{
    /// <summary>The summary as one JSON object (fractions for exact match).</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["method"] = Method,
            ["families"] = new JsonArray([.. Families.Select(f => (JsonNode)JsonValue.Create(f)!)]),
            ["before_exact_match"] = Math.Round(Before.Accuracy, 4),
            ["after_exact_match"] = Math.Round(After.Accuracy, 4),
            ["before_exact_match_by_family"] = ByFamily(Before),
            ["after_exact_match_by_family"] = ByFamily(After),
            ["eval_examples"] = After.Total,
            ["seconds"] = Math.Round(Seconds, 1),
            ["train_seconds"] = Math.Round(TrainSeconds, 1),
            ["steps"] = Steps,
            ["train_examples"] = TrainExamples,
            ["final_train_loss"] = FinalLoss is double l && double.IsFinite(l) ? Math.Round(l, 5) : null,
            ["model_dir"] = ModelDir,
            ["adapter_dir"] = AdapterDir,
            ["metrics"] = MetricsPath,
            ["loss_plot"] = LossPlotPath,
            ["example"] = new JsonObject
            {
                ["family"] = Example.Record.Family,
                ["input"] = Example.Record.PromptMessages[^1].Content,
                ["expected"] = Example.Record.ExpectedAnswer,
                ["before"] = ExampleBefore,
                ["after"] = Example.Output,
            },
        };
        if (Specialisation is not null)
        {
            o["expert_specialisation"] = new JsonArray([.. Specialisation.Select(s => (JsonNode)new JsonObject
            {
                ["layer"] = s.Layer,
                ["tokens"] = s.Tokens,
                ["mutual_information_bits"] = Math.Round(s.MutualInformationBits, 4),
                ["max_bits"] = Math.Round(s.MaxBits, 4),
                ["expert_load_by_family"] = new JsonObject(s.LoadByFamily.Select(kv => KeyValuePair.Create(kv.Key,
                    (JsonNode?)new JsonArray([.. kv.Value.Select(v => (JsonNode)JsonValue.Create(Math.Round(v, 4))!)])))),
            })]);
            o["expert_load_plot"] = ExpertLoadPlotPath;
        }
        return o;
    }

    private static JsonObject ByFamily(ExactMatchReport r) =>
        new(r.AccuracyByFamily.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(Math.Round(kv.Value, 4)))));
}

/// <summary>
/// The README's first run: score the base model on task families it never saw (test split), train an adapter on those
/// families' train split through <see cref="TrainingRecipe"/> (the same path as <c>loramix train</c>), and score again
/// through the one <see cref="ChatEngine"/>; for MixLoRA also measure whether experts specialise by family.
/// </summary>
public static class Quickstart
{
    /// <summary>The per-family expert-load heatmap's file name (MixLoRA).</summary>
    public const string ExpertLoadPlotFile = "expert_load.png";

    public static QuickstartResult Run(QuickstartOptions o, ITrainingProgress? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(o);
        progress ??= TrainingProgress.None;
        if (!QuickstartOptions.Methods.Contains(o.Method))
            throw new ArgumentException($"quickstart: unknown method '{o.Method}'; expected one of: {string.Join(", ", QuickstartOptions.Methods)}");
        var families = o.EffectiveFamilies;
        foreach (var f in families)
            if (!TaskWorld.Families.Contains(f))
                throw new ArgumentException($"quickstart: unknown task family '{f}'; expected one of: {string.Join(", ", TaskWorld.Families)}");
        int steps = o.EffectiveSteps;
        if (steps < 1 || o.BatchSize < 1 || o.EvalExamples < 1 || o.Rank < 1 || o.NumExperts < 2)
            throw new ArgumentException($"quickstart: steps, batch size, rank and eval examples must be positive and experts at least 2 " +
                                        $"(got {steps}, {o.BatchSize}, {o.Rank}, {o.EvalExamples}, {o.NumExperts})");
        if (!File.Exists(Path.Combine(o.ModelDir, "config.json")))
            throw new LoraMixException($"quickstart: '{Path.GetFullPath(o.ModelDir)}' is not a model directory (no config.json)");

        var total = Stopwatch.StartNew();
        TorchRuntime.EnsureLoaded();
        var device = TorchRuntime.ParseDevice(o.Device);
        var evalSource = o.EvalSource;
        var evalRecords = evalSource.Records();
        string familyText = string.Join(", ", families.Select(f => $"'{f}'"));

        // ---- before: the base model alone
        progress.Info($"scoring the base model on {evalRecords.Count} held-out {familyText} examples (test split)...");
        ExactMatchReport before;
        using (var engine = ChatEngine.Load(o.ModelDir, new EngineOptions { Device = device }))
            before = ExactMatchEvaluator.Evaluate(engine, evalRecords, o.MaxNewTokens, cancellationToken: cancellationToken);
        progress.Info(string.Create(CultureInfo.InvariantCulture, $"before: exact match {before.Accuracy:P1} ({before.Correct}/{before.Total})"));

        // ---- train through the recipe (the adapter is scored after training on the same records)
        bool mix = o.Method == "mixlora";
        var recipe = new TrainingRecipe
        {
            Source = "quickstart",
            ModelPath = o.ModelDir,
            Method = mix ? RecipeMethod.MixLora : RecipeMethod.Lora,
            Lora = mix ? null : new LoraConfig { R = o.Rank, LoraAlpha = 2 * o.Rank, AllLinear = true, TargetModules = null, BaseModelNameOrPath = o.ModelDir },
            MixLora = mix
                ? new MixLoraConfig
                {
                    NumExperts = o.NumExperts, TopK = 2, R = o.Rank, LoraAlpha = 2 * o.Rank, LoraDropout = 0, RouterAuxLossCoef = 0.01,
                    RouterZLossCoef = 0.001, BaseModelNameOrPath = o.ModelDir,
                }
                : null,
            Dataset = new DatasetSpec([], o.TrainSource),
            EvalDataset = new DatasetSpec([], evalSource),
            EvalExactMatch = true,
            EvalMaxNewTokens = o.MaxNewTokens,
            Device = o.Device,
            Trainer = new TrainingOptions
            {
                LearningRate = o.LearningRate, LrScheduler = "cosine", WarmupSteps = Math.Min(20, steps / 10), MaxSteps = steps,
                BatchSize = o.BatchSize, CutoffLen = 256, Seed = o.Seed, LoggingSteps = 10, EvalSteps = Math.Max(1, (int)Math.Ceiling(steps / 5.0)),
                OutputDir = o.EffectiveOutputDir, OverwriteOutputDir = true,
            },
        };
        var result = recipe.Run(progress, cancellationToken);
        var after = result.ExactMatch ?? throw new InvalidOperationException("quickstart: the recipe did not score the adapter");

        // ---- MixLoRA: do experts specialise by task?
        IReadOnlyList<LayerSpecialisation>? specialisation = null;
        string? plot = null;
        if (mix)
        {
            using var engine = ChatEngine.Load(o.ModelDir, new EngineOptions { Device = device, Adapters = [result.AdapterDir!] });
            specialisation = ExpertSpecialisation.Measure(engine, evalRecords, o.NumExperts, cancellationToken);
            plot = Path.Combine(result.OutputDir, ExpertLoadPlotFile);
            ExpertSpecialisation.WriteHeatmap(plot, specialisation);
            progress.Info("expert specialisation, I(family; top expert) on answer tokens: " + string.Join(", ", specialisation.Select(s =>
                string.Create(CultureInfo.InvariantCulture, $"layer {s.Layer} {s.MutualInformationBits:F2}/{s.MaxBits:F2} bits"))));
        }

        // an example: the first one the base got wrong (the lists are in the same order: same records, same filter)
        int pick = Enumerable.Range(0, before.Samples.Count).FirstOrDefault(i => !before.Samples[i].Correct);
        return new QuickstartResult(o.Method, families, Path.GetFullPath(o.ModelDir), result.AdapterDir!, before, after, after.Samples[pick],
            before.Samples[pick].Output, result.Training.GlobalStep, result.TrainExamples, result.Training.Steps.Count > 0 ? result.Training.Steps[^1].Loss : null,
            result.Training.Seconds, total.Elapsed.TotalSeconds, result.MetricsPath, result.LossPlotPath, specialisation, plot);
    }
}
