using LoraMix.Adapters.Lora;
using LoraMix.Modeling;
using LoraMix.Training;

namespace LoraMix.Tests.Training;

/// <summary>Small models, data and sinks for the trainer tests (all on the `tiny` preset).</summary>
internal static class TrainingFixtures
{
    public static readonly LoraConfig Lora = new() { R = 4, LoraAlpha = 8, AllLinear = true, TargetModules = null };

    public static LlamaForCausalLM TinyModel(long seed = 11) => ModelPresets.CreateRandom("tiny", seed);

    /// <summary>A model with a LoRA adapter (A seeded by <paramref name="loraSeed"/>) and its training target.</summary>
    public static TrainingTarget TinyLora(out LlamaForCausalLM model, double dropout = 0, long baseSeed = 11, long loraSeed = 0)
    {
        model = TinyModel(baseSeed);
        var cfg = Lora with { LoraDropout = dropout };
        LoraAdapters.Attach(model, cfg, seed: loraSeed);
        return TrainingTarget.Lora(model, cfg);
    }

    /// <summary>Random sequences of varied length; targets are the second half (like a prompt/answer split).</summary>
    public static List<TrainingExample> RandomExamples(int count, int seed, int minLen = 5, int maxLen = 14, int vocab = 512)
    {
        var rnd = new Random(seed);
        var list = new List<TrainingExample>();
        for (int i = 0; i < count; i++)
        {
            int len = rnd.Next(minLen, maxLen + 1);
            var ids = Enumerable.Range(0, len).Select(_ => rnd.Next(3, vocab)).ToArray();
            ids[0] = 1;
            var mask = Enumerable.Range(0, len).Select(t => t >= len / 2).ToArray();
            list.Add(new TrainingExample(ids, mask));
        }
        return list;
    }

    /// <summary>A fixed mapping x → (7x + 3) mod 512 as [BOS, x, f(x)], loss on f(x) only.</summary>
    public static List<TrainingExample> Mapping(int count, int offset = 3) =>
        Enumerable.Range(offset, count).Select(x => new TrainingExample([1, x, (7 * x + 3) % 512], [false, false, true])).ToList();

    public static TrainingOptions Options(string outputDir) => new()
    {
        OutputDir = outputDir, LearningRate = 1e-2, MaxSteps = 4, BatchSize = 2, LoggingSteps = 1, LrScheduler = "constant",
        MaxGradNorm = 0, Seed = 5, CutoffLen = 32,
    };

    public sealed class Recorder : ITrainingProgress
    {
        public List<StepMetrics> Steps { get; } = [];
        public List<EvalMetrics> Evals { get; } = [];
        public List<string> Messages { get; } = [];
        public Action<StepMetrics>? OnStep { get; init; }
        public bool Finished { get; private set; }
        public void Started(TrainingPlan plan) { }
        public void StepCompleted(StepMetrics metrics, bool logged) { Steps.Add(metrics); OnStep?.Invoke(metrics); }
        public void Evaluated(EvalMetrics metrics) => Evals.Add(metrics);
        public void Info(string message) => Messages.Add(message);
        void ITrainingProgress.Finished() => Finished = true;
    }
}

/// <summary>A temporary directory removed at dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "loramix-train-" + Guid.NewGuid().ToString("N"));
    public string Sub(string name) => System.IO.Path.Combine(Path, name);
    public void Dispose()
    {
        if (Directory.Exists(Path)) Directory.Delete(Path, recursive: true);
    }
}
