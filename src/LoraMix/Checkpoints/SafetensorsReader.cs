using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>
/// Reads a <c>.safetensors</c> file: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
/// (<c>{"__metadata__": {...}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}</c>),
/// then the data buffer that the offsets index into.
/// </summary>
/// <remarks>
/// <see cref="Open"/> validates the whole header before any tensor is read, with the checks of the Rust
/// <c>safetensors</c> library and a few more (duplicate keys, negative dimensions, overflow). Tensor data goes from the
/// file straight into the tensor's native memory in chunks; no managed buffer proportional to a tensor or to the file is
/// allocated (only the header, at most 100 MB, is read into managed memory). Reads are positional, so one reader may
/// serve several threads. Every malformation raises <see cref="SafetensorsFormatException"/> naming the file and, where
/// one is at fault, the tensor.
/// </remarks>
public sealed class SafetensorsReader : IDisposable
{
    private readonly SafeFileHandle _handle;
    private readonly Dictionary<string, SafetensorsEntry> _byName;
    private readonly long _dataStart;
    private bool _disposed;

    private SafetensorsReader(string path, SafeFileHandle handle, long dataStart, long fileLength,
        IReadOnlyDictionary<string, string> metadata, List<SafetensorsEntry> entries)
    {
        FilePath = path;
        _handle = handle;
        _dataStart = dataStart;
        FileLength = fileLength;
        Metadata = metadata;
        Entries = entries.AsReadOnly();
        _byName = new Dictionary<string, SafetensorsEntry>(entries.Count, StringComparer.Ordinal);
        foreach (var e in entries) _byName.Add(e.Name, e);
    }

    /// <summary>The file, as passed to <see cref="Open"/>.</summary>
    public string FilePath { get; }

    /// <summary>Size of the file in bytes when it was opened.</summary>
    public long FileLength { get; }

    /// <summary>Offset of the data buffer in the file (8 + header length).</summary>
    public long DataStart => _dataStart;

    /// <summary>The <c>__metadata__</c> strings (empty when the header has none).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>The tensors in file order, that is by position of their data (for files written by the safetensors
    /// library or by <see cref="SafetensorsWriter"/> this is also the header order).</summary>
    public IReadOnlyList<SafetensorsEntry> Entries { get; }

    /// <summary>Opens a file and validates its whole header.</summary>
    /// <exception cref="SafetensorsFormatException">The file is not a well-formed safetensors file, or not a regular file
    /// (a FIFO, socket, device or directory is refused before it is opened).</exception>
    /// <exception cref="IOException">The file cannot be opened or read (e.g. <see cref="FileNotFoundException"/>).</exception>
    public static SafetensorsReader Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        Safetensors.EnsureLittleEndian();
        InputFiles.RequireRegular(path, reason => new SafetensorsFormatException(path, null, reason));
        var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        try
        {
            long length = RandomAccess.GetLength(handle);
            var (headerLength, header) = ReadHeaderBytes(path, handle, length);
            long dataLength = length - 8 - headerLength;
            var (metadata, entries) = ParseHeader(path, header, dataLength);
            return new SafetensorsReader(path, handle, 8 + headerLength, length, metadata, entries);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>True when the file has a tensor of this name.</summary>
    public bool Contains(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _byName.ContainsKey(name);
    }

    /// <summary>The entry of a tensor, or false when the file has none of that name.</summary>
    public bool TryGetEntry(string name, [System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out SafetensorsEntry entry)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _byName.TryGetValue(name, out entry);
    }

    /// <summary>The entry of a tensor.</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name; the message names the file.</exception>
    public SafetensorsEntry GetEntry(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (_byName.TryGetValue(name, out var entry)) return entry;
        throw new KeyNotFoundException(
            $"{FilePath}: no tensor named '{name}' (the file has {Entries.Count}: {Preview(Entries.Select(e => e.Name))})");
    }

    /// <summary>Reads a tensor into a new CPU tensor with the file's dtype and shape.</summary>
    /// <exception cref="KeyNotFoundException">No tensor of that name.</exception>
    public Tensor ReadTensor(string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var entry = GetEntry(name);
        var tensor = empty(entry.Shape, entry.ScalarType, CPU);
        try
        {
            ReadRaw(entry, tensor);
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
        return tensor;
    }

    /// <summary>
    /// Reads a tensor into an existing tensor of the same shape, converting dtype and device as needed (the file may hold
    /// F32 while <paramref name="destination"/> is bf16 on CUDA). A contiguous CPU destination of the file's dtype is filled
    /// straight from the file; otherwise the data goes through one temporary CPU tensor and <c>copy_</c>.
    /// Autograd is not involved: parameters that require grad can be loaded.
    /// </summary>
    /// <exception cref="CheckpointFormatException">The shapes differ; the message names file, tensor and both shapes.</exception>
    /// <exception cref="KeyNotFoundException">No tensor of that name.</exception>
    public void ReadInto(string name, Tensor destination)
    {
        ArgumentNullException.ThrowIfNull(destination);
        ObjectDisposedException.ThrowIf(_disposed, this);
        var entry = GetEntry(name);
        long[] shape = destination.shape;
        if (!shape.AsSpan().SequenceEqual(entry.Shape))
            throw new CheckpointFormatException(FilePath, name,
                $"shape mismatch: the file has {Safetensors.FormatShape(entry.Shape)} ({SafetensorsDTypes.ToName(entry.DType)}) " +
                $"but the destination is {Safetensors.FormatShape(shape)} ({destination.dtype})");
        if (destination.device_type == DeviceType.CPU && destination.dtype == entry.ScalarType && destination.is_contiguous())
        {
            ReadRaw(entry, destination);
            return;
        }
        using var staging = ReadTensor(name);
        using var noGrad = no_grad();
        destination.copy_(staging);
    }

    /// <summary>Closes the file.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _handle.Dispose();
    }

    /// <summary>Copies an entry's bytes into a contiguous CPU tensor of the entry's dtype and shape, in chunks.</summary>
    private unsafe void ReadRaw(SafetensorsEntry entry, Tensor destination)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long total = entry.ByteLength;
        if (total == 0) return;
        byte* basePtr = (byte*)destination.data_ptr();
        long done = 0;
        while (done < total)
        {
            int chunk = (int)Math.Min(total - done, Math.Max(1, Safetensors.ChunkBytes));
            int read = RandomAccess.Read(_handle, new Span<byte>(basePtr + done, chunk), _dataStart + entry.Begin + done);
            if (read <= 0)
                throw new SafetensorsFormatException(FilePath, entry.Name,
                    $"the file ended at byte {_dataStart + entry.Begin + done} while reading data_offsets [{entry.Begin}, {entry.End}] " +
                    "(was it truncated or replaced after it was opened?)");
            done += read;
        }
        GC.KeepAlive(destination);
    }

    private static (long HeaderLength, byte[] Header) ReadHeaderBytes(string path, SafeFileHandle handle, long length)
    {
        if (length < 8)
            throw new SafetensorsFormatException(path, null,
                $"the file is {length} bytes, too short for the 8-byte header length that starts a safetensors file");
        Span<byte> prefix = stackalloc byte[8];
        ReadExactly(path, handle, prefix, 0);
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        if (n == 0)
            throw new SafetensorsFormatException(path, null, "the header length is 0; a safetensors header is at least '{}'");
        if (n > (ulong)Safetensors.MaxHeaderBytes)
            throw new SafetensorsFormatException(path, null,
                $"the header length {n} exceeds the {Safetensors.MaxHeaderBytes}-byte limit (not a safetensors file, or a corrupt one)");
        if (n > (ulong)(length - 8))
            throw new SafetensorsFormatException(path, null,
                $"the header length {n} is larger than the {length - 8} bytes that follow it (truncated file?)");
        var header = new byte[(int)n];
        ReadExactly(path, handle, header, 8);
        return ((long)n, header);
    }

    private static void ReadExactly(string path, SafeFileHandle handle, Span<byte> buffer, long offset)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int read = RandomAccess.Read(handle, buffer[done..], offset + done);
            if (read <= 0)
                throw new SafetensorsFormatException(path, null, $"the file ended at byte {offset + done} while reading the header");
            done += read;
        }
    }

    /// <summary>Parses and validates a header; <paramref name="dataLength"/> is the size of the data buffer.</summary>
    internal static (IReadOnlyDictionary<string, string> Metadata, List<SafetensorsEntry> Entries) ParseHeader(
        string path, byte[] header, long dataLength)
    {
        try
        {
            _ = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true).GetCharCount(header);
        }
        catch (DecoderFallbackException e)
        {
            throw new SafetensorsFormatException(path, null,
                $"the header is not valid UTF-8 (bad byte sequence at header byte {e.Index})", e);
        }

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(header, new JsonDocumentOptions { MaxDepth = 64 });
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException(path, null, $"the header is not valid JSON: {e.Message}", e);
        }

        try
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SafetensorsFormatException(path, null, $"the header is a JSON {Kind(root)}, expected an object");

            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var entries = new List<SafetensorsEntry>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in root.EnumerateObject())
            {
                string name = property.Name;
                if (!seen.Add(name))
                    throw new SafetensorsFormatException(path, name == "__metadata__" ? null : name,
                        name == "__metadata__" ? "'__metadata__' appears twice in the header" : "the name appears twice in the header");
                if (name == "__metadata__")
                    ParseMetadata(path, property.Value, metadata);
                else
                    entries.Add(ParseEntry(path, name, property.Value, dataLength));
            }

            return (metadata, CheckCoverage(path, entries, dataLength));
        }
        catch (InvalidOperationException e)
        {
            // System.Text.Json accepts "\uD800" syntactically but cannot turn a lone surrogate into a .NET string.
            throw new SafetensorsFormatException(path, null,
                $"the header has a JSON string that is not valid Unicode (a lone UTF-16 surrogate escape): {e.Message}", e);
        }
        finally
        {
            doc.Dispose();
        }
    }

    private static void ParseMetadata(string path, JsonElement value, Dictionary<string, string> metadata)
    {
        if (value.ValueKind == JsonValueKind.Null) return;
        if (value.ValueKind != JsonValueKind.Object)
            throw new SafetensorsFormatException(path, null,
                $"'__metadata__' is a JSON {Kind(value)}; it must be an object whose values are strings");
        foreach (var p in value.EnumerateObject())
        {
            if (p.Value.ValueKind != JsonValueKind.String)
                throw new SafetensorsFormatException(path, null,
                    $"'__metadata__' key '{p.Name}' has a JSON {Kind(p.Value)} value; metadata values must be strings");
            if (!metadata.TryAdd(p.Name, p.Value.GetString()!))
                throw new SafetensorsFormatException(path, null, $"'__metadata__' key '{p.Name}' appears twice");
        }
    }

    private static SafetensorsEntry ParseEntry(string path, string name, JsonElement value, long dataLength)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw new SafetensorsFormatException(path, name,
                $"the header entry is a JSON {Kind(value)}; expected an object with 'dtype', 'shape' and 'data_offsets'");

        JsonElement? dtypeEl = null, shapeEl = null, offsetsEl = null;
        foreach (var p in value.EnumerateObject())
        {
            switch (p.Name)
            {
                case "dtype": dtypeEl = Once(dtypeEl, p); break;
                case "shape": shapeEl = Once(shapeEl, p); break;
                case "data_offsets": offsetsEl = Once(offsetsEl, p); break;
                default: break; // like the Rust library, unknown fields are ignored
            }
        }

        JsonElement Once(JsonElement? previous, JsonProperty p) => previous is null
            ? p.Value
            : throw new SafetensorsFormatException(path, name, $"'{p.Name}' appears twice in the header entry");

        if (dtypeEl is not { } dtypeValue)
            throw new SafetensorsFormatException(path, name, "the header entry has no 'dtype'");
        if (shapeEl is not { } shapeValue)
            throw new SafetensorsFormatException(path, name, "the header entry has no 'shape'");
        if (offsetsEl is not { } offsetsValue)
            throw new SafetensorsFormatException(path, name, "the header entry has no 'data_offsets'");

        if (dtypeValue.ValueKind != JsonValueKind.String)
            throw new SafetensorsFormatException(path, name, $"'dtype' is a JSON {Kind(dtypeValue)}, expected a string such as \"F32\"");
        string dtypeName = dtypeValue.GetString()!;
        if (!SafetensorsDTypes.TryParse(dtypeName, out var dtype))
            throw new SafetensorsFormatException(path, name, SafetensorsDTypes.IsKnownUnsupported(dtypeName)
                ? $"dtype '{dtypeName}' is not supported (TorchSharp has no such dtype); supported: {SafetensorsDTypes.SupportedNames}"
                : $"unknown dtype '{Truncate(dtypeName)}'; supported: {SafetensorsDTypes.SupportedNames}");

        if (shapeValue.ValueKind != JsonValueKind.Array)
            throw new SafetensorsFormatException(path, name, $"'shape' is a JSON {Kind(shapeValue)}, expected an array of non-negative integers");
        var shape = new long[shapeValue.GetArrayLength()];
        int i = 0;
        foreach (var d in shapeValue.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long dim))
            {
                if (d.ValueKind == JsonValueKind.Number && d.GetRawText().StartsWith('-'))
                    throw new SafetensorsFormatException(path, name, $"negative dimension {Truncate(d.GetRawText())} in shape {Raw(shapeValue)}");
                throw new SafetensorsFormatException(path, name,
                    $"shape {Raw(shapeValue)} must be an array of non-negative integers below 2^63; found {Truncate(d.GetRawText())}");
            }
            if (dim < 0)
                throw new SafetensorsFormatException(path, name, $"negative dimension {dim} in shape {Raw(shapeValue)}");
            shape[i++] = dim;
        }
        if (!Safetensors.TryByteLength(shape, dtype, out long nbytes))
            throw new SafetensorsFormatException(path, name,
                $"shape {Safetensors.FormatShape(shape)} of {dtypeName} overflows a 64-bit byte count");

        if (offsetsValue.ValueKind != JsonValueKind.Array || offsetsValue.GetArrayLength() != 2)
            throw new SafetensorsFormatException(path, name,
                $"'data_offsets' is {Raw(offsetsValue)}; expected an array of two non-negative integers [begin, end]");
        long begin = Offset(offsetsValue[0]), end = Offset(offsetsValue[1]);

        long Offset(JsonElement e) => e.ValueKind == JsonValueKind.Number && e.TryGetInt64(out long v) && v >= 0
            ? v
            : throw new SafetensorsFormatException(path, name,
                $"data_offsets {Raw(offsetsValue)} must be two non-negative integers below 2^63 (within the data buffer of {dataLength} bytes)");

        if (begin > end)
            throw new SafetensorsFormatException(path, name, $"data_offsets [{begin}, {end}] begin after they end");
        if (end - begin != nbytes)
            throw new SafetensorsFormatException(path, name,
                $"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {Safetensors.FormatShape(shape)} of {dtypeName} needs {nbytes}");
        if (end > dataLength)
            throw new SafetensorsFormatException(path, name,
                $"data_offsets [{begin}, {end}] go beyond the data buffer, which is {dataLength} bytes (truncated file?)");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }

    /// <summary>The tensors must tile the data buffer exactly: no overlap, no hole, nothing after the last tensor
    /// (the Rust library's "incomplete buffer" check). Returns the entries sorted by position (stable: ties keep header order).</summary>
    private static List<SafetensorsEntry> CheckCoverage(string path, List<SafetensorsEntry> headerOrder, long dataLength)
    {
        var entries = headerOrder.OrderBy(e => e.Begin).ThenBy(e => e.End).ToList();
        long covered = 0;
        SafetensorsEntry? previous = null;
        foreach (var e in entries)
        {
            if (e.Begin < covered)
                throw new SafetensorsFormatException(path, e.Name,
                    $"data_offsets [{e.Begin}, {e.End}] overlap tensor '{previous!.Name}' at [{previous.Begin}, {previous.End}]");
            if (e.Begin > covered)
                throw new SafetensorsFormatException(path, e.Name,
                    $"data_offsets [{e.Begin}, {e.End}] leave a hole: data bytes [{covered}, {e.Begin}) belong to no tensor");
            covered = e.End;
            previous = e;
        }
        if (covered != dataLength)
            throw new SafetensorsFormatException(path, null,
                $"incomplete buffer: the tensors cover {covered} bytes but the data buffer after the header is {dataLength} bytes");
        return entries;
    }

    private static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        JsonValueKind.Null => "null",
        _ => e.ValueKind.ToString(),
    };

    private static string Raw(JsonElement e) => Truncate(e.GetRawText());

    private static string Truncate(string s) => s.Length <= 120 ? s : s[..120] + "...";

    internal static string Preview(IEnumerable<string> names)
    {
        var list = names.Take(11).ToList();
        return list.Count == 0 ? "none" : string.Join(", ", list.Take(10)) + (list.Count > 10 ? ", ..." : "");
    }
}
