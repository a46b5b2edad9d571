using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoraMix.Configuration;

namespace LoraMix.Training;

/// <summary>
/// Trainer settings, named as in Hugging Face <c>TrainingArguments</c> / LLaMA-Factory: each property binds to the
/// snake_case key given by <see cref="KeyOf"/> (e.g. <see cref="LearningRate"/> ↔ <c>learning_rate</c>), which is also the
/// name used in <c>training_args.json</c> and in error messages.
/// </summary>
public sealed record TrainingOptions
{
    /// <summary>Peak learning rate (<c>learning_rate</c>).</summary>
    public double LearningRate { get; init; } = 2e-4;
    /// <summary>Passes over the training data (<c>num_epochs</c>; fractions allowed). Ignored when <see cref="MaxSteps"/> &gt; 0.</summary>
    public double NumEpochs { get; init; } = 3;
    /// <summary>Total optimizer steps; overrides <see cref="NumEpochs"/> when positive (<c>max_steps</c>, -1 = off).</summary>
    public int MaxSteps { get; init; } = -1;
    /// <summary>Sequences per micro-batch (<c>batch_size</c>, HF's per_device_train_batch_size).</summary>
    public int BatchSize { get; init; } = 1;
    /// <summary>Sequences per evaluation batch (<c>eval_batch_size</c>; 0 = <see cref="BatchSize"/>).</summary>
    public int EvalBatchSize { get; init; }
    /// <summary>Micro-batches per optimizer step (<c>gradient_accumulation_steps</c>).</summary>
    public int GradientAccumulationSteps { get; init; } = 1;
    /// <summary>Linear warm-up length in optimizer steps (<c>warmup_steps</c>); takes precedence over <see cref="WarmupRatio"/>.</summary>
    public int WarmupSteps { get; init; }
    /// <summary>Warm-up as a fraction of the total steps, rounded up (<c>warmup_ratio</c>), used when <see cref="WarmupSteps"/> is 0.</summary>
    public double WarmupRatio { get; init; }
    /// <summary><c>constant</c>, <c>constant_with_warmup</c>, <c>linear</c> or <c>cosine</c> (<c>lr_scheduler</c>).</summary>
    public string LrScheduler { get; init; } = "linear";
    /// <summary>Decoupled (AdamWOptimizer) weight decay (<c>weight_decay</c>); biases and norm weights are never decayed.</summary>
    public double WeightDecay { get; init; }
    public double AdamBeta1 { get; init; } = 0.9;
    public double AdamBeta2 { get; init; } = 0.999;
    public double AdamEpsilon { get; init; } = 1e-8;
    /// <summary>Clip the global gradient L2 norm to this value (<c>max_grad_norm</c>; 0 = no clipping).</summary>
    public double MaxGradNorm { get; init; } = 1.0;
    /// <summary>Evaluate every N optimizer steps (<c>eval_steps</c>; 0 = only at the end, when validation data is given).</summary>
    public int EvalSteps { get; init; }
    /// <summary>Write <c>checkpoint-STEP/</c> every N steps and at the end (<c>save_steps</c>; 0 = no checkpoints).</summary>
    public int SaveSteps { get; init; }
    /// <summary>Log a metrics line every N steps (<c>logging_steps</c>); the logged loss averages the window.</summary>
    public int LoggingSteps { get; init; } = 10;
    /// <summary>Keep at most N checkpoints, deleting the oldest but never the best (<c>save_total_limit</c>; 0 = keep all).</summary>
    public int SaveTotalLimit { get; init; }
    /// <summary>Where metrics.jsonl, loss.png, checkpoints and the final weights go (<c>output_dir</c>).</summary>
    public string OutputDir { get; init; } = "";
    /// <summary>Seeds the data order and the torch RNG (dropout) (<c>seed</c>).</summary>
    public long Seed { get; init; } = 42;
    /// <summary>Sequences are truncated to this many tokens (<c>cutoff_len</c>).</summary>
    public int CutoffLen { get; init; } = 1024;
    /// <summary>Concatenate examples up to <see cref="CutoffLen"/> (<c>packing</c>).</summary>
    public bool Packing { get; init; }
    /// <summary>Pad id for right padding (<c>pad_token_id</c>); any in-vocabulary id works since padded positions carry no label.</summary>
    public int PadTokenId { get; init; }
    /// <summary>Compute in bfloat16 (<c>bf16</c>): the model must be loaded in bf16; the optimizer keeps fp32 master weights.</summary>
    public bool Bf16 { get; init; }
    /// <summary>A fresh run refuses an output_dir that already holds checkpoints unless this is true, in which case they are
    /// deleted first (<c>overwrite_output_dir</c>), so that <c>latest</c> can never pick up another run's checkpoint.</summary>
    public bool OverwriteOutputDir { get; init; }
    /// <summary>A checkpoint directory, or <c>latest</c> for the newest <c>checkpoint-*</c> in <see cref="OutputDir"/> (<c>resume_from_checkpoint</c>).</summary>
    public string? ResumeFromCheckpoint { get; init; }

    /// <summary>The scheduler names accepted by <see cref="LrScheduler"/>.</summary>
    public static readonly IReadOnlyList<string> SchedulerNames = ["constant", "constant_with_warmup", "linear", "cosine"];

    private static readonly JsonNamingPolicy Snake = JsonNamingPolicy.SnakeCaseLower;

    /// <summary>The configuration key of a property (<c>nameof(LearningRate)</c> → <c>learning_rate</c>).</summary>
    public static string KeyOf(string propertyName) => Snake.ConvertName(propertyName);

    /// <summary>All configuration keys this type binds (for <see cref="ConfigDocument.RejectUnknownKeys"/>).</summary>
    public static IReadOnlyList<string> Keys { get; } =
        typeof(TrainingOptions).GetProperties(System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Instance).Where(p => p.CanWrite).Select(p => KeyOf(p.Name)).ToList();

    /// <summary>Hugging Face / LLaMA-Factory spellings accepted as synonyms by <see cref="FromConfig"/>.</summary>
    public static readonly IReadOnlyDictionary<string, string> Aliases = new Dictionary<string, string>
    {
        ["num_train_epochs"] = "num_epochs",
        ["per_device_train_batch_size"] = "batch_size",
        ["micro_batch_size"] = "batch_size",
        ["per_device_eval_batch_size"] = "eval_batch_size",
        ["lr_scheduler_type"] = "lr_scheduler",
        ["sequence_len"] = "cutoff_len",
    };

    /// <summary>
    /// Reads the options from a config document (keys at the top level, or under <paramref name="prefix"/>), starting from
    /// the defaults, and validates them. Unknown keys are left for the caller's <see cref="ConfigDocument.RejectUnknownKeys"/>.
    /// </summary>
    public static TrainingOptions FromConfig(ConfigDocument doc, string? prefix = null)
    {
        string K(string name)
        {
            string key = prefix is null ? name : prefix + "." + name;
            foreach (var (alias, canonical) in Aliases)
            {
                if (canonical != name) continue;
                string a = prefix is null ? alias : prefix + "." + alias;
                if (!doc.Has(a)) continue;
                if (doc.Has(key)) throw new ConfigFileException(doc.Source, a, $"both '{a}' and its synonym '{key}' are set; keep one");
                return a;
            }
            return key;
        }
        var d = new TrainingOptions();
        var o = new TrainingOptions
        {
            LearningRate = doc.Double(K("learning_rate"), d.LearningRate),
            NumEpochs = doc.Double(K("num_epochs"), d.NumEpochs),
            MaxSteps = doc.Int(K("max_steps"), d.MaxSteps),
            BatchSize = doc.Int(K("batch_size"), d.BatchSize),
            EvalBatchSize = doc.Int(K("eval_batch_size"), d.EvalBatchSize),
            GradientAccumulationSteps = doc.Int(K("gradient_accumulation_steps"), d.GradientAccumulationSteps),
            WarmupSteps = doc.Int(K("warmup_steps"), d.WarmupSteps),
            WarmupRatio = doc.Double(K("warmup_ratio"), d.WarmupRatio),
            LrScheduler = doc.String(K("lr_scheduler"), d.LrScheduler)!,
            WeightDecay = doc.Double(K("weight_decay"), d.WeightDecay),
            AdamBeta1 = doc.Double(K("adam_beta1"), d.AdamBeta1),
            AdamBeta2 = doc.Double(K("adam_beta2"), d.AdamBeta2),
            AdamEpsilon = doc.Double(K("adam_epsilon"), d.AdamEpsilon),
            MaxGradNorm = doc.Double(K("max_grad_norm"), d.MaxGradNorm),
            EvalSteps = doc.Int(K("eval_steps"), d.EvalSteps),
            SaveSteps = doc.Int(K("save_steps"), d.SaveSteps),
            LoggingSteps = doc.Int(K("logging_steps"), d.LoggingSteps),
            SaveTotalLimit = doc.Int(K("save_total_limit"), d.SaveTotalLimit),
            OutputDir = doc.String(K("output_dir"), d.OutputDir)!,
            Seed = doc.Int(K("seed"), (int)d.Seed),
            CutoffLen = doc.Int(K("cutoff_len"), d.CutoffLen),
            Packing = doc.Bool(K("packing"), d.Packing),
            PadTokenId = doc.Int(K("pad_token_id"), d.PadTokenId),
            Bf16 = doc.Bool(K("bf16"), d.Bf16),
            OverwriteOutputDir = doc.Bool(K("overwrite_output_dir"), d.OverwriteOutputDir),
            ResumeFromCheckpoint = doc.String(K("resume_from_checkpoint"), d.ResumeFromCheckpoint),
        };
        o.Check((key, message) => new ConfigFileException(doc.Source, K(key), message));
        return o;
    }

    /// <summary>The largest <see cref="LearningRate"/> accepted: a peak rate above 1 is a typo (1e4 for 1e-4), and the
    /// optimizer computes in fp32, where a huge rate overflows.</summary>
    public const double MaxLearningRate = 1;

    /// <summary>The largest <see cref="NumEpochs"/> accepted.</summary>
    public const double MaxNumEpochs = 10_000;

    /// <summary>The largest <see cref="BatchSize"/>, <see cref="EvalBatchSize"/> and <see cref="GradientAccumulationSteps"/> accepted.</summary>
    public const int MaxBatchSize = 65_536;

    /// <summary>The largest <see cref="CutoffLen"/> accepted (tokens).</summary>
    public const int MaxCutoffLen = 1 << 20;

    /// <summary>Checks every option against its stated range; throws <see cref="LoraMixException"/> naming the key, the
    /// value and what to do.</summary>
    public void Validate(string source = "training options") =>
        Check((key, message) => new LoraMixException($"{source}: '{key}': {message}"));

    /// <summary>Every range, with the error made by <paramref name="fail"/> (key, message).</summary>
    internal void Check(Func<string, string, LoraMixException> fail)
    {
        static string F(double v) => v.ToString("R", CultureInfo.InvariantCulture);
        void Fail(string key, string message) => throw fail(key, message);
        void IntRange(string key, long value, long min, long max, string note = "")
        {
            if (value < min || value > max) Fail(key, $"must be in [{min}, {max}]{note}, got {value}");
        }
        if (!(LearningRate > 0 && LearningRate <= MaxLearningRate))
            Fail("learning_rate", $"must be in (0, {F(MaxLearningRate)}], got {F(LearningRate)} (typical: 1e-4 to 3e-4 for LoRA, 1e-5 for full fine-tuning)");
        if (MaxSteps <= 0 && MaxSteps != -1) Fail("max_steps", $"must be a positive number of optimizer steps, or -1 to train for num_epochs; got {MaxSteps}");
        if (!(NumEpochs > 0 && NumEpochs <= MaxNumEpochs))
            Fail("num_epochs", $"must be in (0, {F(MaxNumEpochs)}] (fractions allowed; or set max_steps), got {F(NumEpochs)}");
        IntRange("batch_size", BatchSize, 1, MaxBatchSize);
        IntRange("eval_batch_size", EvalBatchSize, 0, MaxBatchSize, " (0 = batch_size)");
        IntRange("gradient_accumulation_steps", GradientAccumulationSteps, 1, MaxBatchSize);
        if (WarmupSteps < 0) Fail("warmup_steps", $"must be non-negative, got {WarmupSteps}");
        if (!(WarmupRatio >= 0 && WarmupRatio < 1)) Fail("warmup_ratio", $"must be in [0, 1), got {F(WarmupRatio)}");
        if (!SchedulerNames.Contains(LrScheduler)) Fail("lr_scheduler", $"unknown schedule '{LrScheduler}'; expected one of {string.Join(", ", SchedulerNames)}");
        if (!(WeightDecay >= 0 && WeightDecay * LearningRate < 1))
            Fail("weight_decay", $"must be non-negative with learning_rate × weight_decay below 1 (each step scales the weights by 1 - learning_rate × weight_decay), got {F(WeightDecay)} (typical: 0 to 0.1)");
        if (!(AdamBeta1 >= 0 && AdamBeta1 < 1)) Fail("adam_beta1", $"must be in [0, 1), got {F(AdamBeta1)} (default 0.9)");
        if (!(AdamBeta2 >= 0 && AdamBeta2 < 1)) Fail("adam_beta2", $"must be in [0, 1), got {F(AdamBeta2)} (default 0.999)");
        if (!(AdamEpsilon > 0 && AdamEpsilon <= 1)) Fail("adam_epsilon", $"must be in (0, 1], got {F(AdamEpsilon)} (default 1e-8)");
        if (!(MaxGradNorm >= 0 && double.IsFinite(MaxGradNorm))) Fail("max_grad_norm", $"must be a finite non-negative number (0 disables clipping), got {F(MaxGradNorm)}");
        if (EvalSteps < 0) Fail("eval_steps", $"must be non-negative (0 = evaluate at the end only), got {EvalSteps}");
        if (SaveSteps < 0) Fail("save_steps", $"must be non-negative (0 = no checkpoints), got {SaveSteps}");
        if (LoggingSteps < 1) Fail("logging_steps", $"must be at least 1, got {LoggingSteps}");
        if (SaveTotalLimit < 0) Fail("save_total_limit", $"must be non-negative (0 = keep every checkpoint), got {SaveTotalLimit}");
        if (string.IsNullOrWhiteSpace(OutputDir)) Fail("output_dir", "is required: the folder for metrics.jsonl, checkpoints, loss.png and the trained weights");
        if (OutputDir.IndexOfAny(Path.GetInvalidPathChars()) >= 0) Fail("output_dir", "holds a character that is not allowed in a path (e.g. NUL)");
        if (ResumeFromCheckpoint?.IndexOfAny(Path.GetInvalidPathChars()) >= 0) Fail("resume_from_checkpoint", "holds a character that is not allowed in a path (e.g. NUL)");
        IntRange("seed", Seed, 0, int.MaxValue);
        IntRange("cutoff_len", CutoffLen, 2, MaxCutoffLen, " tokens");
        if (PadTokenId < 0) Fail("pad_token_id", $"must be non-negative, got {PadTokenId}");
        if (ResumeFromCheckpoint is { Length: 0 }) Fail("resume_from_checkpoint", "is empty; give a checkpoint directory or 'latest'");
    }

    /// <summary>The options as JSON with their configuration keys (written to <c>training_args.json</c>).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, new JsonSerializerOptions
    {
        PropertyNamingPolicy = Snake, WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.Never,
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
    });
}
