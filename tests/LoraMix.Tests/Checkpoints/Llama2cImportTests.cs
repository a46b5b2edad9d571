using LoraMix.Checkpoints;
using LoraMix.Cli;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Reference;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

public sealed class Llama2cImportTests : IDisposable
{
    private const string Checkpoint = Llama2cReferenceTests.CheckpointRelativePath;
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-l2c-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [SharedAssetFact(Checkpoint)]
    public void ImportedModelGeneratesExactlyWhatLlama2cGenerates()
    {
        string bin = SharedAssets.Find(Checkpoint)!;
        var cfg = Llama2cImporter.Convert(bin, _dir);
        Assert.Equal(64, cfg.HiddenSize);
        Assert.Equal(4, cfg.NumKeyValueHeads);
        Assert.True(cfg.TieWordEmbeddings);
        using var model = LlamaForCausalLM.FromPretrained(_dir);
        var golden = Llama2cReferenceTests.LoadGoldenIds();
        var result = new TokenGenerator(model).Generate([1], new GenerationOptions { MaxNewTokens = golden.Count, Temperature = 0 });
        Assert.Equal(golden, result.Tokens);
    }

    [SharedAssetFact(Checkpoint)]
    public void ImportedLogitsMatchTheIndependentLlama2cReference()
    {
        string bin = SharedAssets.Find(Checkpoint)!;
        Llama2cImporter.Convert(bin, _dir);
        using var model = LlamaForCausalLM.FromPretrained(_dir);
        var reference = Llama2cReference.Load(bin);
        var tokens = Llama2cReferenceTests.LoadGoldenIds().Take(40).Prepend(1).ToArray();
        using var scope = NewDisposeScope();
        var ours = model.Forward(tensor(tokens.Select(t => (long)t).ToArray()).unsqueeze(0))[0];
        var expected = tokens.Select((t, pos) => reference.Forward(t, pos)).SelectMany(x => x).ToArray();
        var exp = tensor(expected, [tokens.Length, reference.Vocab]);
        // Both sides are fp32 with different summation orders: agree to a few fp32 ulps of the logit scale.
        Assert.True(Modeling.TestModels.RelativeError(ours, exp) < 1e-5);
    }

    [SharedAssetFact(Checkpoint)]
    public void CliImportThenGenerateMatchesLlama2c()
    {
        string bin = SharedAssets.Find(Checkpoint)!;
        var outw = new StringWriter();
        var errw = new StringWriter();
        Assert.Equal(0, CliApp.Run(["import-llama2c", bin, "--out", _dir], outw, errw));
        outw = new StringWriter();
        // The acceptance command: defaults (256 new tokens, EOS on) equal llama2.c's defaults (-n 256).
        Assert.Equal(0, CliApp.Run(["generate", "--model", _dir, "--prompt-ids", "1", "--temperature", "0", "--print-ids"], outw, errw));
        Assert.Equal(string.Join(' ', Llama2cReferenceTests.LoadGoldenIds()), outw.ToString().Trim());
    }

    [Fact]
    public void TruncatedOrForeignFilesAreRejectedWithTheFileName()
    {
        Directory.CreateDirectory(_dir);
        string path = Path.Combine(_dir, "bad.bin");
        File.WriteAllBytes(path, new byte[10]);
        var e = Assert.Throws<CheckpointFormatException>(() => Llama2cImporter.Convert(path, Path.Combine(_dir, "out")));
        Assert.Contains("bad.bin", e.Message);

        // a plausible header whose arrays are missing
        var header = new[] { 64, 172, 5, 8, 4, 512, 512 }.SelectMany(BitConverter.GetBytes).Concat(new byte[1000]).ToArray();
        File.WriteAllBytes(path, header);
        e = Assert.Throws<CheckpointFormatException>(() => Llama2cImporter.Convert(path, Path.Combine(_dir, "out")));
        Assert.Contains("truncated", e.Message);
        Assert.False(File.Exists(Path.Combine(_dir, "out", "model.safetensors")));
    }
}
