using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>
/// Writes <c>.safetensors</c> files byte-for-byte as the Python/Rust <c>safetensors</c> library
/// (<c>safetensors.torch.save_file</c>) does.
/// </summary>
/// <remarks>
/// <para><b>Layout.</b> Like the Rust library's <c>prepare</c>, the tensors are sorted by dtype in <em>descending</em>
/// order of the Rust <c>Dtype</c> enum, which lists dtypes by increasing alignment: I64, F64, F32, I32, BF16, F16, I16,
/// I8, U8, BOOL (so larger elements come first, and among dtypes of the same size the enum order decides, e.g. every
/// I64 tensor precedes every F64 tensor); ties are broken by name, ascending, comparing UTF-8 bytes (Rust's
/// <c>String</c> order). The data is laid out back to back in that order, starting at offset 0, and the header lists
/// the tensors in that same order, so that every tensor is aligned to its element size within the data buffer.</para>
/// <para><b>Header.</b> Compact JSON (no spaces) as serde_json writes it: <c>"__metadata__"</c> first when metadata is
/// given (keys sorted by UTF-8 bytes, since the Rust library's map has no defined order), then one
/// <c>{"dtype":..,"shape":[..],"data_offsets":[begin,end]}</c> object per tensor (<c>[]</c> for a 0-d shape). Strings escape
/// only <c>"</c>, <c>\</c> and control characters (<c>\b \t \n \f \r</c>, others as <c>\u00XX</c>); other characters are
/// written as raw UTF-8. The header is padded with spaces (0x20) so that 8 + N is a multiple of 8, and N, written as a
/// little-endian u64, counts UTF-8 bytes.</para>
/// <para><b>Safety.</b> Files are written atomically (a temp file in the same folder, flushed, then renamed over the
/// target); if anything fails the target is untouched and the temp file removed. Tensors are streamed one at a time from
/// their native memory (made contiguous and moved to the CPU first), in chunks, so memory stays bounded by the largest
/// tensor.</para>
/// </remarks>
public static class SafetensorsWriter
{
    /// <summary>Writes tensors under their names, each stored as its own dtype. Tensors may live on any device.</summary>
    /// <param name="path">Target file; replaced atomically.</param>
    /// <param name="tensors">Name/tensor pairs; names must be unique. The tensors are not disposed.</param>
    /// <param name="metadata">Optional <c>__metadata__</c> strings (e.g. <c>{"format": "pt"}</c>).</param>
    /// <exception cref="ArgumentException">Duplicate names, a reserved name or an unsupported dtype.</exception>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var byName = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        var layout = new List<SafetensorsTensorSpec>();
        foreach (var (name, tensor) in tensors)
        {
            ArgumentNullException.ThrowIfNull(name, nameof(tensors));
            ArgumentNullException.ThrowIfNull(tensor, nameof(tensors));
            if (!byName.TryAdd(name, tensor))
                throw new ArgumentException($"{path}: tensor '{name}' is given twice", nameof(tensors));
            if (!SafetensorsDTypes.TryFromScalarType(tensor.dtype, out var dtype))
                throw new ArgumentException(
                    $"{path}: tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store here; supported: {SafetensorsDTypes.SupportedNames}",
                    nameof(tensors));
            layout.Add(new SafetensorsTensorSpec(name, dtype, tensor.shape));
        }
        Write(path, layout, spec => byName[spec.Name], metadata);
    }

    /// <summary>
    /// Streaming writer for models too big to hold twice: the layout is declared up front (which fixes the header), then
    /// <paramref name="produce"/> is called once per tensor, in data order, and each tensor is written before the next one
    /// is produced.
    /// </summary>
    /// <param name="path">Target file; replaced atomically.</param>
    /// <param name="layout">Name, stored dtype and shape of every tensor; names must be unique.</param>
    /// <param name="produce">
    /// Returns the tensor for a spec, with the spec's shape, on any device. If its dtype differs from the spec's it is
    /// converted. Each call runs inside its own <see cref="TorchSharp.DisposeScope"/> that is disposed once the tensor is
    /// written: tensors created by <paramref name="produce"/> (including the one it returns) are freed right away, while
    /// tensors that existed before (e.g. model parameters returned as they are) are left alone.
    /// </param>
    /// <param name="metadata">Optional <c>__metadata__</c> strings.</param>
    /// <exception cref="ArgumentException">Duplicate or reserved names, negative dimensions, an invalid dtype.</exception>
    /// <exception cref="InvalidOperationException"><paramref name="produce"/> returned null or a tensor of another shape.</exception>
    public static void Write(string path, IReadOnlyList<SafetensorsTensorSpec> layout, Func<SafetensorsTensorSpec, Tensor> produce,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(produce);
        Safetensors.EnsureLittleEndian();
        var plan = Prepare(path, layout, metadata);
        AtomicFile.Write(path, stream =>
        {
            stream.Write(plan.Header);
            foreach (var (spec, bytes) in plan.Ordered)
                WriteTensor(path, stream, spec, bytes, produce);
        });
    }

    /// <summary>The sorted layout and the complete header (length prefix, JSON, padding).</summary>
    internal sealed record Plan(byte[] Header, IReadOnlyList<(SafetensorsTensorSpec Spec, long Bytes)> Ordered, long DataBytes);

    /// <summary>Validates a layout, sorts it the way the Rust library does and serializes the header.</summary>
    internal static Plan Prepare(string path, IReadOnlyList<SafetensorsTensorSpec> layout, IReadOnlyDictionary<string, string>? metadata)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        var items = new List<(SafetensorsTensorSpec Spec, byte[] Utf8Name, long Bytes)>(layout.Count);
        foreach (var spec in layout)
        {
            if (spec is null) throw new ArgumentException($"{path}: the layout contains null", nameof(layout));
            ArgumentNullException.ThrowIfNull(spec.Name, nameof(layout));
            ArgumentNullException.ThrowIfNull(spec.Shape, nameof(layout));
            if (!Enum.IsDefined(spec.DType))
                throw new ArgumentException($"{path}: tensor '{spec.Name}' has invalid dtype {(int)spec.DType}", nameof(layout));
            if (spec.Name == "__metadata__")
                throw new ArgumentException($"{path}: '__metadata__' is reserved and cannot name a tensor", nameof(layout));
            if (!names.Add(spec.Name))
                throw new ArgumentException($"{path}: tensor '{spec.Name}' appears twice in the layout", nameof(layout));
            long bytes;
            try
            {
                bytes = spec.ByteLength;
            }
            catch (ArgumentException e)
            {
                throw new ArgumentException($"{path}: {e.Message}", nameof(layout), e);
            }
            items.Add((spec, Utf8(path, spec.Name), bytes));
        }

        items.Sort((a, b) =>
        {
            int byDtype = SafetensorsDTypes.RustOrder(b.Spec.DType).CompareTo(SafetensorsDTypes.RustOrder(a.Spec.DType));
            return byDtype != 0 ? byDtype : a.Utf8Name.AsSpan().SequenceCompareTo(b.Utf8Name);
        });

        var json = new MemoryStream();
        json.WriteByte((byte)'{');
        bool first = true;
        if (metadata is not null)
        {
            WriteAscii(json, "\"__metadata__\":{");
            var pairs = metadata.Select(kv =>
            {
                ArgumentNullException.ThrowIfNull(kv.Key, nameof(metadata));
                if (kv.Value is null) throw new ArgumentException($"{path}: metadata value for '{kv.Key}' is null", nameof(metadata));
                return (Key: Utf8(path, kv.Key), Value: Utf8(path, kv.Value));
            }).ToList();
            pairs.Sort((a, b) => a.Key.AsSpan().SequenceCompareTo(b.Key));
            for (int i = 0; i < pairs.Count; i++)
            {
                if (i > 0) json.WriteByte((byte)',');
                WriteJsonString(json, pairs[i].Key);
                json.WriteByte((byte)':');
                WriteJsonString(json, pairs[i].Value);
            }
            json.WriteByte((byte)'}');
            first = false;
        }

        long offset = 0;
        var ordered = new List<(SafetensorsTensorSpec, long)>(items.Count);
        foreach (var (spec, utf8Name, bytes) in items)
        {
            if (!first) json.WriteByte((byte)',');
            first = false;
            WriteJsonString(json, utf8Name);
            WriteAscii(json, ":{\"dtype\":\"");
            WriteAscii(json, SafetensorsDTypes.ToName(spec.DType));
            WriteAscii(json, "\",\"shape\":[");
            WriteAscii(json, string.Join(",", spec.Shape.Select(d => d.ToString(CultureInfo.InvariantCulture))));
            WriteAscii(json, "],\"data_offsets\":[");
            long end = checked(offset + bytes);
            WriteAscii(json, offset.ToString(CultureInfo.InvariantCulture));
            json.WriteByte((byte)',');
            WriteAscii(json, end.ToString(CultureInfo.InvariantCulture));
            WriteAscii(json, "]}");
            ordered.Add((spec, bytes));
            offset = end;
        }
        json.WriteByte((byte)'}');

        long n = json.Length;
        long padded = (n + 7) / 8 * 8;
        if (padded > Safetensors.MaxHeaderBytes)
            throw new ArgumentException(
                $"{path}: the header would be {padded} bytes, more than the {Safetensors.MaxHeaderBytes}-byte limit readers accept", nameof(layout));
        var header = new byte[8 + padded];
        BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)padded);
        json.GetBuffer().AsSpan(0, (int)n).CopyTo(header.AsSpan(8));
        header.AsSpan(8 + (int)n).Fill((byte)' ');
        return new Plan(header, ordered, offset);
    }

    private static void WriteTensor(string path, Stream stream, SafetensorsTensorSpec spec, long bytes,
        Func<SafetensorsTensorSpec, Tensor> produce)
    {
        using var scope = NewDisposeScope();
        var tensor = produce(spec)
            ?? throw new InvalidOperationException($"{path}: the producer returned null for tensor '{spec.Name}'");
        long[] shape = tensor.shape;
        if (!shape.AsSpan().SequenceEqual(spec.Shape))
            throw new InvalidOperationException(
                $"{path}: the producer returned shape {Safetensors.FormatShape(shape)} for tensor '{spec.Name}', " +
                $"but the layout declares {Safetensors.FormatShape(spec.Shape)}");
        if (bytes == 0) return;
        var source = tensor;
        var dtype = SafetensorsDTypes.ToScalarType(spec.DType);
        if (source.dtype != dtype) source = source.to(dtype);
        if (source.device_type != DeviceType.CPU) source = source.cpu();
        if (!source.is_contiguous()) source = source.contiguous();
        WriteNative(stream, source, bytes);
    }

    /// <summary>Writes the first <paramref name="bytes"/> bytes of a contiguous CPU tensor, straight from native memory.</summary>
    private static unsafe void WriteNative(Stream stream, Tensor source, long bytes)
    {
        byte* basePtr = (byte*)source.data_ptr();
        long done = 0;
        while (done < bytes)
        {
            int chunk = (int)Math.Min(bytes - done, Math.Max(1, Safetensors.ChunkBytes));
            stream.Write(new ReadOnlySpan<byte>(basePtr + done, chunk));
            done += chunk;
        }
        GC.KeepAlive(source);
    }

    private static readonly UTF8Encoding s_strictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private static byte[] Utf8(string path, string s)
    {
        try
        {
            return s_strictUtf8.GetBytes(s);
        }
        catch (EncoderFallbackException e)
        {
            throw new ArgumentException($"{path}: '{s}' is not valid Unicode (lone UTF-16 surrogate)", e);
        }
    }

    private static void WriteAscii(Stream s, string text)
    {
        foreach (char c in text) s.WriteByte((byte)c);
    }

    /// <summary>A JSON string as serde_json writes it: escapes <c>"</c>, <c>\</c> and C0 controls only.</summary>
    private static void WriteJsonString(Stream s, byte[] utf8)
    {
        const string hex = "0123456789abcdef";
        s.WriteByte((byte)'"');
        foreach (byte b in utf8)
        {
            switch (b)
            {
                case (byte)'"': WriteAscii(s, "\\\""); break;
                case (byte)'\\': WriteAscii(s, "\\\\"); break;
                case 0x08: WriteAscii(s, "\\b"); break;
                case 0x0C: WriteAscii(s, "\\f"); break;
                case (byte)'\n': WriteAscii(s, "\\n"); break;
                case (byte)'\r': WriteAscii(s, "\\r"); break;
                case (byte)'\t': WriteAscii(s, "\\t"); break;
                case < 0x20:
                    WriteAscii(s, "\\u00");
                    s.WriteByte((byte)hex[b >> 4]);
                    s.WriteByte((byte)hex[b & 0xF]);
                    break;
                default: s.WriteByte(b); break;
            }
        }
        s.WriteByte((byte)'"');
    }
}
