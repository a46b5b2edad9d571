using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Torch;
using LoraMix.Training;

namespace LoraMix.Workflows;

/// <summary>What <see cref="XLoraQuickstart.Run"/> trains: one LoRA expert per family (reused when an earlier run trained it
/// with the same settings), then an X-LoRA head over them on the families mixed.</summary>
public sealed record XLoraQuickstartOptions
{
    /// <summary>The base model directory.</summary>
    public required string ModelDir { get; init; }
    /// <summary>Output directory (default <c>out/quickstart-xlora</c>): <c>experts/&lt;family&gt;</c>, <c>xlora/</c>, plots.</summary>
    public string? OutputDir { get; init; }
    /// <summary>The families (default <see cref="DefaultFamilies"/>).</summary>
    public IReadOnlyList<string>? Families { get; init; }
    /// <summary>Optimizer steps per LoRA expert.</summary>
    public int ExpertSteps { get; init; } = 250;
    /// <summary>Optimizer steps of the X-LoRA head.</summary>
    public int HeadSteps { get; init; } = 200;
    public int BatchSize { get; init; } = 16;
    public double ExpertLearningRate { get; init; } = 2e-3;
    public double HeadLearningRate { get; init; } = 3e-3;
    public int Rank { get; init; } = 16;
    /// <summary>Test-split examples per family scored for every variant.</summary>
    public int EvalExamples { get; init; } = 64;
    public long Seed { get; init; } = 42;
    public string Device { get; init; } = "cpu";
    public int MaxNewTokens { get; init; } = 32;
    /// <summary>Reuse experts an earlier run trained with the same settings (default true).</summary>
    public bool ReuseExperts { get; init; } = true;

    public IReadOnlyList<string> EffectiveFamilies => Families is { Count: > 0 } f ? f : DefaultFamilies;

    /// <summary>last_word and second_word: the held-out families the embedded model learns to about 85 % with one LoRA in about a
    /// minute each (last_letter reached 52 % in the same budget, docs/BENCHMARKS.md).</summary>
    public static IReadOnlyList<string> DefaultFamilies { get; } = ["last_word", "second_word"];

    /// <summary>The head's router policy (default privileged, snapshot last: the scalings of every token from the first
    /// untrusted one on come from the instruction; measured better than free on these families, docs/BENCHMARKS.md).</summary>
    public string RouterPolicy { get; init; } = MixLoraConfig.PrivilegedPolicy;
    public string EffectiveOutputDir => OutputDir ?? Path.Combine("out", "quickstart-xlora");
}

/// <summary>One variant's exact match (per family and on the mixture).</summary>
public sealed record XLoraVariantScore(string Name, ExactMatchReport Report);

/// <summary>The outcome of <see cref="XLoraQuickstart.Run"/>.</summary>
public sealed record XLoraQuickstartResult(IReadOnlyList<string> Families, string ModelDir, string XLoraDir, IReadOnlyList<string> ExpertDirs,
    IReadOnlyList<bool> ExpertsReused, IReadOnlyList<XLoraVariantScore> Scores, IReadOnlyList<string> ScalingPlots, int HeadSteps,
    double ExpertSeconds, double HeadSeconds, double Seconds, string MetricsPath, string LossPlotPath)
{
    /// <summary>The X-LoRA variant's score.</summary>
    public ExactMatchReport XLora => Scores.First(s => s.Name == "xlora").Report;

    /// <summary>The best single expert on the mixture.</summary>
    public XLoraVariantScore BestSingle => Scores.Where(s => s.Name.StartsWith("lora:", StringComparison.Ordinal)).MaxBy(s => s.Report.Accuracy)!;

    public JsonObject ToJson() => new()
    {
        ["method"] = "xlora",
        ["families"] = new JsonArray([.. Families.Select(f => (JsonNode)JsonValue.Create(f)!)]),
        ["variants"] = new JsonObject(Scores.Select(s => KeyValuePair.Create(s.Name, (JsonNode?)new JsonObject
        {
            ["exact_match"] = Math.Round(s.Report.Accuracy, 4),
            ["exact_match_by_family"] = new JsonObject(s.Report.AccuracyByFamily.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(Math.Round(kv.Value, 4))))),
        }))),
        ["eval_examples"] = XLora.Total,
        ["experts_reused"] = new JsonArray([.. ExpertsReused.Select(r => (JsonNode)JsonValue.Create(r)!)]),
        ["head_steps"] = HeadSteps,
        ["expert_seconds"] = Math.Round(ExpertSeconds, 1),
        ["head_seconds"] = Math.Round(HeadSeconds, 1),
        ["seconds"] = Math.Round(Seconds, 1),
        ["model_dir"] = ModelDir,
        ["xlora_dir"] = XLoraDir,
        ["expert_dirs"] = new JsonArray([.. ExpertDirs.Select(d => (JsonNode)JsonValue.Create(d)!)]),
        ["scaling_plots"] = new JsonArray([.. ScalingPlots.Select(d => (JsonNode)JsonValue.Create(d)!)]),
        ["metrics"] = MetricsPath,
        ["loss_plot"] = LossPlotPath,
    };
}

/// <summary>
/// <c>loramix quickstart --method xlora</c>: one LoRA per held-out family on the embedded model (trained through
/// <see cref="TrainingRecipe"/>, or reused), then an X-LoRA head over the frozen LoRAs on the families mixed; scores the base,
/// each single LoRA, the plain sum of the LoRAs and X-LoRA on the same test examples through one <see cref="ChatEngine"/>,
/// and draws the scalings of one example per family.
/// </summary>
public static class XLoraQuickstart
{
    private const string StampFile = "quickstart_expert.json";

    public static XLoraQuickstartResult Run(XLoraQuickstartOptions o, ITrainingProgress? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(o);
        progress ??= TrainingProgress.None;
        var families = o.EffectiveFamilies;
        foreach (var f in families)
            if (!TaskWorld.Families.Contains(f))
                throw new ArgumentException($"quickstart: unknown task family '{f}'; expected one of: {string.Join(", ", TaskWorld.Families)}");
        if (families.Count < 2) throw new ArgumentException("quickstart --method xlora mixes experts: give at least two families");
        if (o.ExpertSteps < 1 || o.HeadSteps < 1 || o.BatchSize < 1 || o.EvalExamples < 1 || o.Rank < 1)
            throw new ArgumentException("quickstart: steps, batch size, rank and eval examples must be positive");
        if (!File.Exists(Path.Combine(o.ModelDir, "config.json")))
            throw new LoraMixException($"quickstart: '{Path.GetFullPath(o.ModelDir)}' is not a model directory (no config.json)");
        var total = Stopwatch.StartNew();
        TorchRuntime.EnsureLoaded();
        var device = TorchRuntime.ParseDevice(o.Device);
        string outDir = Path.GetFullPath(o.EffectiveOutputDir);
        Directory.CreateDirectory(outDir);

        // ---- one LoRA expert per family (reused when the stamp matches)
        var expertDirs = new List<string>();
        var reused = new List<bool>();
        var expertClock = Stopwatch.StartNew();
        foreach (var family in families)
        {
            string dir = Path.Combine(outDir, "experts", family);
            var stamp = Stamp(o, family);
            string stampPath = Path.Combine(dir, StampFile);
            bool reuse = o.ReuseExperts && File.Exists(stampPath) && File.Exists(Path.Combine(dir, LoraAdapters.WeightsFileName))
                         && JsonNode.DeepEquals(JsonNode.Parse(File.ReadAllText(stampPath)), stamp);
            if (reuse) progress.Info($"expert '{family}': reusing {dir} (trained by an earlier run with the same settings)");
            else
            {
                progress.Info($"expert '{family}': training a LoRA (r={o.Rank}, every linear layer), {o.ExpertSteps} steps x {o.BatchSize}...");
                var recipe = new TrainingRecipe
                {
                    Source = "quickstart",
                    ModelPath = o.ModelDir,
                    Method = RecipeMethod.Lora,
                    Lora = new LoraConfig { R = o.Rank, LoraAlpha = 2 * o.Rank, AllLinear = true, TargetModules = null, BaseModelNameOrPath = o.ModelDir },
                    Dataset = new DatasetSpec([], new TaskWorldSource([family], o.ExpertSteps * o.BatchSize, Seed: 0, TaskSplit.Train, Placement: null)),
                    Device = o.Device,
                    Trainer = new TrainingOptions
                    {
                        LearningRate = o.ExpertLearningRate, LrScheduler = "cosine", WarmupSteps = Math.Min(20, o.ExpertSteps / 10), MaxSteps = o.ExpertSteps,
                        BatchSize = o.BatchSize, CutoffLen = 256, Seed = o.Seed, LoggingSteps = 10, OutputDir = dir, OverwriteOutputDir = true,
                    },
                };
                recipe.Run(progress, cancellationToken);
                AtomicFile.WriteAllText(stampPath, stamp.ToJsonString());
            }
            expertDirs.Add(dir);
            reused.Add(reuse);
        }
        double expertSeconds = expertClock.Elapsed.TotalSeconds;

        // ---- the X-LoRA head over the frozen experts, on the families mixed
        string xloraDir = Path.Combine(outDir, "xlora");
        progress.Info($"X-LoRA: training the scaling head over {families.Count} frozen experts on {string.Join(" + ", families)} mixed, {o.HeadSteps} steps x {o.BatchSize}...");
        var headRecipe = new TrainingRecipe
        {
            Source = "quickstart",
            ModelPath = o.ModelDir,
            Method = RecipeMethod.XLora,
            XLora = new XLoraConfig
            {
                HiddenSize = 0, Adapters = [.. families.Select((f, i) => (f, expertDirs[i]))], XLoraDepth = 2, XLoraSize = 64, XLoraDropoutP = 0,
                LayerwiseScalings = false, EnableSoftmax = true, BaseModelNameOrPath = o.ModelDir, RouterPolicy = o.RouterPolicy,
            },
            Dataset = new DatasetSpec([], new TaskWorldSource(families, o.HeadSteps * o.BatchSize, Seed: 3, TaskSplit.Train, Placement: null)),
            Device = o.Device,
            Trainer = new TrainingOptions
            {
                LearningRate = o.HeadLearningRate, LrScheduler = "cosine", WarmupSteps = Math.Min(10, o.HeadSteps / 10), MaxSteps = o.HeadSteps,
                BatchSize = o.BatchSize, CutoffLen = 256, Seed = o.Seed, LoggingSteps = 10, OutputDir = xloraDir, OverwriteOutputDir = true,
            },
        };
        var headClock = Stopwatch.StartNew();
        var head = headRecipe.Run(progress, cancellationToken);
        double headSeconds = headClock.Elapsed.TotalSeconds;

        // ---- score every variant on the same test examples, through one engine
        var evalRecords = new TaskWorldSource(families, o.EvalExamples * families.Count, Seed: 1, TaskSplit.Test, Placement: null).Records();
        var scores = new List<XLoraVariantScore>();
        var plots = new List<string>();
        using (var engine = ChatEngine.Load(o.ModelDir, new EngineOptions { Device = device, NamedAdapters = [new("xlora", xloraDir)], Use = AdapterChoice.Of("xlora") }))
        {
            var experts = families.Select((_, i) => XLoraAdapters.ExpertName("xlora", i)).ToList();
            var variants = new List<(string Name, AdapterChoice Choice)> { ("base", AdapterChoice.Base) };
            variants.AddRange(families.Select((f, i) => ($"lora:{f}", AdapterChoice.Of(experts[i]))));
            variants.Add(("lora-sum", AdapterChoice.Compose(experts)));
            variants.Add(("xlora", AdapterChoice.Of("xlora")));
            foreach (var (name, choice) in variants)
            {
                progress.Info($"scoring {name} on {evalRecords.Count} test examples...");
                var report = ExactMatchEvaluator.Evaluate(engine, evalRecords, o.MaxNewTokens, cancellationToken: cancellationToken, adapters: choice);
                scores.Add(new XLoraVariantScore(name, report));
                progress.Info(string.Create(CultureInfo.InvariantCulture, $"{name}: exact match {report.Accuracy:P1}"));
            }
            // the scalings of one test example per family
            foreach (var family in families)
            {
                var record = evalRecords.First(r => r.Family == family);
                var trace = engine.TraceScalings(record.PromptMessages, generateTokens: 4, cancellationToken: cancellationToken);
                var map = new double[trace.Experts.Count, trace.Tokens.Count];
                for (int i = 0; i < trace.Experts.Count; i++)
                    for (int t = 0; t < trace.Tokens.Count; t++)
                        map[i, t] = Enumerable.Range(0, trace.Modules.Count).Average(l => trace.Scaling(t, l, i));
                string png = Path.Combine(outDir, $"scalings-{family}.png");
                RoutingHeatmap.WriteValues(png, map, [.. trace.Experts], 0, 1, "scaling", [.. trace.Tokens.Select(t => t.Piece)],
                    [.. trace.Tokens.Select(t => t.Privilege)], $"X-LoRA scalings on a '{family}' example (mean over modules)", "expert");
                plots.Add(png);
            }
        }
        return new XLoraQuickstartResult(families, Path.GetFullPath(o.ModelDir), xloraDir, expertDirs, reused, scores, plots, head.Training.GlobalStep,
            expertSeconds, headSeconds, total.Elapsed.TotalSeconds, head.MetricsPath, head.LossPlotPath);
    }

    /// <summary>What an expert was trained with: a later run reuses it only when all of this matches.</summary>
    private static JsonObject Stamp(XLoraQuickstartOptions o, string family) => new()
    {
        ["family"] = family,
        ["model_dir"] = Path.GetFullPath(o.ModelDir),
        ["model_config"] = File.ReadAllText(Path.Combine(o.ModelDir, "config.json")),
        ["steps"] = o.ExpertSteps,
        ["batch_size"] = o.BatchSize,
        ["learning_rate"] = o.ExpertLearningRate,
        ["rank"] = o.Rank,
        ["seed"] = o.Seed,
    };
}
