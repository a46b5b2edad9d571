using LoraMix.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Adapters;

/// <summary>Which weight files an adapter is written as.</summary>
[Flags]
public enum AdapterFileFormats
{
    /// <summary><c>adapter_model.safetensors</c> (LoraMix's default, PEFT's current format).</summary>
    Safetensors = 1,
    /// <summary><c>adapter_model.bin</c>: a torch zip pickle that <c>torch.load(weights_only=True)</c> reads (MoE-PEFT's
    /// format, PEFT's legacy one).</summary>
    TorchBin = 2,
    Both = Safetensors | TorchBin,
}

/// <summary>What every adapter format shares: freezing the base, writing fp32 weight files, strict loading by key.</summary>
internal static class AdapterFiles
{
    /// <summary>Reads an <c>adapter_config.json</c> as a JSON object, with typed errors naming the file: it must be a
    /// regular file of at most <see cref="InputFiles.MaxConfigJsonBytes"/> bytes holding a JSON object without duplicate keys.</summary>
    /// <exception cref="AdapterConfigException">The file is missing, not a regular file, too large, not JSON, or repeats a key.</exception>
    public static System.Text.Json.Nodes.JsonObject ReadConfigObject(string path, string adapterKind)
    {
        InputFiles.RequireRegular(path, reason => new AdapterConfigException(path, "(file)", reason));
        if (!File.Exists(path))
            throw new AdapterConfigException(path, "(file)", $"file not found (a {adapterKind} adapter directory needs adapter_config.json)");
        byte[] bytes = InputFiles.ReadAllBytes(path, InputFiles.MaxConfigJsonBytes, reason => new AdapterConfigException(path, "(file)", reason));
        try
        {
            var options = new System.Text.Json.JsonReaderOptions { MaxDepth = InputFiles.MaxJsonDepth };
            InputFiles.ValidateJson(bytes, options,
                key => new AdapterConfigException(path, key, "appears twice; a key may be given once (which one counts is ambiguous)"));
            return System.Text.Json.Nodes.JsonNode.Parse(bytes, documentOptions: new System.Text.Json.JsonDocumentOptions { MaxDepth = InputFiles.MaxJsonDepth })
                    as System.Text.Json.Nodes.JsonObject
                ?? throw new AdapterConfigException(path, "(root)", "expected a JSON object");
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new AdapterConfigException(path, "(json)", $"not valid JSON: {e.Message}");
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException)
        {
            throw new AdapterConfigException(path, "(json)", $"not valid JSON text (invalid UTF-8 or a lone surrogate escape): {e.Message}");
        }
    }

    /// <summary>Sets <c>requires_grad = false</c> on every parameter of the module (the base and all adapters).</summary>
    public static void FreezeAll(nn.Module module)
    {
        foreach (var p in module.parameters()) p.requires_grad = false;
    }

    /// <summary>Writes the tensors in order as fp32 CPU copies to the requested files, each atomically.</summary>
    public static void WriteWeights(string directory, IReadOnlyList<KeyValuePair<string, Tensor>> tensors, AdapterFileFormats formats,
        string safetensorsName, string binName)
    {
        if ((formats & AdapterFileFormats.Both) == 0) throw new ArgumentException("no adapter file format requested", nameof(formats));
        Directory.CreateDirectory(directory);
        var copies = tensors.Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Value.detach().to(ScalarType.Float32).cpu().contiguous())).ToList();
        try
        {
            if (formats.HasFlag(AdapterFileFormats.Safetensors))
                SafetensorsWriter.Write(Path.Combine(directory, safetensorsName), copies, new Dictionary<string, string> { ["format"] = "pt" });
            if (formats.HasFlag(AdapterFileFormats.TorchBin))
                TorchPickleWriter.Write(Path.Combine(directory, binName), copies);
        }
        finally
        {
            foreach (var kv in copies) kv.Value.Dispose();
        }
    }
}

/// <summary>
/// An adapter's weight file: <c>adapter_model.safetensors</c> (preferred) or a torch zip pickle <c>adapter_model.bin</c>,
/// read through the restricted unpickler (only tensor-rebuild globals are accepted). Opening reads only the header
/// (safetensors) or data.pkl and the zip directory (bin): no tensor data is read or allocated until
/// <see cref="ReadStrict"/> has compared every name and shape with what the adapter expects.
/// </summary>
internal sealed class AdapterWeights : IDisposable
{
    private readonly SafetensorsCheckpoint? _safetensors;

    private AdapterWeights(string path, SafetensorsCheckpoint? st, IReadOnlyList<TorchPickleEntry>? bin)
    {
        FilePath = path;
        _safetensors = st;
        Shapes = st is not null
            ? st.TensorNames.ToDictionary(n => n, n => st.GetEntry(n).Shape, StringComparer.Ordinal)
            : bin!.ToDictionary(e => e.Name, e => e.Shape, StringComparer.Ordinal);
        DTypes = st is not null
            ? st.TensorNames.ToDictionary(n => n, n => st.GetEntry(n).ScalarType, StringComparer.Ordinal)
            : bin!.ToDictionary(e => e.Name, e => SafetensorsDTypes.ToScalarType(e.DType), StringComparer.Ordinal);
    }

    /// <summary>Throws a <see cref="CheckpointFormatException"/> naming the first (by name) tensor that is not floating
    /// point: an integer or boolean tensor would otherwise be cast silently into the adapter's float parameters.</summary>
    private void RequireFloatingPoint()
    {
        foreach (var (name, dtype) in DTypes.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            if (!IsFloatingPoint(dtype))
                throw new CheckpointFormatException(FilePath, name,
                    $"dtype {DTypeName(dtype)}; adapter weights must be floating point (F32/F16/BF16)");
    }

    private static bool IsFloatingPoint(ScalarType dtype) =>
        dtype is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64;

    /// <summary>The torch name of a dtype (<c>int64</c>, <c>uint8</c>, <c>bool</c>, ...).</summary>
    private static string DTypeName(ScalarType dtype) => dtype == ScalarType.Byte ? "uint8" : dtype.ToString().ToLowerInvariant();

    public string FilePath { get; }
    public IReadOnlyDictionary<string, long[]> Shapes { get; }
    public IReadOnlyDictionary<string, ScalarType> DTypes { get; }

    /// <summary>Opens the adapter's weight file; every tensor in it must be floating point (F32, F16, BF16 or F64).</summary>
    public static AdapterWeights Open(string directory, string safetensorsName, string binName = "adapter_model.bin")
    {
        // Path.Exists: a FIFO, device or directory under the file's name is refused by the readers, naming it.
        string st = Path.Combine(directory, safetensorsName);
        string bin = Path.Combine(directory, binName);
        var weights = Path.Exists(st) ? new AdapterWeights(st, SafetensorsCheckpoint.OpenFile(st), null)
            : Path.Exists(bin) ? new AdapterWeights(bin, null, TorchPickleReader.ReadEntries(bin))
            : throw new LoraMixException($"{directory}: neither {safetensorsName} nor {binName} found");
        try
        {
            weights.RequireFloatingPoint();
            return weights;
        }
        catch
        {
            weights.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Compares the file's names and shapes with the expected layout, reading no tensor data. The file's key set must
    /// equal the expected one (after <paramref name="canonicalName"/> maps file keys, e.g. legacy names, to expected ones)
    /// with equal shapes; otherwise a <see cref="StateDictMismatchException"/> lists every missing, unexpected and
    /// mis-shaped key.
    /// </summary>
    public void CheckLayout(IEnumerable<(string Name, long[] Shape)> expectedLayout, Func<string, string>? canonicalName = null) =>
        _ = Match(Shapes, expectedLayout.ToDictionary(e => e.Name, e => e.Shape, StringComparer.Ordinal), canonicalName);

    /// <summary>
    /// Fills every expected tensor from the file after <see cref="CheckLayout"/>'s comparison. A bin file is read again
    /// with the same comparison made before any storage is inflated (the file may have changed since it was opened).
    /// </summary>
    public void ReadStrict(IReadOnlyList<KeyValuePair<string, Tensor>> expectedTensors, Func<string, string>? canonicalName = null)
    {
        var expected = expectedTensors.ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        var expectedShapes = expected.ToDictionary(kv => kv.Key, kv => kv.Value.shape, StringComparer.Ordinal);
        var fileKeyOf = Match(Shapes, expectedShapes, canonicalName);
        using var noGrad = no_grad();
        if (_safetensors is not null)
        {
            foreach (var (name, t) in expected) _safetensors.ReadInto(fileKeyOf[name], t);
            return;
        }
        var tensors = TorchPickleReader.Read(FilePath, entries =>
            _ = Match(entries.ToDictionary(e => e.Name, e => e.Shape, StringComparer.Ordinal), expectedShapes, canonicalName));
        try
        {
            foreach (var (name, t) in expected) t.copy_(tensors[fileKeyOf[name]]);
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    /// <summary>Maps each expected name to its file key, or throws listing every mismatch.</summary>
    private Dictionary<string, string> Match(IReadOnlyDictionary<string, long[]> fileShapes, Dictionary<string, long[]> expected,
        Func<string, string>? canonicalName)
    {
        var fileKeyOf = new Dictionary<string, string>(StringComparer.Ordinal);
        var duplicates = new List<string>();
        foreach (var fileKey in fileShapes.Keys)
        {
            string name = canonicalName?.Invoke(fileKey) ?? fileKey;
            if (!fileKeyOf.TryAdd(name, fileKey)) duplicates.Add($"{fileKey} (same tensor as {fileKeyOf[name]})");
        }
        var missing = expected.Keys.Where(k => !fileKeyOf.ContainsKey(k)).ToList();
        var unexpected = fileKeyOf.Where(kv => !expected.ContainsKey(kv.Key)).Select(kv => kv.Value).Concat(duplicates).Order().ToList();
        var misshaped = expected.Where(kv => fileKeyOf.TryGetValue(kv.Key, out var f) && !fileShapes[f].SequenceEqual(kv.Value))
            .Select(kv => $"{fileKeyOf[kv.Key]}: file [{string.Join(", ", fileShapes[fileKeyOf[kv.Key]])}] vs model [{string.Join(", ", kv.Value)}]").ToList();
        if (missing.Count + unexpected.Count + misshaped.Count > 0)
            throw new StateDictMismatchException(FilePath, missing, unexpected, misshaped);
        return fileKeyOf;
    }

    public void Dispose() => _safetensors?.Dispose();
}
