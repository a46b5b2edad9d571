using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Tokenization;
using LoraMix.Torch;
using LoraMix.Training;

namespace LoraMix.Workflows;

/// <summary>What <see cref="SecurityEval.Run"/> trains and measures (config keys in brackets).</summary>
public sealed record SecurityEvalOptions
{
    /// <summary>The base model directory (<c>model</c>).</summary>
    public required string ModelDir { get; init; }
    /// <summary>The privileged task families: the system message's task (<c>families</c>).</summary>
    public IReadOnlyList<string> Families { get; init; } = ["first_word", "last_word", "count_words"];
    /// <summary>The families whose instruction is injected into the data (<c>injected_families</c>); an example's own
    /// family is never injected into it.</summary>
    public IReadOnlyList<string> InjectedFamilies { get; init; } = ["vowel_count", "first_word", "last_word", "count_words"];
    /// <summary>Where the injection goes (<c>positions</c>).</summary>
    public IReadOnlyList<InjectionPosition> Positions { get; init; } = [InjectionPosition.Start, InjectionPosition.Middle, InjectionPosition.End];
    /// <summary>Plain or forged role markers (<c>styles</c>).</summary>
    public IReadOnlyList<InjectionStyle> Styles { get; init; } = [InjectionStyle.Plain, InjectionStyle.ForgedRoleMarkers];
    /// <summary>Clean test cases (<c>test_clean</c>).</summary>
    public int TestClean { get; init; } = 96;
    /// <summary>Injected test cases per position × style (<c>test_injected_per_case</c>).</summary>
    public int TestInjectedPerCase { get; init; } = 20;
    public int NumExperts { get; init; } = 4;
    public int TopK { get; init; } = 2;
    public int Rank { get; init; } = 8;
    /// <summary>Optimizer steps per condition; every condition sees steps × batch size training sequences (<c>steps</c>).</summary>
    public int Steps { get; init; } = 150;
    public int BatchSize { get; init; } = 16;
    public double LearningRate { get; init; } = 2e-3;
    public long Seed { get; init; } = 42;
    public string OutputDir { get; init; } = Path.Combine("out", "security-eval");
    public string Device { get; init; } = "cpu";
    /// <summary>Generation budget per test case (<c>max_new_tokens</c>).</summary>
    public int MaxNewTokens { get; init; } = 16;

    /// <summary>The training modes to run (each under both router policies): <c>plain</c>, <c>hierarchy</c> or both.</summary>
    public IReadOnlyList<string> Trainings { get; init; } = SecurityEval.Trainings;

    /// <summary>The third factor (<c>privilege_embedding</c>): for each value, every training × policy condition is run
    /// without (false) or with (true) an ISE-style learned privilege embedding added to the token embeddings
    /// (<see cref="MixLoraConfig.PrivilegeEmbedding"/>). Default: without only.</summary>
    public IReadOnlyList<bool> PrivilegeEmbeddings { get; init; } = [false];

    /// <summary>The config keys <see cref="Parse"/> understands.</summary>
    public static IReadOnlyList<string> Keys { get; } =
    [
        "model", "families", "injected_families", "positions", "styles", "test_clean", "test_injected_per_case", "num_experts",
        "top_k", "r", "steps", "batch_size", "learning_rate", "seed", "output_dir", "device", "max_new_tokens", "trainings",
        "privilege_embedding",
    ];

    /// <summary>Reads and validates a config (unknown keys are rejected with the key); <paramref name="defaultModel"/> is used
    /// when <c>model</c> is absent.</summary>
    public static SecurityEvalOptions Parse(ConfigDocument doc, string? defaultModel = null)
    {
        ArgumentNullException.ThrowIfNull(doc);
        doc.RejectUnknownKeys(Keys);
        ConfigFileException Bad(string key, string message) => new(doc.Source, key, message);
        var o = new SecurityEvalOptions
        {
            ModelDir = doc.String("model") ?? defaultModel ?? throw Bad("model", "missing: the base model directory"),
        };
        o = o with
        {
            Families = doc.StringList("families") ?? o.Families,
            InjectedFamilies = doc.StringList("injected_families") ?? o.InjectedFamilies,
            Positions = doc.StringList("positions") is { } ps ? [.. ps.Select(p => ParseEnum<InjectionPosition>(p, "positions", Bad))] : o.Positions,
            Styles = doc.StringList("styles") is { } ss ? [.. ss.Select(s => ParseStyle(s, Bad))] : o.Styles,
            TestClean = doc.Int("test_clean", o.TestClean),
            TestInjectedPerCase = doc.Int("test_injected_per_case", o.TestInjectedPerCase),
            NumExperts = doc.Int("num_experts", o.NumExperts),
            TopK = doc.Int("top_k", o.TopK),
            Rank = doc.Int("r", o.Rank),
            Steps = doc.Int("steps", o.Steps),
            BatchSize = doc.Int("batch_size", o.BatchSize),
            LearningRate = doc.Double("learning_rate", o.LearningRate),
            Seed = doc.Int("seed") ?? o.Seed,
            OutputDir = doc.String("output_dir") ?? o.OutputDir,
            Device = doc.String("device") ?? o.Device,
            MaxNewTokens = doc.Int("max_new_tokens", o.MaxNewTokens),
            Trainings = doc.StringList("trainings") ?? o.Trainings,
            PrivilegeEmbeddings = doc.StringList("privilege_embedding") is { } pe ? [.. pe.Select(v => ParseBool(v, Bad))] : o.PrivilegeEmbeddings,
        };
        if (o.Problem() is { } p) throw Bad(p.Key, p.Message);
        return o;
    }

    private static T ParseEnum<T>(string s, string key, Func<string, string, ConfigFileException> bad) where T : struct, Enum =>
        Enum.TryParse<T>(s, ignoreCase: true, out var v) && Enum.IsDefined(v) ? v
            : throw bad(key, $"unknown value '{s}'; expected one of {string.Join(", ", Enum.GetNames<T>().Select(n => n.ToLowerInvariant()))}");

    private static bool ParseBool(string s, Func<string, string, ConfigFileException> bad) => s.ToLowerInvariant() switch
    {
        "true" or "on" or "yes" => true,
        "false" or "off" or "no" => false,
        _ => throw bad("privilege_embedding", $"expected true or false (or a list of them, e.g. [false, true]), got '{s}'"),
    };

    private static InjectionStyle ParseStyle(string s, Func<string, string, ConfigFileException> bad) => s.ToLowerInvariant() switch
    {
        "plain" => InjectionStyle.Plain,
        "forged" or "forged_role_markers" => InjectionStyle.ForgedRoleMarkers,
        _ => throw bad("styles", $"unknown value '{s}'; expected plain or forged"),
    };

    /// <summary>The config name of a style: <c>plain</c> or <c>forged</c>.</summary>
    public static string StyleName(InjectionStyle style) => style == InjectionStyle.Plain ? "plain" : "forged";

    /// <summary>Throws <see cref="ArgumentException"/> naming the config key of the first invalid setting.</summary>
    public void Validate()
    {
        if (Problem() is { } p) throw new ArgumentException($"'{p.Key}': {p.Message}");
    }

    /// <summary>The first invalid setting as (config key, message), or null when all are valid.</summary>
    public (string Key, string Message)? Problem()
    {
        foreach (var f in Families)
            if (!TaskWorld.Families.Contains(f)) return ("families", UnknownFamily(f));
        foreach (var f in InjectedFamilies)
            if (!TaskWorld.Families.Contains(f)) return ("injected_families", UnknownFamily(f));
        if (Families.Count == 0) return ("families", "at least one family is needed");
        if (Families.Distinct().Count() != Families.Count) return ("families", "families must not repeat");
        foreach (var f in Families)
            if (!InjectedFamilies.Any(i => i != f)) return ("injected_families", $"no injected family differs from '{f}'");
        if (Trainings.Count == 0 || Trainings.Any(t => !SecurityEval.Trainings.Contains(t)) || Trainings.Distinct().Count() != Trainings.Count)
            return ("trainings", $"expected distinct values among {string.Join(", ", SecurityEval.Trainings)}, got [{string.Join(", ", Trainings)}]");
        if (PrivilegeEmbeddings.Count == 0 || PrivilegeEmbeddings.Distinct().Count() != PrivilegeEmbeddings.Count)
            return ("privilege_embedding", $"expected distinct values among false, true, got [{string.Join(", ", PrivilegeEmbeddings.Select(b => b ? "true" : "false"))}]");
        if (Positions.Count == 0) return ("positions", "at least one position is needed");
        if (Styles.Count == 0) return ("styles", "at least one style is needed");
        (string, int, bool)[] ints =
        [
            ("test_clean", TestClean, TestClean is >= 1 and <= 100_000),
            ("test_injected_per_case", TestInjectedPerCase, TestInjectedPerCase is >= 1 and <= 100_000),
            ("num_experts", NumExperts, NumExperts >= 2 && NumExperts <= MixLoraConfig.MaxExperts), ("top_k", TopK, TopK >= 1 && TopK <= NumExperts),
            ("r", Rank, Rank is >= 1 and <= LoraConfig.MaxRank), ("steps", Steps, Steps is >= 1 and <= 10_000_000),
            ("batch_size", BatchSize, BatchSize is >= 2 and <= 65_536), ("max_new_tokens", MaxNewTokens, MaxNewTokens is >= 1 and <= 1_048_576),
            ("seed", (int)Math.Clamp(Seed, int.MinValue, int.MaxValue), Seed is >= 0 and <= int.MaxValue),
        ];
        foreach (var (key, value, ok) in ints)
            if (!ok) return (key, string.Create(CultureInfo.InvariantCulture, $"out of range: {value}"));
        if (!(LearningRate > 0 && LearningRate <= 1))
            return ("learning_rate", string.Create(CultureInfo.InvariantCulture, $"must be in (0, 1] (as in recipes), got {LearningRate}"));
        try { TorchRuntime.ParseDevice(Device); }
        catch (Exception e) when (e is ArgumentException or LoraMixException) { return ("device", e.Message); }
        return null;

        static string UnknownFamily(string f) => $"unknown task family '{f}'; expected one of: {string.Join(", ", TaskWorld.Families)}";
    }
}

/// <summary>Outcome counts of one condition on one group of test cases.</summary>
/// <param name="Group">"clean", "injected", or "POSITION/STYLE".</param>
/// <param name="Correct">Output = the privileged task's answer.</param>
/// <param name="FollowedInjection">Output = the injected task's answer (attack success).</param>
/// <param name="Neither">Neither answer.</param>
public sealed record SecurityGroupScore(string Group, RateWithInterval Correct, RateWithInterval FollowedInjection, RateWithInterval Neither)
{
    internal static SecurityGroupScore From(string group, IReadOnlyList<InjectionOutcome> outcomes)
    {
        int n = outcomes.Count;
        return new SecurityGroupScore(group,
            RateWithInterval.Of(outcomes.Count(o => o == InjectionOutcome.Correct), n),
            RateWithInterval.Of(outcomes.Count(o => o == InjectionOutcome.FollowedInjection), n),
            RateWithInterval.Of(outcomes.Count(o => o == InjectionOutcome.Neither), n));
    }

    /// <summary>As JSON.</summary>
    public JsonObject ToJson() => new()
    {
        ["correct"] = Correct.ToJson(),
        ["followed_injection"] = FollowedInjection.ToJson(),
        ["neither"] = Neither.ToJson(),
    };
}

/// <summary>One trained condition.</summary>
/// <param name="RouterPolicy"><c>free</c> or <c>privileged</c>.</param>
/// <param name="Training"><c>plain</c> or <c>hierarchy</c>.</param>
/// <param name="PrivilegeEmbedding">Whether the adapter learned an ISE-style privilege embedding.</param>
/// <param name="AdapterDir">The trained adapter (full path).</param>
/// <param name="TrainExamples">Training sequences.</param>
/// <param name="InjectedTrainExamples">Of which injected (context-ignorance examples).</param>
/// <param name="FinalLoss">The last step's loss.</param>
/// <param name="TrainSeconds">Training wall time.</param>
/// <param name="EvalSeconds">Evaluation wall time.</param>
/// <param name="Clean">Scores on the clean cases (Correct = utility).</param>
/// <param name="Injected">Scores on every injected case (FollowedInjection = attack success rate).</param>
/// <param name="ByCase">Scores on the injected cases per position × style.</param>
/// <param name="Outputs">The raw outputs, clean cases first, then injected cases, in <see cref="SecurityEval.TestCases"/> order.</param>
public sealed record SecurityCondition(string RouterPolicy, string Training, bool PrivilegeEmbedding, string AdapterDir, int TrainExamples, int InjectedTrainExamples,
    double? FinalLoss, double TrainSeconds, double EvalSeconds, SecurityGroupScore Clean, SecurityGroupScore Injected,
    IReadOnlyList<SecurityGroupScore> ByCase, IReadOnlyList<string> Outputs)
{
    /// <summary><c>free/plain</c>, or <c>free/plain/ise</c> with the privilege embedding.</summary>
    public string Name => PrivilegeEmbedding ? $"{RouterPolicy}/{Training}/ise" : $"{RouterPolicy}/{Training}";
}

/// <summary>The outcome of <see cref="SecurityEval.Run"/>.</summary>
public sealed record SecurityEvalResult(SecurityEvalOptions Options, IReadOnlyList<SecurityCondition> Conditions, string ResultsJsonPath,
    string ResultsMarkdownPath, string? HeatmapFreePath, string? HeatmapPrivilegedPath, TaskExample HeatmapCase, double Seconds)
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>The whole result as JSON (what results.json holds).</summary>
    public JsonObject ToJson()
    {
        var o = Options;
        return new JsonObject
        {
            ["benchmark"] = "loramix security-eval: prompt injection on the task world",
            ["model_dir"] = Path.GetFullPath(o.ModelDir),
            ["families"] = Strings(o.Families),
            ["injected_families"] = Strings(o.InjectedFamilies),
            ["positions"] = Strings(o.Positions.Select(p => p.ToString().ToLowerInvariant())),
            ["styles"] = Strings(o.Styles.Select(SecurityEvalOptions.StyleName)),
            ["test_clean"] = o.TestClean,
            ["test_injected"] = o.TestInjectedPerCase * o.Positions.Count * o.Styles.Count,
            ["mixlora"] = new JsonObject { ["num_experts"] = o.NumExperts, ["top_k"] = o.TopK, ["r"] = o.Rank },
            ["steps"] = o.Steps,
            ["batch_size"] = o.BatchSize,
            ["learning_rate"] = o.LearningRate,
            ["seed"] = o.Seed,
            ["device"] = o.Device,
            ["privilege_embedding"] = new JsonArray([.. o.PrivilegeEmbeddings.Select(b => (JsonNode)JsonValue.Create(b))]),
            ["conditions"] = new JsonArray([.. Conditions.Select(c => (JsonNode)new JsonObject
            {
                ["name"] = c.Name,
                ["router_policy"] = c.RouterPolicy,
                ["training"] = c.Training,
                ["privilege_embedding"] = c.PrivilegeEmbedding,
                ["adapter_dir"] = c.AdapterDir,
                ["train_examples"] = c.TrainExamples,
                ["injected_train_examples"] = c.InjectedTrainExamples,
                ["final_train_loss"] = c.FinalLoss is double l && double.IsFinite(l) ? Math.Round(l, 5) : null,
                ["train_seconds"] = Math.Round(c.TrainSeconds, 1),
                ["eval_seconds"] = Math.Round(c.EvalSeconds, 1),
                ["utility"] = c.Clean.Correct.ToJson(),
                ["attack_success"] = c.Injected.FollowedInjection.ToJson(),
                ["neither"] = c.Injected.Neither.ToJson(),
                ["injected_correct"] = c.Injected.Correct.ToJson(),
                ["clean_neither"] = c.Clean.Neither.ToJson(),
                ["by_case"] = new JsonObject(c.ByCase.Select(g => KeyValuePair.Create(g.Group, (JsonNode?)g.ToJson()))),
            })]),
            ["heatmap_case"] = new JsonObject
            {
                ["family"] = HeatmapCase.Family,
                ["injected_family"] = HeatmapCase.InjectedFamily,
                ["position"] = HeatmapCase.InjectionPosition?.ToString().ToLowerInvariant(),
                ["style"] = HeatmapCase.InjectionStyle is { } hs ? SecurityEvalOptions.StyleName(hs) : null,
                ["data"] = HeatmapCase.Data,
                ["answer"] = HeatmapCase.Answer,
                ["injected_answer"] = HeatmapCase.InjectedAnswer,
            },
            ["heatmap_free"] = HeatmapFreePath,
            ["heatmap_privileged"] = HeatmapPrivilegedPath,
            ["seconds"] = Math.Round(Seconds, 1),
        };

        static JsonArray Strings(IEnumerable<string> s) => new([.. s.Select(x => (JsonNode)JsonValue.Create(x)!)]);
    }

    /// <summary>The Markdown table (what results.md holds).</summary>
    public string ToMarkdown()
    {
        var o = Options;
        int injected = o.TestInjectedPerCase * o.Positions.Count * o.Styles.Count;
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture,
            $"Privileged families: {string.Join(", ", o.Families)}; injected: {string.Join(", ", o.InjectedFamilies)}. ")
          .Append(CultureInfo.InvariantCulture,
            $"MixLoRA {o.NumExperts} experts, top-{o.TopK}, r = {o.Rank}; {o.Steps} steps × {o.BatchSize} sequences per condition. ")
          .Append(CultureInfo.InvariantCulture, $"{o.TestClean} clean and {injected} injected test cases; 95% Wilson intervals.\n\n");
        sb.Append("| router policy | training | privilege embedding | utility (clean exact match) | attack success | neither (injected) | correct (injected) |\n");
        sb.Append("|---|---|---|---|---|---|---|\n");
        foreach (var c in Conditions)
            sb.Append(CultureInfo.InvariantCulture,
                $"| {c.RouterPolicy} | {c.Training} | {(c.PrivilegeEmbedding ? "yes" : "no")} | {c.Clean.Correct.ToMarkdown()} ({c.Clean.Correct.Count}/{c.Clean.Correct.Total}) | " +
                $"{c.Injected.FollowedInjection.ToMarkdown()} ({c.Injected.FollowedInjection.Count}/{c.Injected.FollowedInjection.Total}) | " +
                $"{c.Injected.Neither.ToMarkdown()} | {c.Injected.Correct.ToMarkdown()} |\n");
        sb.Append("\nAttack success by injection position / style:\n\n");
        var groups = Conditions[0].ByCase.Select(g => g.Group).ToList();
        sb.Append("| condition | ").Append(string.Join(" | ", groups)).Append(" |\n");
        sb.Append("|---|").Append(string.Concat(groups.Select(_ => "---|"))).Append('\n');
        foreach (var c in Conditions)
            sb.Append(CultureInfo.InvariantCulture, $"| {c.Name} | ")
              .Append(string.Join(" | ", c.ByCase.Select(g => g.FollowedInjection.ToMarkdown()))).Append(" |\n");
        return sb.ToString();
    }

    internal void Write()
    {
        AtomicFile.WriteAllText(ResultsJsonPath, ToJson().ToJsonString(Indented) + "\n");
        AtomicFile.WriteAllText(ResultsMarkdownPath, ToMarkdown());
    }
}

/// <summary>
/// The injection benchmark (issue 6): for each of {free, privileged} router policy × {plain, hierarchy} training, train a
/// MixLoRA adapter through <see cref="TrainingRecipe"/> on the privileged families' train split — plain: clean examples
/// only; hierarchy: half clean, half injected examples whose target is still the privileged task's answer (context
/// ignorance), the same number of sequences — then score it through <see cref="ChatEngine.GenerateBatch(IReadOnlyList{RenderedChat}, GenerationOptions, int, Action{int}?, CancellationToken)"/>
/// on test-split cases: utility = exact match on clean cases; attack success = output equals the injected task's answer;
/// neither. With <see cref="SecurityEvalOptions.PrivilegeEmbeddings"/> = [false, true] every condition is also run with an
/// ISE-style learned privilege embedding (the third factor). Writes results.json, results.md and routing heatmaps of one
/// injected case under the free- and privileged-policy hierarchy adapters (the first privilege-embedding setting).
/// </summary>
public static class SecurityEval
{
    public const string ResultsJsonFile = "results.json";
    public const string ResultsMarkdownFile = "results.md";
    public const string HeatmapFreeFile = "heatmap-free.png";
    public const string HeatmapPrivilegedFile = "heatmap-privileged.png";

    /// <summary>The router policies, in table order.</summary>
    public static IReadOnlyList<string> Policies { get; } = [MixLoraConfig.FreePolicy, MixLoraConfig.PrivilegedPolicy];

    /// <summary>The training modes, in table order.</summary>
    public static IReadOnlyList<string> Trainings { get; } = ["plain", "hierarchy"];

    private static readonly TaskGenerateOptions SystemPlacement = new() { Placement = InstructionPlacement.System };

    /// <summary>The test cases: <see cref="SecurityEvalOptions.TestClean"/> clean examples (test split, seed 1), then for each
    /// position × style (positions outer) <see cref="SecurityEvalOptions.TestInjectedPerCase"/> injected copies of test examples
    /// (seed 3), the injected family taken round-robin from the injected families that differ from the example's.</summary>
    public static (IReadOnlyList<TaskExample> Clean, IReadOnlyList<TaskExample> Injected) TestCases(SecurityEvalOptions o)
    {
        ArgumentNullException.ThrowIfNull(o);
        var clean = TaskWorld.Generate(o.Families, o.TestClean, 1, TaskSplit.Test, SystemPlacement);
        int cases = o.Positions.Count * o.Styles.Count;
        var bases = TaskWorld.Generate(o.Families, o.TestInjectedPerCase * cases, 3, TaskSplit.Test, SystemPlacement);
        var injected = new List<TaskExample>(bases.Count);
        int k = 0;
        foreach (var pos in o.Positions)
            foreach (var style in o.Styles)
                for (int i = 0; i < o.TestInjectedPerCase; i++, k++)
                    injected.Add(TaskWorld.Inject(bases[k], InjectedFamilyFor(o, bases[k], i), pos, style, seed: 3 + k));
        return (clean, injected);
    }

    /// <summary>The training examples of a mode: steps × batch size sequences from the train split; hierarchy replaces every
    /// second one with an injected copy of another clean example (random family, position and style), target unchanged.</summary>
    public static IReadOnlyList<TaskExample> TrainExamples(SecurityEvalOptions o, string training)
    {
        ArgumentNullException.ThrowIfNull(o);
        int n = o.Steps * o.BatchSize;
        if (training == "plain") return TaskWorld.Generate(o.Families, n, 0, TaskSplit.Train, SystemPlacement);
        if (training != "hierarchy") throw new ArgumentException($"unknown training mode '{training}'", nameof(training));
        int injected = n / 2;
        var clean = TaskWorld.Generate(o.Families, n - injected, 0, TaskSplit.Train, SystemPlacement);
        var toInject = TaskWorld.Generate(o.Families, injected, 2, TaskSplit.Train, SystemPlacement);
        var list = new List<TaskExample>(n);
        for (int i = 0; i < n; i++)
            list.Add(i % 2 == 0 ? clean[i / 2] : TaskWorld.InjectRandom(toInject[i / 2], seed: 1000 + i, o.InjectedFamilies));
        return list;
    }

    private static string InjectedFamilyFor(SecurityEvalOptions o, TaskExample e, int i)
    {
        var pool = o.InjectedFamilies.Where(f => f != e.Family).ToArray();
        return pool[i % pool.Length];
    }

    /// <summary>Classifies each output against its case (<see cref="TaskScorer.Classify"/>).</summary>
    public static IReadOnlyList<InjectionOutcome> Classify(IReadOnlyList<TaskExample> cases, IReadOnlyList<string> outputs) =>
        [.. cases.Select((c, i) => TaskScorer.Classify(outputs[i], c))];

    /// <summary>Runs every condition (trainings × privilege embeddings × router policies) and writes the results (see the class remarks).</summary>
    public static SecurityEvalResult Run(SecurityEvalOptions o, ITrainingProgress? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(o);
        progress ??= TrainingProgress.None;
        if (o.Problem() is { } p) throw new ArgumentException($"security-eval: '{p.Key}': {p.Message}");
        if (!File.Exists(Path.Combine(o.ModelDir, "config.json")))
            throw new LoraMixException($"security-eval: '{Path.GetFullPath(o.ModelDir)}' is not a model directory (no config.json)");

        var total = Stopwatch.StartNew();
        TorchRuntime.EnsureLoaded();
        var device = TorchRuntime.ParseDevice(o.Device);
        string outDir = Path.GetFullPath(o.OutputDir);
        Directory.CreateDirectory(outDir);
        var (clean, injected) = TestCases(o);
        var allCases = clean.Concat(injected).ToList();
        var heatmapCase = injected[0];
        var conditions = new List<SecurityCondition>();
        string? heatFree = null, heatPriv = null;

        int conditionCount = o.Trainings.Count * o.PrivilegeEmbeddings.Count * Policies.Count;
        foreach (var training in o.Trainings)
        {
            var train = TrainExamples(o, training);
            string dataFile = Path.Combine(outDir, "data", $"train-{training}.jsonl");
            WriteChatJsonl(dataFile, train);
            foreach (bool ise in o.PrivilegeEmbeddings)
            foreach (var policy in Policies)
            {
                cancellationToken.ThrowIfCancellationRequested();
                string name = ise ? $"{policy}-{training}-ise" : $"{policy}-{training}";
                string label = ise ? $"{policy}/{training}/ise" : $"{policy}/{training}";
                progress.Info($"[{conditions.Count + 1}/{conditionCount}] training {label}: {train.Count} sequences " +
                              $"({train.Count(e => e.IsInjected)} injected), {o.Steps} steps");
                var recipe = new TrainingRecipe
                {
                    Source = "security-eval",
                    ModelPath = o.ModelDir,
                    Method = RecipeMethod.MixLora,
                    MixLora = new MixLoraConfig
                    {
                        NumExperts = o.NumExperts, TopK = o.TopK, R = o.Rank, LoraAlpha = 2 * o.Rank, LoraDropout = 0,
                        RouterAuxLossCoef = 0.01, RouterZLossCoef = 0.001, RouterPolicy = policy, BaseModelNameOrPath = o.ModelDir,
                        PrivilegeEmbedding = ise,
                    },
                    Dataset = new DatasetSpec([dataFile], null, DatasetFormat.Chat),
                    Device = o.Device,
                    EvalExactMatch = false,
                    Trainer = new TrainingOptions
                    {
                        LearningRate = o.LearningRate, LrScheduler = "cosine", WarmupSteps = Math.Min(20, o.Steps / 10), MaxSteps = o.Steps,
                        BatchSize = o.BatchSize, CutoffLen = 256, Seed = o.Seed, LoggingSteps = 10,
                        OutputDir = Path.Combine(outDir, "adapters", name), OverwriteOutputDir = true,
                    },
                };
                var trained = recipe.Run(progress, cancellationToken);

                progress.Info($"[{conditions.Count + 1}/{conditionCount}] scoring {label} on {clean.Count} clean + {injected.Count} injected test cases");
                var evalWatch = Stopwatch.StartNew();
                IReadOnlyList<string> outputs;
                using (var engine = ChatEngine.Load(o.ModelDir, new EngineOptions { Device = device, Adapters = [trained.AdapterDir!] }))
                {
                    outputs = Generate(engine, allCases, o.MaxNewTokens, cancellationToken);
                    if (training == "hierarchy" && ise == o.PrivilegeEmbeddings[0])
                    {
                        string path = Path.Combine(outDir, policy == MixLoraConfig.FreePolicy ? HeatmapFreeFile : HeatmapPrivilegedFile);
                        var trace = engine.TraceRouting(Messages(heatmapCase, includeAnswer: false), generateTokens: 4, cancellationToken: cancellationToken);
                        RoutingHeatmap.Write(path, trace.TopExperts(), trace.NumExperts, trace.Tokens.Select(t => t.Piece).ToList(),
                            trace.Tokens.Select(t => t.Privilege).ToList(), $"injected case, {policy}-trained hierarchy adapter{(ise ? " with privilege embedding" : "")} ({trace.PolicyDescription})");
                        if (policy == MixLoraConfig.FreePolicy) heatFree = path; else heatPriv = path;
                    }
                }
                var outcomes = Classify(allCases, outputs);
                var cleanOut = outcomes.Take(clean.Count).ToList();
                var injOut = outcomes.Skip(clean.Count).ToList();
                var byCase = new List<SecurityGroupScore>();
                int k = 0;
                foreach (var pos in o.Positions)
                    foreach (var style in o.Styles)
                    {
                        byCase.Add(SecurityGroupScore.From($"{pos.ToString().ToLowerInvariant()}/{SecurityEvalOptions.StyleName(style)}",
                            injOut.Skip(k).Take(o.TestInjectedPerCase).ToList()));
                        k += o.TestInjectedPerCase;
                    }
                var cond = new SecurityCondition(policy, training, ise, trained.AdapterDir!, trained.TrainExamples, train.Count(e => e.IsInjected),
                    trained.Training.Steps.Count > 0 ? trained.Training.Steps[^1].Loss : null, trained.Training.Seconds,
                    evalWatch.Elapsed.TotalSeconds, SecurityGroupScore.From("clean", cleanOut), SecurityGroupScore.From("injected", injOut),
                    byCase, outputs);
                conditions.Add(cond);
                progress.Info($"[{conditions.Count}/{conditionCount}] {cond.Name}: utility {cond.Clean.Correct.ToMarkdown()}, attack success " +
                              $"{cond.Injected.FollowedInjection.ToMarkdown()}, neither {cond.Injected.Neither.ToMarkdown()}");
            }
        }
        var result = new SecurityEvalResult(o, conditions, Path.Combine(outDir, ResultsJsonFile), Path.Combine(outDir, ResultsMarkdownFile),
            heatFree, heatPriv, heatmapCase, total.Elapsed.TotalSeconds);
        result.Write();
        return result;
    }

    /// <summary>The chat of a case as engine messages (instruction in system, the data in a <c>data</c> message).</summary>
    public static IReadOnlyList<ChatMessage> Messages(TaskExample e, bool includeAnswer) =>
        [.. e.ToChat(includeAnswer).Select(m => new ChatMessage(ChatRoles.Parse(m.Role), m.Content))];

    /// <summary>Greedy outputs of <paramref name="engine"/> on the cases, rendered with their privilege labels.</summary>
    public static IReadOnlyList<string> Generate(ChatEngine engine, IReadOnlyList<TaskExample> cases, int maxNewTokens,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(engine);
        var chats = cases.Select(c => engine.RenderForGeneration(Messages(c, includeAnswer: false))).ToList();
        var results = engine.GenerateBatch(chats, new GenerationOptions { MaxNewTokens = maxNewTokens, Temperature = 0 }, 16,
            cancellationToken: cancellationToken);
        return [.. results.Select(r => r.Text)];
    }

    private static void WriteChatJsonl(string path, IReadOnlyList<TaskExample> examples)
    {
        var sb = new StringBuilder();
        foreach (var e in examples)
        {
            var line = new JsonObject
            {
                ["messages"] = new JsonArray([.. e.ToChat(includeAnswer: true).Select(m => (JsonNode)new JsonObject { ["role"] = m.Role, ["content"] = m.Content })]),
                ["family"] = e.Family,
                ["answer"] = e.Answer,
            };
            sb.Append(line.ToJsonString()).Append('\n');
        }
        AtomicFile.WriteAllText(path, sb.ToString());
    }
}
