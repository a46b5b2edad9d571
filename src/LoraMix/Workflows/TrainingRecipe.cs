using System.Globalization;
using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Modeling;
using LoraMix.Tokenization;
using LoraMix.Training;

namespace LoraMix.Workflows;

/// <summary>What a recipe trains.</summary>
public enum RecipeMethod
{
    /// <summary>A PEFT LoRA adapter on a frozen base (<c>adapter: {type: lora}</c>, the default with <c>model</c>).</summary>
    Lora,

    /// <summary>A MoE-PEFT MixLoRA adapter on a frozen base (<c>adapter: {type: mixlora}</c>).</summary>
    MixLora,

    /// <summary>Every weight (<c>adapter: {type: full}</c>, the only choice with <c>model_init</c>).</summary>
    Full,

    /// <summary>An X-LoRA scaling head over frozen PEFT LoRA experts (<c>adapter: {type: xlora, adapters: {name: path}}</c>).</summary>
    XLora,
}

/// <summary>A task-world data source: <see cref="TaskWorld.Generate(IEnumerable{string}, int, int, TaskSplit, TaskGenerateOptions?)"/>
/// rendered through <see cref="TaskWorldRecords"/>.</summary>
/// <param name="Families">Task family ids (the config may also say <c>pretrain</c>, <c>held_out</c> or <c>all</c>).</param>
/// <param name="Count">Examples in all, families round-robin.</param>
/// <param name="Seed">Generator seed.</param>
/// <param name="Split">train or test inputs.</param>
/// <param name="Placement">Instruction in system or user; null mixes them half and half.</param>
/// <param name="Paraphrases">Which instruction wordings are drawn.</param>
/// <param name="ToolFraction">The fraction of inputs carried by a <c>tool</c> message instead of <c>data</c>.</param>
public sealed record TaskWorldSource(IReadOnlyList<string> Families, int Count, int Seed, TaskSplit Split,
    InstructionPlacement? Placement, ParaphraseSet Paraphrases = ParaphraseSet.Train, double ToolFraction = 0)
{
    /// <summary>The examples as chat records with family and answer; line = 1-based index.</summary>
    public IReadOnlyList<DatasetRecord> Records() =>
        TaskWorld.Generate(Families, Count, Seed, Split, new TaskGenerateOptions { Placement = Placement, Paraphrases = Paraphrases, ToolFraction = ToolFraction })
            .Select((e, i) => TaskWorldRecords.ToRecord(e, includeAnswer: true, line: i + 1)).ToList();

    /// <summary>A short name for messages (<c>task_world[train: uppercase, sort_words]</c>).</summary>
    public string Name => $"task_world[{Split.ToString().ToLowerInvariant()}: {string.Join(", ", Families)}]";
}

/// <summary>A dataset: files (alpaca / chat / ShareGPT / text, JSON or JSONL or .txt) or a task-world source.</summary>
public sealed record DatasetSpec(IReadOnlyList<string> Files, TaskWorldSource? TaskWorld, DatasetFormat Format = DatasetFormat.Auto);

/// <summary>Pre-training from scratch: the architecture (vocabulary and special ids are filled from the tokenizer), the
/// tokenizer (<c>byte-level</c>, <c>{train: bpe, vocab_size: N}</c> to learn one from the training data, or a directory
/// whose tokenizer files are copied) and the initialisation seed.</summary>
/// <param name="Architecture">The shape (vocabulary and special ids are filled from the tokenizer).</param>
/// <param name="Tokenizer"><c>byte-level</c>, <c>bpe</c> (learnt) or a directory.</param>
/// <param name="Seed">The initialisation seed.</param>
/// <param name="TrainTokenizer">Set when the tokenizer is learnt (<see cref="Tokenizer"/> is then <c>bpe</c>).</param>
public sealed record ModelInitSpec(LlamaConfig Architecture, string Tokenizer, long Seed, BpeTrainerOptions? TrainTokenizer = null);

/// <summary>The outcome of <see cref="TrainingRecipe.Run"/>.</summary>
/// <param name="Training">The trainer's result (steps, evaluations, checkpoints).</param>
/// <param name="OutputDir">Where the adapter (or model), metrics.jsonl and loss.png were written.</param>
/// <param name="ModelDir">The model directory to load the result with: the base model for adapters, the output for
/// full training.</param>
/// <param name="AdapterDir">The adapter directory (= output dir), or null for full training.</param>
/// <param name="TrainExamples">Training examples used.</param>
/// <param name="EvalExamples">Validation examples used.</param>
/// <param name="Skipped">Bad records skipped (skip_bad), with file:line.</param>
/// <param name="ExactMatch">Exact-match on the evaluation records with answers, when asked for.</param>
/// <param name="Routing">Per-layer routing statistics of the last evaluation (MixLoRA with validation data).</param>
public sealed record RecipeResult(TrainingResult Training, string OutputDir, string ModelDir, string? AdapterDir, int TrainExamples,
    int EvalExamples, IReadOnlyList<string> Skipped, Evaluation.ExactMatchReport? ExactMatch,
    IReadOnlyList<Routing.LayerRoutingStatistics>? Routing)
{
    /// <summary>metrics.jsonl.</summary>
    public string MetricsPath => Path.Combine(OutputDir, MetricsLog.FileName);

    /// <summary>loss.png.</summary>
    public string LossPlotPath => Path.Combine(OutputDir, LossPlot.FileName);
}

/// <summary>
/// A configuration-driven training job (what <c>loramix train</c> and <c>loramix pretrain</c> run, and what C# callers
/// such as the quickstart build): parse and validate a YAML/JSON config with LLaMA-Factory/PEFT key names, then
/// <see cref="Run"/> it — tokenizer, datasets rendered with the chat template, model (loaded or initialised), LoRA,
/// MixLoRA or full training through the one <see cref="Trainer"/>, and optional exact-match evaluation through the
/// one engine. Unknown keys are rejected with the key and the file. See README "Fine-tuning" for the key list.
/// </summary>
public sealed record TrainingRecipe
{
    /// <summary>The config file (for messages and relative dataset paths).</summary>
    public string Source { get; init; } = "recipe";
    /// <summary>Base model directory (<c>model</c>; alias <c>model_name_or_path</c>), or null with <see cref="ModelInit"/>.</summary>
    public string? ModelPath { get; init; }
    /// <summary>Pre-training from scratch (<c>model_init</c>).</summary>
    public ModelInitSpec? ModelInit { get; init; }
    public RecipeMethod Method { get; init; } = RecipeMethod.Lora;
    /// <summary>The LoRA config (<see cref="RecipeMethod.Lora"/>).</summary>
    public LoraConfig? Lora { get; init; }
    /// <summary>The MixLoRA config (<see cref="RecipeMethod.MixLora"/>).</summary>
    public MixLoraConfig? MixLora { get; init; }
    /// <summary>The X-LoRA config (<see cref="RecipeMethod.XLora"/>); a <c>hidden_size</c> of 0 takes the model's.</summary>
    public XLoraConfig? XLora { get; init; }
    /// <summary>Trainer options (top-level keys, <see cref="TrainingOptions.FromConfig"/>).</summary>
    public TrainingOptions Trainer { get; init; } = new();
    public required DatasetSpec Dataset { get; init; }
    public DatasetSpec? EvalDataset { get; init; }
    /// <summary>Fraction of the training records held out for validation when no eval_dataset is given (<c>val_size</c>).</summary>
    public double ValSize { get; init; }
    /// <summary>Use at most this many training records (<c>max_samples</c>; 0 = all).</summary>
    public int MaxSamples { get; init; }
    /// <summary>Chat template name; null detects it from tokenizer_config.json (<c>template</c>).</summary>
    public string? Template { get; init; }
    /// <summary>Loss on every token instead of assistant tokens only (<c>train_on_prompt</c>).</summary>
    public bool TrainOnPrompt { get; init; }
    /// <summary>Skip and count bad records instead of failing (<c>skip_bad</c>).</summary>
    public bool SkipBad { get; init; }
    /// <summary><c>cpu</c>, <c>cuda</c>, <c>cuda:N</c> (<c>device</c>).</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>Exact-match after training on the evaluation records with answers (<c>eval_exact_match</c>); null = only
    /// when the eval dataset is a task-world source.</summary>
    public bool? EvalExactMatch { get; init; }
    /// <summary>Generation budget of the exact-match evaluation (<c>eval_max_new_tokens</c>).</summary>
    public int EvalMaxNewTokens { get; init; } = 64;
    /// <summary>Test examples per task family in <c>pretrain_report.json</c> (<c>report_samples_per_family</c>).</summary>
    public int ReportSamplesPerFamily { get; init; } = 20;

    /// <summary>Whether exact-match runs after training.</summary>
    public bool RunsExactMatch => EvalExactMatch ?? EvalDataset?.TaskWorld is not null;

    /// <summary>Keys understood besides the trainer's (<see cref="TrainingOptions.Keys"/>).</summary>
    public static IReadOnlyList<string> RecipeKeys { get; } =
    [
        "model", "model_name_or_path", "model_init.preset", "model_init.hidden_size", "model_init.intermediate_size",
        "model_init.num_hidden_layers", "model_init.num_attention_heads", "model_init.num_key_value_heads", "model_init.head_dim",
        "model_init.max_position_embeddings", "model_init.rope_theta", "model_init.rms_norm_eps", "model_init.tie_word_embeddings",
        "model_init.vocab_size", "model_init.tokenizer", "model_init.tokenizer.train", "model_init.tokenizer.vocab_size",
        "model_init.tokenizer.min_frequency", "model_init.tokenizer.space_apart", "model_init.seed",
        "dataset", "dataset.task_world.families", "dataset.task_world.count", "dataset.task_world.seed", "dataset.task_world.split",
        "dataset.task_world.placement", "dataset.task_world.paraphrases", "dataset.task_world.tool_fraction", "dataset_format",
        "eval_dataset", "eval_dataset.task_world.families", "eval_dataset.task_world.count", "eval_dataset.task_world.seed",
        "eval_dataset.task_world.split", "eval_dataset.task_world.placement", "eval_dataset.task_world.paraphrases", "eval_dataset.task_world.tool_fraction",
        "val_size", "max_samples", "template", "train_on_prompt", "skip_bad", "device",
        "eval_exact_match", "eval_max_new_tokens", "report_samples_per_family",
        "adapter.type",
        // every registered method's keys, in registration order (lora's, then those mixlora adds)
        .. AdapterMethods.All.SelectMany(m => m.RecipeKeys).Select(k => "adapter." + k.Key).Distinct(),
    ];

    /// <summary>Every key a recipe understands (recipe keys, trainer keys and their synonyms).</summary>
    public static IReadOnlyList<string> AllKeys { get; } =
        [.. RecipeKeys, .. TrainingOptions.Keys, .. TrainingOptions.Aliases.Keys];

    /// <summary>The largest LoRA rank accepted (<c>adapter.r</c>, <c>adapter.expert_lora.r</c>).</summary>
    public const int MaxRank = 65_536;

    /// <summary>The most MixLoRA experts accepted (<c>adapter.num_experts</c>).</summary>
    public const int MaxExperts = 1_024;

    /// <summary>The most task-world examples one source may generate (<c>task_world.count</c>).</summary>
    public const int MaxTaskWorldCount = 1_000_000;

    /// <summary>The largest generation budget of the exact-match evaluation (<c>eval_max_new_tokens</c>).</summary>
    public const int MaxNewTokens = 1 << 20;

    /// <summary>The most test examples per family in a pre-training report (<c>report_samples_per_family</c>).</summary>
    public const int MaxReportSamplesPerFamily = 100_000;

    private static void Range(ConfigDocument doc, string key, long value, long min, long max)
    {
        if (value < min || value > max)
            throw new ConfigFileException(doc.Source, key, $"must be in [{min}, {max}], got {value}");
    }

    /// <summary>Loads a YAML/JSON recipe with <c>key=value</c> overrides (<c>--set</c>).</summary>
    public static TrainingRecipe Load(string path, IEnumerable<string>? overrides = null) => Parse(ConfigDocument.Load(path, overrides));

    /// <summary>Reads and validates a recipe; every key must be understood (the error names the key and the file).</summary>
    public static TrainingRecipe Parse(ConfigDocument doc)
    {
        ArgumentNullException.ThrowIfNull(doc);
        string src = doc.Source;
        ConfigFileException Bad(string key, string message) => new(src, key, message);

        // ---- model
        string? model = doc.String("model");
        if (doc.String("model_name_or_path") is { } alias)
        {
            if (model is not null) throw Bad("model_name_or_path", "both 'model' and its synonym 'model_name_or_path' are set; keep one");
            model = alias;
        }
        bool init = doc.Has("model_init");
        if (model is not null && init) throw Bad("model_init", "both 'model' (fine-tune a model) and 'model_init' (pre-train from scratch) are set; keep one");
        if (model is null && !init) throw Bad("model", "missing: give 'model' (a Hugging Face model directory) or 'model_init' (an architecture to pre-train from scratch)");

        // ---- method
        string type = doc.String("adapter.type") ?? (init ? "full" : "lora");
        // an adapter method of the registry, or full training (not an adapter method: a recipe special case)
        bool full = type.Equals(FullType, StringComparison.OrdinalIgnoreCase);
        var adapterMethod = full ? null : AdapterMethods.ByName(type)
            ?? throw Bad("adapter.type", $"unknown adapter type '{type}'; expected {string.Join(", ", AdapterMethods.Names)} or {FullType}");
        var method = adapterMethod is null ? RecipeMethod.Full : MethodOf(adapterMethod);
        if (init && method != RecipeMethod.Full)
            throw Bad("adapter.type", $"'{type}' needs a trained base model; 'model_init' pre-trains every weight, so use type: full (or leave adapter out)");

        var trainer = TrainingOptions.FromConfig(doc);
        var recipe = new TrainingRecipe
        {
            Source = src,
            ModelPath = model,
            Method = method,
            Trainer = trainer,
            Dataset = ReadDataset(doc, "dataset") ?? throw Bad("dataset", "missing: a file, a list of files, or {task_world: {families: [...], count: N}}"),
            EvalDataset = ReadDataset(doc, "eval_dataset"),
            ValSize = doc.Double("val_size", 0),
            MaxSamples = doc.Int("max_samples", 0),
            Template = doc.String("template"),
            TrainOnPrompt = doc.Bool("train_on_prompt", false),
            SkipBad = doc.Bool("skip_bad", false),
            Device = doc.String("device", "cpu")!,
            EvalExactMatch = doc.Has("eval_exact_match") ? doc.Bool("eval_exact_match", false) : null,
            EvalMaxNewTokens = doc.Int("eval_max_new_tokens", 64),
            ReportSamplesPerFamily = doc.Int("report_samples_per_family", 20),
        };
        if (doc.String("dataset_format") is { } fmt)
        {
            // By name only: Enum.TryParse would also take "7" and "1, 2", which name no format.
            var f = Enum.GetValues<DatasetFormat>().Where(v => v.ToString().Equals(fmt, StringComparison.OrdinalIgnoreCase)).Select(v => (DatasetFormat?)v).FirstOrDefault()
                ?? throw Bad("dataset_format", $"unknown format '{fmt}'; expected auto, alpaca, chat or text");
            recipe = recipe with
            {
                Dataset = recipe.Dataset with { Format = f },
                EvalDataset = recipe.EvalDataset is { } e ? e with { Format = f } : null,
            };
        }
        if (!(recipe.ValSize >= 0 && recipe.ValSize < 1)) throw Bad("val_size", $"must be in [0, 1), got {recipe.ValSize.ToString(CultureInfo.InvariantCulture)}");
        if (recipe.ValSize > 0 && recipe.EvalDataset is not null) throw Bad("val_size", "both 'eval_dataset' and 'val_size' are set; keep one");
        if (recipe.MaxSamples < 0) throw Bad("max_samples", $"must be non-negative (0 = all), got {recipe.MaxSamples}");
        if (recipe.Template is { } t && !ChatTemplate.TryParse(t, out _)) throw Bad("template", $"unknown template '{t}'; expected one of {string.Join(", ", ChatTemplate.Names)}");
        Range(doc, "eval_max_new_tokens", recipe.EvalMaxNewTokens, 1, MaxNewTokens);
        Range(doc, "report_samples_per_family", recipe.ReportSamplesPerFamily, 1, MaxReportSamplesPerFamily);
        if (recipe.EvalExactMatch == true && recipe.EvalDataset is null && recipe.ValSize == 0)
            throw Bad("eval_exact_match", "needs evaluation data: set eval_dataset or val_size");
        try { Torch.TorchRuntime.ParseDevice(recipe.Device); }
        catch (Exception e) when (e is ArgumentException or LoraMixException) { throw Bad("device", e.Message); }

        // ---- model_init / adapters
        if (init) recipe = recipe with { ModelInit = ReadModelInit(doc, trainer.Seed) };
        if (adapterMethod is not null)
        {
            recipe = ReadAdapter(doc, adapterMethod, model) switch
            {
                LoraConfig lora => recipe with { Lora = lora },
                MixLoraConfig mix => recipe with { MixLora = mix },
                XLoraConfig xlora => recipe with { XLora = xlora },
                var other => throw new LoraMixException($"adapter type '{adapterMethod.Name}' ({other.GetType().Name}) cannot be trained by a recipe yet"),
            };
        }
        doc.RejectUnread(AllKeys);
        return recipe;
    }

    private static DatasetSpec? ReadDataset(ConfigDocument doc, string key)
    {
        if (!doc.Has(key)) return null;
        if (doc.IsMapping(key))
        {
            if (!doc.Has(key + ".task_world"))
                throw new ConfigFileException(doc.Source, key, "a mapping must be {task_world: {...}}; for files give a path or a list of paths");
            string p = key + ".task_world.";
            var names = doc.StringList(p + "families") ?? throw new ConfigFileException(doc.Source, p + "families",
                "missing: a list of task families, or pretrain, held_out or all");
            var families = new List<string>();
            foreach (var n in names)
            {
                IReadOnlyList<string> group = n switch
                {
                    "pretrain" => TaskWorld.PretrainFamilies,
                    "held_out" => TaskWorld.HeldOutFamilies,
                    "all" => TaskWorld.Families,
                    _ when TaskWorld.Families.Contains(n) => [n],
                    _ => throw new ConfigFileException(doc.Source, p + "families",
                        $"unknown task family '{n}'; expected pretrain, held_out, all or some of {string.Join(", ", TaskWorld.Families)}"),
                };
                foreach (var f in group) if (!families.Contains(f)) families.Add(f);
            }
            int count = doc.Int(p + "count", 1000);
            Range(doc, p + "count", count, 1, MaxTaskWorldCount);
            int seed = doc.Int(p + "seed", key == "dataset" ? 0 : 1);
            Range(doc, p + "seed", seed, 0, int.MaxValue);
            string split = doc.String(p + "split", key == "dataset" ? "train" : "test")!;
            string placement = doc.String(p + "placement", "system")!;
            string paraphrases = doc.String(p + "paraphrases", "train")!;
            double toolFraction = doc.Double(p + "tool_fraction", 0);
            if (!(toolFraction >= 0 && toolFraction <= 1))
                throw new ConfigFileException(doc.Source, p + "tool_fraction",
                    $"must be in [0, 1] (the fraction of inputs sent as a tool message), got {toolFraction.ToString(CultureInfo.InvariantCulture)}");
            var source = new TaskWorldSource(families, count, seed,
                split switch
                {
                    "train" => TaskSplit.Train,
                    "test" => TaskSplit.Test,
                    _ => throw new ConfigFileException(doc.Source, p + "split", $"expected train or test, got '{split}'"),
                },
                placement switch
                {
                    "system" => InstructionPlacement.System,
                    "user" => InstructionPlacement.User,
                    "mixed" => null,
                    _ => throw new ConfigFileException(doc.Source, p + "placement", $"expected system, user or mixed, got '{placement}'"),
                },
                paraphrases switch
                {
                    "train" => ParaphraseSet.Train,
                    "held_out" => ParaphraseSet.HeldOut,
                    "all" => ParaphraseSet.All,
                    _ => throw new ConfigFileException(doc.Source, p + "paraphrases", $"expected train, held_out or all, got '{paraphrases}'"),
                }, toolFraction);
            return new DatasetSpec([], source);
        }
        var files = doc.StringList(key);
        if (files is null || files.Count == 0) throw new ConfigFileException(doc.Source, key, "is empty: give a file, a list of files, or {task_world: {...}}");
        string baseDir = Path.GetDirectoryName(Path.GetFullPath(doc.Source)) ?? ".";
        // A relative path is taken from the working directory, else from the config file's directory.
        var resolved = files.Select(f => File.Exists(f) || Path.IsPathRooted(f) || !File.Exists(Path.Combine(baseDir, f)) ? f : Path.Combine(baseDir, f)).ToList();
        return new DatasetSpec(resolved, null);
    }

    private static ModelInitSpec ReadModelInit(ConfigDocument doc, long defaultSeed)
    {
        const string p = "model_init.";
        var basis = doc.String(p + "preset") is { } preset
            ? (ModelPresets.Names.Contains(preset) ? ModelPresets.Get(preset)
                : throw new ConfigFileException(doc.Source, p + "preset", $"unknown preset '{preset}'; available: {string.Join(", ", ModelPresets.Names)}"))
            : new LlamaConfig { RmsNormEps = 1e-5, MaxPositionEmbeddings = 512 };
        int hidden = doc.Int(p + "hidden_size", basis.HiddenSize);
        int heads = doc.Int(p + "num_attention_heads", basis.NumAttentionHeads);
        var cfg = basis with
        {
            ModelType = "llama",
            HiddenSize = hidden,
            IntermediateSize = doc.Int(p + "intermediate_size", basis.IntermediateSize),
            NumHiddenLayers = doc.Int(p + "num_hidden_layers", basis.NumHiddenLayers),
            NumAttentionHeads = heads,
            NumKeyValueHeads = doc.Int(p + "num_key_value_heads", basis.NumKeyValueHeads > 0 ? basis.NumKeyValueHeads : heads),
            HeadDim = doc.Int(p + "head_dim", basis.HeadDim > 0 ? basis.HeadDim : heads > 0 ? hidden / heads : 0),
            MaxPositionEmbeddings = doc.Int(p + "max_position_embeddings", basis.MaxPositionEmbeddings),
            RopeTheta = doc.Double(p + "rope_theta", basis.RopeTheta),
            RmsNormEps = doc.Double(p + "rms_norm_eps", basis.RmsNormEps),
            TieWordEmbeddings = doc.Bool(p + "tie_word_embeddings", basis.TieWordEmbeddings),
            VocabSize = doc.Int(p + "vocab_size", 0),
        };
        foreach (var (key, value, min, max) in new (string, long, long, long)[]
        {
            // the bounds of config.json (LlamaConfig), so that whatever pre-training writes loads again
            ("hidden_size", cfg.HiddenSize, 1, LlamaConfig.MaxHiddenSize), ("intermediate_size", cfg.IntermediateSize, 1, LlamaConfig.MaxIntermediateSize),
            ("num_hidden_layers", cfg.NumHiddenLayers, 1, LlamaConfig.MaxHiddenLayers), ("num_attention_heads", cfg.NumAttentionHeads, 1, LlamaConfig.MaxAttentionHeads),
            ("num_key_value_heads", cfg.NumKeyValueHeads, 1, LlamaConfig.MaxAttentionHeads), ("head_dim", cfg.HeadDim, 2, LlamaConfig.MaxHeadDim),
            ("max_position_embeddings", cfg.MaxPositionEmbeddings, 1, LlamaConfig.MaxPositions), ("vocab_size", cfg.VocabSize, 0, LlamaConfig.MaxVocabSize),
        })
            Range(doc, p + key, value, min, max);
        if (!(cfg.RopeTheta > 0 && cfg.RopeTheta <= 1e12))
            throw new ConfigFileException(doc.Source, p + "rope_theta", $"must be in (0, 1e12], got {cfg.RopeTheta.ToString(CultureInfo.InvariantCulture)} (Llama: 10000 or 500000)");
        if (!(cfg.RmsNormEps > 0 && cfg.RmsNormEps < 1))
            throw new ConfigFileException(doc.Source, p + "rms_norm_eps", $"must be in (0, 1), got {cfg.RmsNormEps.ToString(CultureInfo.InvariantCulture)} (typical: 1e-5 or 1e-6)");
        int initSeed = doc.Int(p + "seed", (int)defaultSeed);
        Range(doc, p + "seed", initSeed, 0, int.MaxValue);
        BpeTrainerOptions? train = null;
        string tokenizer;
        if (doc.IsMapping(p + "tokenizer"))
        {
            const string t = p + "tokenizer.";
            string kind = doc.String(t + "train") ?? throw new ConfigFileException(doc.Source, t + "train",
                "missing: a learnt tokenizer needs 'train: bpe' (byte-level BPE learnt from the training data)");
            if (kind != "bpe")
                throw new ConfigFileException(doc.Source, t + "train", $"'{kind}' is not a tokenizer this project trains; supported: bpe");
            int vocab = doc.Int(t + "vocab_size") ?? throw new ConfigFileException(doc.Source, t + "vocab_size",
                $"missing: the vocabulary size to learn (at least {ByteLevelTokenizerFiles.VocabSize(0)}: 256 bytes + the ChatML specials)");
            train = new BpeTrainerOptions(vocab, doc.Int(t + "min_frequency", 2), doc.Bool(t + "space_apart", false));
            try { train.Validate(); }
            catch (ArgumentOutOfRangeException e)
            {
                throw new ConfigFileException(doc.Source, t + (e.ParamName == nameof(BpeTrainerOptions.MinFrequency) ? "min_frequency" : "vocab_size"),
                    e.Message.Split(" (Parameter", 2)[0]);
            }
            tokenizer = "bpe";
        }
        else
        {
            tokenizer = doc.String(p + "tokenizer") ?? throw new ConfigFileException(doc.Source, p + "tokenizer",
                "missing: 'byte-level' (writes a byte-level tokenizer), {train: bpe, vocab_size: N} (learns one from the " +
                "training data) or a directory holding tokenizer.json / tokenizer.model");
            if (tokenizer != "byte-level" && !Inference.ChatEngine.HasTokenizerFiles(tokenizer))
                throw new ConfigFileException(doc.Source, p + "tokenizer",
                    $"'{tokenizer}' is neither 'byte-level', a mapping {{train: bpe, vocab_size: N}}, nor a directory with tokenizer.json or tokenizer.model");
        }
        // Validate the shape now (with a placeholder vocabulary when it comes from the tokenizer).
        try { (cfg with { VocabSize = Math.Max(cfg.VocabSize, 1), BosTokenId = null, EosTokenIds = [], PadTokenId = null }).Validate(doc.Source + ": model_init"); }
        catch (ModelConfigException e) { throw new ConfigFileException(doc.Source, p.TrimEnd('.'), e.Message); }
        return new ModelInitSpec(cfg, tokenizer, initSeed, train);
    }

    /// <summary>The <c>adapter.type</c> of full training (every weight; not an adapter method).</summary>
    public const string FullType = "full";

    /// <summary>The <see cref="RecipeMethod"/> of a registered adapter method (named alike).</summary>
    public static RecipeMethod MethodOf(IAdapterMethod method) =>
        Enum.TryParse<RecipeMethod>(method.Name, ignoreCase: true, out var m) && m != RecipeMethod.Full ? m
            : throw new LoraMixException($"adapter method '{method.Name}' has no {nameof(RecipeMethod)}");

    /// <summary>The registered adapter method a recipe trains, or null for full training.</summary>
    public IAdapterMethod? AdapterMethod => Method == RecipeMethod.Full ? null : AdapterMethods.ByName(Method.ToString());

    /// <summary>
    /// Reads the <c>adapter:</c> section into the config of <paramref name="method"/> through the config's one parser: each
    /// of the method's <see cref="IAdapterMethod.RecipeKeys"/> present is read with the recipe's typed accessors (their
    /// leniency and messages; absent and null keys are left out) into an object, which the method parses in the
    /// <see cref="AdapterConfigDialect.Recipe"/> dialect. Keys the method does not list stay unread, so
    /// <see cref="ConfigDocument.RejectUnread"/> rejects them. Errors name the file and <c>adapter.&lt;key&gt;</c>.
    /// </summary>
    internal static object ReadAdapter(ConfigDocument doc, IAdapterMethod method, string? model)
    {
        const string p = "adapter.";
        var section = new JsonObject();
        foreach (var (key, kind) in method.RecipeKeys)
        {
            string full = p + key;
            var parts = key.Split('.');
            JsonObject parent = section;
            for (int i = 0; i < parts.Length - 1; i++)
            {
                // a nested block given at all (even empty) is in the section, as the recipe always read it
                if (!doc.Has(p + string.Join('.', parts[..(i + 1)]))) { parent = null!; break; }
                if (parent[parts[i]] is not JsonObject child) parent[parts[i]] = child = new JsonObject();
                parent = child;
            }
            if (parent is null) continue;
            JsonNode? value = kind switch
            {
                RecipeValueKind.Int => doc.Int(full) is { } n ? JsonValue.Create(n) : null,
                RecipeValueKind.Number => doc.Double(full) is { } d ? JsonValue.Create(d) : null,
                RecipeValueKind.Bool => doc.Bool(full) is { } b ? JsonValue.Create(b) : null,
                RecipeValueKind.String => doc.String(full) is { } s ? JsonValue.Create(s) : null,
                RecipeValueKind.NonNullString => doc.Has(full) ? JsonValue.Create(doc.NonNullString(full, "")) : null,
                RecipeValueKind.NonNullBool => doc.Has(full) ? JsonValue.Create(doc.NonNullBool(full, false)) : null,
                RecipeValueKind.StringMap => doc.StringMap(full) is { } map
                    ? new JsonObject(map.Select(e => KeyValuePair.Create(e.Name, (JsonNode?)JsonValue.Create(e.Value))))
                    : null,
                RecipeValueKind.StringListOrString => doc.IsList(full)
                    ? new JsonArray([.. doc.StringList(full)!.Select(x => (JsonNode?)JsonValue.Create(x))])
                    : doc.String(full) is { } t ? JsonValue.Create(t) : null,
                _ => throw new ArgumentOutOfRangeException(nameof(method), kind, "unknown recipe value kind"),
            };
            if (value is not null) parent[parts[^1]] = value;
        }
        if (model is not null) section["base_model_name_or_path"] = model;
        try
        {
            return method.ParseConfig(section, doc.Source + ": adapter", AdapterConfigDialect.Recipe);
        }
        catch (AdapterConfigException e)
        {
            throw new ConfigFileException(doc.Source, p + e.Key, e.Reason);
        }
    }

    /// <summary>Runs the recipe: see <see cref="TrainingRecipeRunner"/>.</summary>
    public RecipeResult Run(ITrainingProgress? progress = null, CancellationToken cancellationToken = default) =>
        TrainingRecipeRunner.Run(this, progress ?? TrainingProgress.None, cancellationToken);

    /// <summary>
    /// After <see cref="Run"/> of a <c>model_init</c> recipe: exact-match of the trained model on the test split of every
    /// task family (<see cref="ReportSamplesPerFamily"/> each, the training data's instruction placement), written to
    /// <c>pretrain_report.json</c> in the model directory.
    /// </summary>
    public PretrainReport WritePretrainReport(RecipeResult result, ITrainingProgress? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(result);
        if (Method != RecipeMethod.Full) throw new LoraMixException("a pre-training report needs a trained model (model_init or adapter type full), not an adapter");
        return TrainingRecipeRunner.WritePretrainReport(this, result, progress ?? TrainingProgress.None, cancellationToken);
    }
}
