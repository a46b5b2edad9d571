using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

/// <summary>
/// One real checkpoint of a tiny LoRA run (3 steps, evaluated every step, checkpoint-2 kept), written once per test class;
/// tests copy it, damage the copy and resume from it with the same model, data and options.
/// </summary>
public sealed class CheckpointFixture : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly LlamaForCausalLM _model;
    private int _runs;

    public CheckpointFixture()
    {
        Directory.CreateDirectory(_dir.Path);
        Target = TrainingFixtures.TinyLora(out _model, dropout: 0.1);
        new Trainer(Target, Options(_dir.Sub("run"))).Train(Data, Validation);
        Checkpoint = _dir.Sub("run/checkpoint-2");
        if (!File.Exists(Path.Combine(Checkpoint, Trainer.StateFile))) throw new InvalidOperationException("the fixture run wrote no checkpoint-2");
    }

    internal TrainingTarget Target { get; }
    internal List<TrainingExample> Data { get; } = TrainingFixtures.RandomExamples(6, 21);
    internal List<TrainingExample> Validation { get; } = TrainingFixtures.RandomExamples(2, 22);

    /// <summary>The pristine checkpoint-2.</summary>
    public string Checkpoint { get; }

    internal static TrainingOptions Options(string outDir) => TrainingFixtures.Options(outDir) with
    {
        MaxSteps = 3, SaveSteps = 2, EvalSteps = 1, LoggingSteps = 1, BatchSize = 2,
    };

    /// <summary>A fresh output directory holding a copy of checkpoint-2; returns the copy's path.</summary>
    public string FreshCopy()
    {
        string outDir = _dir.Sub($"resume-{Interlocked.Increment(ref _runs)}");
        string copy = Path.Combine(outDir, "checkpoint-2");
        Directory.CreateDirectory(copy);
        foreach (var f in Directory.GetFiles(Checkpoint)) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        return copy;
    }

    /// <summary>Resumes the run from <paramref name="checkpoint"/> (output into its parent); null on success.</summary>
    public Exception? Resume(string checkpoint)
    {
        try
        {
            new Trainer(Target, Options(Path.GetDirectoryName(checkpoint)!) with { ResumeFromCheckpoint = checkpoint }).Train(Data, Validation);
            return null;
        }
        catch (Exception e)
        {
            return e;
        }
    }

    public void Dispose()
    {
        _model.Dispose();
        _dir.Dispose();
    }

    // ------------------------------------------------------------------ file surgery

    /// <summary>Rewrites a safetensors file: <paramref name="edit"/> may change the tensors (name → tensor) and metadata.</summary>
    public static void RewriteSafetensors(string path, Action<Dictionary<string, Tensor>, Dictionary<string, string>> edit)
    {
        using var scope = NewDisposeScope();
        Dictionary<string, Tensor> tensors;
        Dictionary<string, string> metadata;
        using (var reader = SafetensorsReader.Open(path))
        {
            tensors = reader.Entries.ToDictionary(e => e.Name, e => reader.ReadTensor(e.Name), StringComparer.Ordinal);
            metadata = new Dictionary<string, string>(reader.Metadata, StringComparer.Ordinal);
        }
        edit(tensors, metadata);
        SafetensorsWriter.Write(path, tensors, metadata);
    }

    /// <summary>The torch_cpu bytes of an RNG state file.</summary>
    public static byte[] RngBytes(string path)
    {
        using var reader = SafetensorsReader.Open(path);
        using var t = reader.ReadTensor("torch_cpu");
        return t.data<byte>().ToArray();
    }

    /// <summary>Replaces the torch_cpu tensor of an RNG state file by <paramref name="bytes"/> (U8, 1-D).</summary>
    public static void SetRngBytes(string path, byte[] bytes) =>
        RewriteSafetensors(path, (t, _) => t["torch_cpu"] = tensor(bytes, dtype: ScalarType.Byte));
}
