using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.RegularExpressions;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>
/// The weights of a Hugging Face model directory: either one <c>model.safetensors</c>, or shards listed by
/// <c>model.safetensors.index.json</c> (<c>{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}</c>).
/// </summary>
/// <remarks>All shards are opened and validated up front, and the index is checked against them.</remarks>
public sealed partial class SafetensorsCheckpoint : IDisposable
{
    private readonly List<SafetensorsReader> _readers;
    private readonly Dictionary<string, SafetensorsReader> _byTensor;
    private readonly List<string> _names;
    private bool _disposed;

    private SafetensorsCheckpoint(string source, List<SafetensorsReader> readers, Dictionary<string, SafetensorsReader> byTensor,
        List<string> names)
    {
        Source = source;
        _readers = readers;
        _byTensor = byTensor;
        _names = names;
    }

    /// <summary>The file or index the checkpoint was opened from.</summary>
    public string Source { get; }

    /// <summary>The safetensors files, in shard order (file name order for a sharded checkpoint).</summary>
    public IReadOnlyList<string> FilePaths => _readers.Select(r => r.FilePath).ToList();

    /// <summary>Every tensor name: shard by shard, in file order within a shard.</summary>
    public IReadOnlyCollection<string> TensorNames => _names.AsReadOnly();

    /// <summary>The <c>__metadata__</c> of the first (or only) file.</summary>
    public IReadOnlyDictionary<string, string> Metadata =>
        _readers.Count > 0 ? _readers[0].Metadata : new Dictionary<string, string>();

    /// <summary>Opens <c>model.safetensors</c> in <paramref name="directory"/> or, when there is none, the sharded
    /// checkpoint described by <c>model.safetensors.index.json</c> (the precedence of Hugging Face transformers).</summary>
    /// <exception cref="CheckpointFormatException">Neither file exists; the index is malformed, names a missing shard, or
    /// disagrees with the shards (a tensor absent from its shard, a shard tensor not in weight_map, a tensor in two shards).</exception>
    /// <exception cref="SafetensorsFormatException">A safetensors file is malformed.</exception>
    public static SafetensorsCheckpoint OpenDirectory(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        if (!Directory.Exists(directory))
            throw new CheckpointFormatException(directory, null, "the checkpoint directory does not exist");
        // Path.Exists, not File.Exists: a directory (or FIFO, device) under a checkpoint name is refused by name.
        string single = Path.Combine(directory, Safetensors.SingleFileName);
        if (Path.Exists(single)) return OpenFile(single);
        string index = Path.Combine(directory, Safetensors.IndexFileName);
        if (Path.Exists(index)) return OpenIndex(directory, index);
        throw new CheckpointFormatException(directory, null,
            $"no {Safetensors.SingleFileName} or {Safetensors.IndexFileName} in the directory; expected Hugging Face safetensors weights");
    }

    /// <summary>Opens a single safetensors file.</summary>
    /// <exception cref="SafetensorsFormatException">The file is malformed.</exception>
    public static SafetensorsCheckpoint OpenFile(string path)
    {
        var reader = SafetensorsReader.Open(path);
        var byTensor = reader.Entries.ToDictionary(e => e.Name, _ => reader, StringComparer.Ordinal);
        return new SafetensorsCheckpoint(path, [reader], byTensor, reader.Entries.Select(e => e.Name).ToList());
    }

    private static SafetensorsCheckpoint OpenIndex(string directory, string index)
    {
        var weightMap = ReadWeightMap(index);
        var readers = new List<SafetensorsReader>();
        try
        {
            var shardOrder = new List<string>();
            var shardTensors = new Dictionary<string, List<string>>(StringComparer.Ordinal);
            foreach (var (tensor, shard) in weightMap)
            {
                if (!shardTensors.TryGetValue(shard, out var list))
                {
                    string shardPath = Path.Combine(directory, shard);
                    if (!Path.Exists(shardPath))
                        throw new CheckpointFormatException(index, tensor,
                            $"weight_map puts it in shard '{shard}', which does not exist in {directory}");
                    shardTensors[shard] = list = [];
                    shardOrder.Add(shard);
                }
                list.Add(tensor);
            }

            shardOrder.Sort(StringComparer.Ordinal);
            foreach (string shard in shardOrder) readers.Add(SafetensorsReader.Open(Path.Combine(directory, shard)));

            var shardsOf = new Dictionary<string, List<string>>(StringComparer.Ordinal);
            foreach (var reader in readers)
                foreach (var entry in reader.Entries)
                {
                    if (!shardsOf.TryGetValue(entry.Name, out var list)) shardsOf[entry.Name] = list = [];
                    list.Add(Path.GetFileName(reader.FilePath));
                }
            foreach (var (tensor, shards) in shardsOf)
                if (shards.Count > 1)
                    throw new CheckpointFormatException(index, tensor, $"the tensor appears in two shards, '{shards[0]}' and '{shards[1]}'");

            var byTensor = new Dictionary<string, SafetensorsReader>(StringComparer.Ordinal);
            var names = new List<string>();
            foreach (var reader in readers)
            {
                string shard = Path.GetFileName(reader.FilePath);
                foreach (var entry in reader.Entries)
                {
                    if (!weightMap.TryGetValue(entry.Name, out var mapped))
                        throw new CheckpointFormatException(index, entry.Name, $"shard '{shard}' holds the tensor but weight_map does not list it");
                    if (mapped != shard)
                        throw new CheckpointFormatException(index, entry.Name, $"shard '{shard}' holds the tensor but weight_map puts it in '{mapped}'");
                    byTensor[entry.Name] = reader;
                    names.Add(entry.Name);
                }
            }
            foreach (var (tensor, shard) in weightMap)
                if (!byTensor.ContainsKey(tensor))
                    throw new CheckpointFormatException(index, tensor, $"weight_map puts it in shard '{shard}', which does not contain it");
            return new SafetensorsCheckpoint(index, readers, byTensor, names);
        }
        catch
        {
            foreach (var r in readers) r.Dispose();
            throw;
        }
    }

    private static Dictionary<string, string> ReadWeightMap(string index)
    {
        byte[] bytes = InputFiles.ReadAllBytes(index, Safetensors.MaxHeaderBytes, reason => new CheckpointFormatException(index, null, reason));
        JsonDocument doc;
        try
        {
            InputFiles.ValidateJson(bytes, new JsonReaderOptions { MaxDepth = 64 },
                key => key.StartsWith("weight_map.", StringComparison.Ordinal)
                    ? new CheckpointFormatException(index, key["weight_map.".Length..], "the tensor appears twice in weight_map")
                    : new CheckpointFormatException(index, null, $"the key '{InputFiles.Shorten(key)}' appears twice in the index"));
            doc = JsonDocument.Parse(bytes, new JsonDocumentOptions { MaxDepth = 64 });
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException(index, null, $"the index is not valid JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            throw new CheckpointFormatException(index, null, $"the index has a string that is not valid Unicode: {e.Message}", e);
        }
        try
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new CheckpointFormatException(index, null, "the index has no \"weight_map\" object ({\"tensor name\": \"shard file\", ...})");
            var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var p in map.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String)
                    throw new CheckpointFormatException(index, p.Name, "its weight_map value is not a string (a shard file name)");
                string shard = p.Value.GetString()!;
                if (shard.Length == 0 || shard is "." or ".." || Path.GetFileName(shard) != shard || shard.Contains('\\'))
                    throw new CheckpointFormatException(index, p.Name, $"weight_map names shard '{shard}', which is not a plain file name");
                if (!weightMap.TryAdd(p.Name, shard))
                    throw new CheckpointFormatException(index, p.Name, "the tensor appears twice in weight_map");
            }
            return weightMap;
        }
        catch (InvalidOperationException e)
        {
            throw new CheckpointFormatException(index, null, $"the index has a string that is not valid Unicode: {e.Message}", e);
        }
        finally
        {
            doc.Dispose();
        }
    }

    /// <summary>True when the checkpoint has a tensor of this name.</summary>
    public bool Contains(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _byTensor.ContainsKey(name);
    }

    /// <summary>The entry of a tensor (offsets are relative to its own shard).</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name; the message names the checkpoint.</exception>
    public SafetensorsEntry GetEntry(string name) => ReaderOf(name).GetEntry(name);

    /// <summary>Reads a tensor into a new CPU tensor with the file's dtype and shape.</summary>
    public Tensor ReadTensor(string name) => ReaderOf(name).ReadTensor(name);

    /// <summary>Reads a tensor into <paramref name="destination"/> (same shape; dtype and device are converted).</summary>
    /// <exception cref="CheckpointFormatException">The shapes differ.</exception>
    public void ReadInto(string name, Tensor destination) => ReaderOf(name).ReadInto(name, destination);

    private SafetensorsReader ReaderOf(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_byTensor.TryGetValue(name, out var reader)) return reader;
        throw new KeyNotFoundException(
            $"{Source}: no tensor named '{name}' (the checkpoint has {_names.Count}: {SafetensorsReader.Preview(_names)})");
    }

    /// <summary>Closes every file.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var r in _readers) r.Dispose();
    }

    /// <summary>
    /// Writes a model directory the way Hugging Face <c>save_pretrained</c> does. Tensors are assigned to shards in
    /// <paramref name="layout"/> order, starting a new shard whenever the next tensor would push the current one past
    /// <paramref name="maxShardBytes"/> of tensor data (a tensor bigger than that gets a shard of its own; empty tensors
    /// never start a shard). With one shard
    /// the result is a plain <c>model.safetensors</c> and no index; otherwise <c>model-00001-of-0000K.safetensors</c> ...
    /// plus <c>model.safetensors.index.json</c> (<c>metadata.total_size</c> = bytes of tensor data, <c>weight_map</c> sorted by
    /// name), written last. Every file is written atomically (see <see cref="SafetensorsWriter"/>), and shards are first
    /// written under hidden temporary names and renamed into place only once all of them are complete, so a failure
    /// (e.g. <paramref name="produce"/> throwing) leaves the directory as it was; each shard carries
    /// <paramref name="metadata"/>. Afterwards, files of an earlier save that the new one supersedes are removed: a stale
    /// index or stale <c>model-*-of-*.safetensors</c> shards, or a stale <c>model.safetensors</c> when the new save is sharded.
    /// </summary>
    /// <param name="directory">Target folder (created if needed).</param>
    /// <param name="layout">Name, stored dtype and shape of every tensor.</param>
    /// <param name="produce">Produces each tensor on demand, one at a time; see <see cref="SafetensorsWriter.Write(string, IReadOnlyList{SafetensorsTensorSpec}, Func{SafetensorsTensorSpec, Tensor}, IReadOnlyDictionary{string, string}?)"/>.</param>
    /// <param name="maxShardBytes">Maximum tensor bytes per shard (default 5 GiB).</param>
    /// <param name="metadata">Optional <c>__metadata__</c> strings for every shard (e.g. <c>{"format": "pt"}</c>).</param>
    public static void WriteDirectory(string directory, IReadOnlyList<SafetensorsTensorSpec> layout,
        Func<SafetensorsTensorSpec, Tensor> produce, long maxShardBytes = 5L << 30, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(produce);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);

        // Validate the whole layout (unique names, sizes) before writing anything.
        _ = SafetensorsWriter.Prepare(directory, layout, metadata);

        var shards = new List<List<SafetensorsTensorSpec>>();
        var current = new List<SafetensorsTensorSpec>();
        long currentBytes = 0, totalBytes = 0;
        foreach (var spec in layout)
        {
            long bytes = spec.ByteLength;
            if (current.Count > 0 && bytes > 0 && currentBytes + bytes > maxShardBytes)
            {
                shards.Add(current);
                current = [];
                currentBytes = 0;
            }
            current.Add(spec);
            currentBytes += bytes;
            totalBytes += bytes;
        }
        if (current.Count > 0 || shards.Count == 0) shards.Add(current);

        Directory.CreateDirectory(directory);
        string single = Path.Combine(directory, Safetensors.SingleFileName);
        string index = Path.Combine(directory, Safetensors.IndexFileName);
        var written = new HashSet<string>(StringComparer.Ordinal);
        if (shards.Count == 1)
        {
            SafetensorsWriter.Write(single, shards[0], produce, metadata);
            DeleteIfExists(index);
        }
        else
        {
            var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
            // Shards are staged under hidden names and renamed only once all of them are complete, so a failure
            // halfway leaves an earlier checkpoint in the directory intact (no mix of old and new shards).
            var staged = new List<(string Temp, string Final)>();
            try
            {
                for (int i = 0; i < shards.Count; i++)
                {
                    string file = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                    string temp = Path.Combine(directory, $".{file}.{Environment.ProcessId}.{Guid.NewGuid():N}.partial");
                    staged.Add((temp, Path.Combine(directory, file)));
                    SafetensorsWriter.Write(temp, shards[i], produce, metadata);
                    written.Add(file);
                    foreach (var spec in shards[i]) weightMap[spec.Name] = file;
                }
                foreach (var (temp, final) in staged) File.Move(temp, final, overwrite: true);
            }
            catch
            {
                foreach (var (temp, _) in staged)
                    try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
                throw;
            }
            AtomicFile.Write(index, stream => WriteIndex(stream, totalBytes, weightMap));
            DeleteIfExists(single);
        }
        foreach (string stale in Directory.EnumerateFiles(directory, "model-*-of-*.safetensors"))
        {
            string name = Path.GetFileName(stale);
            if (ShardName().IsMatch(name) && !written.Contains(name)) DeleteIfExists(stale);
        }
    }

    private static void WriteIndex(Stream stream, long totalBytes, SortedDictionary<string, string> weightMap)
    {
        var options = new JsonWriterOptions { Indented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        using (var w = new Utf8JsonWriter(stream, options))
        {
            w.WriteStartObject();
            w.WriteStartObject("metadata");
            w.WriteNumber("total_size", totalBytes);
            w.WriteEndObject();
            w.WriteStartObject("weight_map");
            foreach (var (name, file) in weightMap) w.WriteString(name, file);
            w.WriteEndObject();
            w.WriteEndObject();
        }
        stream.Write("\n"u8);
    }

    private static void DeleteIfExists(string path)
    {
        if (File.Exists(path)) File.Delete(path);
    }

    [GeneratedRegex(@"^model-\d{5}-of-\d{5}\.safetensors$", RegexOptions.CultureInvariant)]
    private static partial Regex ShardName();
}
