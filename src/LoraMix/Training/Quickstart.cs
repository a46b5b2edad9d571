using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Torch;

namespace LoraMix.Training;

/// <summary>What <see cref="Quickstart.Run"/> trains and where it writes (defaults: a LoRA adapter, r = 16 on every linear
/// layer, 150 steps of 16 sequences on the first held-out task family).</summary>
public sealed record QuickstartOptions
{
    /// <summary>The base model directory (the embedded <c>models/loramix-tiny</c> in the CLI).</summary>
    public required string ModelDir { get; init; }
    /// <summary>Where the adapter, metrics.jsonl, loss.png and eval_results.json go (replaced if present).</summary>
    public string OutputDir { get; init; } = Path.Combine("out", "quickstart-lora");
    /// <summary>The adapter method; <c>lora</c> is the one this release has.</summary>
    public string Method { get; init; } = "lora";
    /// <summary>The task family to learn; the default is one the embedded model never saw.</summary>
    public string Family { get; init; } = TaskWorld.HeldOutFamilies[0];
    public int Steps { get; init; } = 150;
    public int BatchSize { get; init; } = 16;
    public double LearningRate { get; init; } = 2e-3;
    public int Rank { get; init; } = 16;
    /// <summary>Test-split examples scored before and after training.</summary>
    public int EvalExamples { get; init; } = 64;
    public long Seed { get; init; } = 42;
    public string Device { get; init; } = "cpu";
    public int MaxNewTokens { get; init; } = 64;

    /// <summary>The scored examples: <see cref="EvalExamples"/> of <see cref="Family"/> from the test split (inputs disjoint
    /// from training), instruction in system or user half and half.</summary>
    public TaskWorldSource EvalSource => new([Family], EvalExamples, Seed: 1, TaskSplit.Test, Placement: null);

    /// <summary>The training examples: <see cref="Steps"/> x <see cref="BatchSize"/> of <see cref="Family"/> from the train split.</summary>
    public TaskWorldSource TrainSource => new([Family], Steps * BatchSize, Seed: 0, TaskSplit.Train, Placement: null);

    /// <summary>Valid method names.</summary>
    public static IReadOnlyList<string> Methods { get; } = ["lora"];
}

/// <summary>The outcome of <see cref="Quickstart.Run"/>.</summary>
/// <param name="Method">The adapter method.</param>
/// <param name="Family">The task family learned.</param>
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
public sealed record QuickstartResult(string Method, string Family, string ModelDir, string AdapterDir, ExactMatchReport Before,
    ExactMatchReport After, ExactMatchSample Example, string ExampleBefore, int Steps, int TrainExamples, double? FinalLoss,
    double TrainSeconds, double Seconds, string MetricsPath, string LossPlotPath)
{
    /// <summary>The summary as one JSON object (fractions for exact match).</summary>
    public JsonObject ToJson() => new()
    {
        ["method"] = Method,
        ["family"] = Family,
        ["before_exact_match"] = Math.Round(Before.Accuracy, 4),
        ["after_exact_match"] = Math.Round(After.Accuracy, 4),
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
            ["input"] = Example.Record.PromptMessages[^1].Content,
            ["expected"] = Example.Record.ExpectedAnswer,
            ["before"] = ExampleBefore,
            ["after"] = Example.Output,
        },
    };
}

/// <summary>
/// The README's first run: score the base model on a task family it never saw (test split), train an adapter on that
/// family's train split through <see cref="TrainingRecipe"/> (the same path as <c>loramix train</c>), and score again
/// through the one <see cref="ChatEngine"/>.
/// </summary>
public static class Quickstart
{
    public static QuickstartResult Run(QuickstartOptions o, ITrainingProgress? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(o);
        progress ??= TrainingProgress.None;
        if (!QuickstartOptions.Methods.Contains(o.Method))
            throw new ArgumentException($"quickstart: unknown method '{o.Method}'; expected one of: {string.Join(", ", QuickstartOptions.Methods)}");
        if (!TaskWorld.Families.Contains(o.Family))
            throw new ArgumentException($"quickstart: unknown task family '{o.Family}'; expected one of: {string.Join(", ", TaskWorld.Families)}");
        if (o.Steps < 1 || o.BatchSize < 1 || o.EvalExamples < 1 || o.Rank < 1)
            throw new ArgumentException($"quickstart: steps, batch size, rank and eval examples must be positive (got {o.Steps}, {o.BatchSize}, {o.Rank}, {o.EvalExamples})");
        if (!File.Exists(Path.Combine(o.ModelDir, "config.json")))
            throw new LoraMixException($"quickstart: '{Path.GetFullPath(o.ModelDir)}' is not a model directory (no config.json)");

        var total = Stopwatch.StartNew();
        TorchRuntime.EnsureLoaded();
        var device = TorchRuntime.ParseDevice(o.Device);
        var evalSource = o.EvalSource;
        var trainSource = o.TrainSource;
        var evalRecords = evalSource.Records();

        // ---- before: the base model alone
        progress.Info($"scoring the base model on {evalRecords.Count} held-out '{o.Family}' examples (test split)...");
        ExactMatchReport before;
        using (var engine = ChatEngine.Load(o.ModelDir, new EngineOptions { Device = device }))
            before = ExactMatchEvaluator.Evaluate(engine, evalRecords, o.MaxNewTokens, cancellationToken: cancellationToken);
        progress.Info(string.Create(CultureInfo.InvariantCulture, $"before: exact match {before.Accuracy:P1} ({before.Correct}/{before.Total})"));

        // ---- train through the recipe (the adapter is scored after training on the same records)
        var recipe = new TrainingRecipe
        {
            Source = "quickstart",
            ModelPath = o.ModelDir,
            Method = RecipeMethod.Lora,
            Lora = new LoraConfig { R = o.Rank, LoraAlpha = 2 * o.Rank, AllLinear = true, TargetModules = null },
            Dataset = new DatasetSpec([], trainSource),
            EvalDataset = new DatasetSpec([], evalSource),
            EvalExactMatch = true,
            EvalMaxNewTokens = o.MaxNewTokens,
            Device = o.Device,
            Trainer = new TrainingOptions
            {
                LearningRate = o.LearningRate, LrScheduler = "cosine", WarmupSteps = Math.Min(10, o.Steps / 10), MaxSteps = o.Steps,
                BatchSize = o.BatchSize, CutoffLen = 256, Seed = o.Seed, LoggingSteps = 10, EvalSteps = Math.Max(1, o.Steps / 3),
                OutputDir = o.OutputDir, OverwriteOutputDir = true,
            },
        };
        var result = recipe.Run(progress, cancellationToken);
        var after = result.ExactMatch ?? throw new InvalidOperationException("quickstart: the recipe did not score the adapter");

        // an example: the first one the base got wrong (the lists are in the same order: same records, same filter)
        int pick = Enumerable.Range(0, before.Samples.Count).FirstOrDefault(i => !before.Samples[i].Correct);
        return new QuickstartResult(o.Method, o.Family, Path.GetFullPath(o.ModelDir), result.AdapterDir!, before, after, after.Samples[pick],
            before.Samples[pick].Output, result.Training.GlobalStep, result.TrainExamples, result.Training.Steps.Count > 0 ? result.Training.Steps[^1].Loss : null,
            result.Training.Seconds, total.Elapsed.TotalSeconds, result.MetricsPath, result.LossPlotPath);
    }
}
