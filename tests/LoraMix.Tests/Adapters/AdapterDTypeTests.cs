using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

/// <summary>Adapter weights must be floating point: an integer tensor is refused at load, naming the file and tensor.</summary>
public sealed class AdapterDTypeTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-adapter-dtype-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static Tensor Ids() => tensor(new long[] { 1, 17, 300, 42 }).unsqueeze(0);

    /// <summary>Saves an adapter of <paramref name="kind"/> in <paramref name="format"/> only and returns its weight file.</summary>
    private string SaveAdapter(string kind, AdapterFileFormats format)
    {
        if (kind == "lora")
        {
            using var model = TestModels.Random(TestModels.Llama, 1);
            var config = new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ["q_proj", "up_proj"] };
            LoraAdapters.Attach(model, config);
            LoraAdapters.Save(model, config, _dir);
            if (format == AdapterFileFormats.TorchBin) Rewrite(Path.Combine(_dir, "adapter_model.safetensors"), Path.Combine(_dir, "adapter_model.bin"), null);
        }
        else
        {
            var config = MixLoraTestKit.Config() with { BaseModelNameOrPath = "tiny" };
            using var model = MixLoraTestKit.Model(config, 2);
            MixLoraAdapters.Save(model, config, _dir, formats: format);
        }
        return Path.Combine(_dir, format == AdapterFileFormats.TorchBin ? "adapter_model.bin" : "adapter_model.safetensors");
    }

    /// <summary>Rewrites a weight file (either format, by extension) with <paramref name="cast"/>'s tensor in int64.</summary>
    private static void Rewrite(string source, string destination, string? cast, ScalarType to = ScalarType.Int64)
    {
        using var scope = NewDisposeScope();
        List<KeyValuePair<string, Tensor>> tensors;
        if (source.EndsWith(".bin", StringComparison.Ordinal))
            tensors = TorchPickleReader.Read(source).ToList();
        else
            using (var st = SafetensorsCheckpoint.OpenFile(source))
                tensors = st.TensorNames.Select(n => new KeyValuePair<string, Tensor>(n, st.ReadTensor(n))).ToList();
        tensors = tensors.Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Key == cast ? (kv.Value * 1000).to(to) : kv.Value)).ToList();
        if (source != destination) File.Delete(source);
        if (destination.EndsWith(".bin", StringComparison.Ordinal)) TorchPickleWriter.Write(destination, tensors);
        else SafetensorsWriter.Write(destination, tensors, new Dictionary<string, string> { ["format"] = "pt" });
    }

    private static IReadOnlyList<string> Names(string file)
    {
        if (file.EndsWith(".bin", StringComparison.Ordinal)) return TorchPickleReader.ReadEntries(file).Select(e => e.Name).ToList();
        using var st = SafetensorsCheckpoint.OpenFile(file);
        return [.. st.TensorNames];
    }

    [Theory]
    [InlineData("lora", AdapterFileFormats.Safetensors)]
    [InlineData("lora", AdapterFileFormats.TorchBin)]
    [InlineData("mixlora", AdapterFileFormats.Safetensors)]
    [InlineData("mixlora", AdapterFileFormats.TorchBin)]
    public void AnIntegerAdapterTensorIsRejectedAndNothingIsAttached(string kind, AdapterFileFormats format)
    {
        using var scope = NewDisposeScope();
        string file = SaveAdapter(kind, format);
        string victim = Names(file).Order(StringComparer.Ordinal).Last();
        Rewrite(file, file, victim);

        using var model = TestModels.Random(TestModels.Llama, 3);
        var before = model.Forward(Ids());
        var e = Assert.Throws<CheckpointFormatException>(() =>
        {
            if (kind == "lora") LoraAdapters.Load(model, _dir);
            else MixLoraAdapters.Load(model, _dir);
        });
        Assert.Equal(file, e.FilePath);
        Assert.Equal(victim, e.TensorName);
        Assert.Equal($"{file}: tensor '{victim}': dtype int64; adapter weights must be floating point (F32/F16/BF16)", e.Message);
        Assert.Empty(LoraAdapters.AdapterNames(model));
        Assert.True(before.equal(model.Forward(Ids())).all().item<bool>());
    }

    [Theory]
    [InlineData(ScalarType.Float16, true)]
    [InlineData(ScalarType.BFloat16, true)]
    [InlineData(ScalarType.Int32, false)]
    [InlineData(ScalarType.Bool, false)]
    public void FloatingPointAdapterTensorsLoadAndOtherDTypesDoNot(ScalarType dtype, bool accepted)
    {
        using var scope = NewDisposeScope();
        string file = SaveAdapter("lora", AdapterFileFormats.Safetensors);
        string victim = Names(file).Order(StringComparer.Ordinal).First();
        Rewrite(file, file, victim, dtype);
        using var model = TestModels.Random(TestModels.Llama, 3);
        if (accepted)
        {
            LoraAdapters.Load(model, _dir);
            Assert.Equal(["default"], LoraAdapters.AdapterNames(model));
        }
        else
        {
            var e = Assert.Throws<CheckpointFormatException>(() => LoraAdapters.Load(model, _dir));
            Assert.Contains($"dtype {(dtype == ScalarType.Bool ? "bool" : "int32")}; adapter weights must be floating point", e.Message);
        }
    }
}
