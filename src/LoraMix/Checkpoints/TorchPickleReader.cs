using System.IO.Compression;
using System.Runtime.InteropServices;
using System.Text;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>One tensor of a <c>torch.save</c> checkpoint, described without loading its data.</summary>
/// <param name="Name">The state-dict key.</param>
/// <param name="DType">The element type (that of its storage class; <c>torch.UntypedStorage</c> is bytes, <c>U8</c>).</param>
/// <param name="Shape">The tensor's size.</param>
/// <param name="Stride">Its stride in elements, as stored (the loaded tensor is contiguous).</param>
/// <param name="StorageOffset">Its first element's offset in the storage, in elements.</param>
/// <param name="StorageKey">The storage's record name: the data is <c>&lt;archive&gt;/data/&lt;key&gt;</c>.</param>
/// <param name="StorageNumel">The storage's element count.</param>
/// <param name="Location">The device the tensor was saved from (<c>cpu</c>, <c>cuda:0</c>, ...); loading is always to the CPU.</param>
/// <param name="IsParameter">True when it was pickled as an <c>nn.Parameter</c> (<c>_rebuild_parameter</c>).</param>
public sealed record TorchPickleEntry(
    string Name, SafetensorsDType DType, long[] Shape, long[] Stride, long StorageOffset, string StorageKey,
    long StorageNumel, string Location, bool IsParameter)
{
    /// <summary>Number of elements of the tensor.</summary>
    public long NumberOfElements => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// Reads PyTorch <c>torch.save</c> checkpoints in the zip format (torch ≥ 1.6, e.g. PEFT and MoE-PEFT
/// <c>adapter_model.bin</c>, <c>pytorch_model.bin</c>) holding a flat <c>name → tensor</c> dict, safely.
/// </summary>
/// <remarks>
/// <para>The archive is a zip of <c>&lt;archive&gt;/data.pkl</c> (a pickle), <c>&lt;archive&gt;/data/&lt;key&gt;</c> (raw
/// little-endian storages), <c>&lt;archive&gt;/version</c> and a few bookkeeping records. <c>data.pkl</c> is run through a
/// restricted interpreter of LoraMix's own (no Python, no reflection): it accepts only the opcodes torch writes and only the
/// globals <c>collections.OrderedDict</c>, <c>torch._utils._rebuild_tensor_v2</c>, <c>_rebuild_parameter</c>,
/// <c>_rebuild_parameter_with_state</c> and the storage classes. Any other global (<c>os.system</c>, <c>builtins.eval</c>,
/// ...) or code-running opcode (<c>INST</c>, <c>OBJ</c>, <c>EXT*</c>, <c>BUILD</c> on anything but an OrderedDict, ...) is
/// refused with a <see cref="CheckpointFormatException"/> naming it: such a pickle may execute code.</para>
/// <para>Every malformation (truncated zip or pickle, missing storage, storage size ≠ numel × element size, views out of
/// bounds) raises <see cref="CheckpointFormatException"/>. Storage data is copied from the zip stream straight into the
/// tensor's native memory; no managed buffer proportional to a storage is allocated. Loaded tensors are contiguous,
/// independent CPU tensors of the stored dtype; views that share a storage (<c>{"a": t, "b": t[1:]}</c>) are copied
/// apart. A file whose views would expand to more than <see cref="MaxExpansion"/> × its stored bytes
/// (+ 64 MiB) is refused, so a small file cannot make LoraMix allocate unbounded memory. Only the prefix of a storage that
/// its views reach is inflated and allocated (a storage declared larger than its tensors costs nothing beyond them), and
/// <see cref="Read(string, Action{IReadOnlyList{TorchPickleEntry}}?)"/> lets a caller refuse the file from its names and
/// shapes before any storage is inflated. Only regular files are opened (a FIFO or device is refused by name).</para>
/// </remarks>
public static class TorchPickleReader
{
    /// <summary>Bound on the materialised bytes relative to the stored bytes (see remarks).</summary>
    public const int MaxExpansion = 4;

    private const long ExpansionSlack = 64L << 20;
    private const long MaxDeflateRatio = 1100; // deflate cannot exceed ~1032:1
    private const int ChunkBytes = 16 << 20;

    /// <summary>Reads every tensor, in the order of the pickled dict.</summary>
    /// <exception cref="CheckpointFormatException">The file is not a well-formed torch zip checkpoint of tensors, or is refused.</exception>
    /// <exception cref="IOException">The file cannot be opened (e.g. <see cref="FileNotFoundException"/>).</exception>
    public static IReadOnlyDictionary<string, Tensor> Read(string path) => Read(path, check: null);

    /// <summary>
    /// Reads every tensor, after <paramref name="check"/> has accepted the validated plan — names, dtypes, shapes and
    /// storages, read from data.pkl and the zip directory — and before any storage is inflated or allocated: a caller that
    /// knows which tensors it expects (an adapter loader) refuses a file that would not fit before it costs any memory.
    /// </summary>
    /// <param name="path">The file; it must be a regular file.</param>
    /// <param name="check">Throws to refuse the file (its exception propagates unchanged), or null.</param>
    /// <exception cref="CheckpointFormatException">The file is not a well-formed torch zip checkpoint of tensors, not a
    /// regular file, or is refused.</exception>
    /// <exception cref="IOException">The file cannot be opened (e.g. <see cref="FileNotFoundException"/>).</exception>
    public static IReadOnlyDictionary<string, Tensor> Read(string path, Action<IReadOnlyList<TorchPickleEntry>>? check)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        InputFiles.RequireRegular(path, reason => new CheckpointFormatException(path, null, reason));
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        return Read(stream, path, check);
    }

    /// <summary>Reads every tensor from a seekable stream; <paramref name="displayName"/> names it in errors.</summary>
    /// <exception cref="CheckpointFormatException">Malformed or refused content.</exception>
    public static IReadOnlyDictionary<string, Tensor> Read(Stream stream, string displayName) => Read(stream, displayName, check: null);

    /// <summary>Reads every tensor from a seekable stream once <paramref name="check"/> has accepted the plan (see
    /// <see cref="Read(string, Action{IReadOnlyList{TorchPickleEntry}}?)"/>).</summary>
    /// <exception cref="CheckpointFormatException">Malformed or refused content.</exception>
    public static IReadOnlyDictionary<string, Tensor> Read(Stream stream, string displayName, Action<IReadOnlyList<TorchPickleEntry>>? check)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(displayName);
        return Guard(displayName, () =>
        {
            using var archive = OpenArchive(stream, displayName);
            var plan = Plan(archive, stream.Length, displayName);
            check?.Invoke(plan.Tensors.Select(t => t.Entry).ToList().AsReadOnly());
            return Materialize(plan, displayName);
        });
    }

    /// <summary>Lists the tensors (names, dtypes, shapes, storages) in dict order without loading their data. The whole
    /// pickle and the storages' sizes are validated as in <see cref="Read(string)"/>.</summary>
    /// <exception cref="CheckpointFormatException">Malformed or refused content.</exception>
    /// <exception cref="IOException">The file cannot be opened.</exception>
    public static IReadOnlyList<TorchPickleEntry> ReadEntries(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        InputFiles.RequireRegular(path, reason => new CheckpointFormatException(path, null, reason));
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        return ReadEntries(stream, path);
    }

    /// <summary>Lists the tensors of a seekable stream without loading their data.</summary>
    /// <exception cref="CheckpointFormatException">Malformed or refused content.</exception>
    public static IReadOnlyList<TorchPickleEntry> ReadEntries(Stream stream, string displayName)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(displayName);
        return Guard(displayName, () =>
        {
            using var archive = OpenArchive(stream, displayName);
            return Plan(archive, stream.Length, displayName).Tensors.Select(t => t.Entry).ToList().AsReadOnly();
        });
    }

    // ------------------------------------------------------------------ planning

    private sealed record PlannedTensor(TorchPickleEntry Entry, TorchPickleUnpickler.TensorRef Ref);

    // Reach: per storage, the elements its views reach (the largest element index + 1): only that prefix is inflated and
    // allocated, so a storage declared far larger than its tensors costs nothing beyond them.
    private sealed record Plan_(string ArchiveName, List<PlannedTensor> Tensors, Dictionary<string, ZipArchiveEntry> Storages,
        Dictionary<string, long> Reach);

    private static Plan_ Plan(ZipArchive archive, long fileLength, string file)
    {
        var (prefix, pickleEntry) = FindArchiveFolder(archive, file);
        var records = new Dictionary<string, ZipArchiveEntry>(StringComparer.Ordinal);
        foreach (var e in archive.Entries)
            if (e.FullName.StartsWith(prefix, StringComparison.Ordinal))
                records.TryAdd(e.FullName[prefix.Length..], e);
        CheckBookkeeping(records, fileLength, file);

        byte[] pickle = ReadSmallRecord(pickleEntry, TorchPickleUnpickler.MaxPickleBytes, fileLength, file, "data.pkl");
        object? root = TorchPickleUnpickler.Load(file, pickle);
        if (root is not TorchPickleUnpickler.PyDict dict)
            throw new CheckpointFormatException(file, null,
                $"data.pkl holds {TorchPickleUnpickler.Describe(root)}; LoraMix reads only a flat dict of name → tensor " +
                "(a state dict). For a checkpoint such as {'state_dict': ..., 'epoch': ...}, save the state dict alone.");

        var tensors = new List<PlannedTensor>(dict.Items.Count);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var storages = new Dictionary<string, (TorchPickleUnpickler.StorageRef Ref, ZipArchiveEntry Entry)>(StringComparer.Ordinal);
        var reach = new Dictionary<string, long>(StringComparer.Ordinal);
        long storedBytes = 0, materializedBytes = 0;
        foreach (var (keyObj, value) in dict.Items)
        {
            if (keyObj is not string name)
                throw new CheckpointFormatException(file, null,
                    $"the state dict has a key that is {TorchPickleUnpickler.Describe(keyObj)}; keys must be strings");
            if (!seen.Add(name))
                throw new CheckpointFormatException(file, name, "the key appears twice in the state dict");
            if (value is not TorchPickleUnpickler.TensorRef t)
                throw new CheckpointFormatException(file, name,
                    $"the value is {TorchPickleUnpickler.Describe(value)}; LoraMix reads only tensors from a state dict");

            var s = t.Storage;
            int elementSize = SafetensorsDTypes.ElementSize(s.DType);
            if (storages.TryGetValue(s.Key, out var known))
            {
                if (known.Ref.DType != s.DType || known.Ref.Numel != s.Numel)
                    throw new CheckpointFormatException(file, name,
                        $"storage '{s.Key}' is referenced as {s.StorageClass}[{s.Numel}] here but as " +
                        $"{known.Ref.StorageClass}[{known.Ref.Numel}] by an earlier tensor");
            }
            else
            {
                if (!records.TryGetValue("data/" + s.Key, out var entry))
                    throw new CheckpointFormatException(file, name,
                        $"its storage record '{prefix}data/{s.Key}' is missing from the zip (truncated or incomplete file)");
                long nbytes;
                try { nbytes = checked(s.Numel * elementSize); }
                catch (OverflowException)
                {
                    throw new CheckpointFormatException(file, name, $"storage '{s.Key}' of {s.Numel} elements overflows a 64-bit byte count");
                }
                if (entry.Length != nbytes)
                    throw new CheckpointFormatException(file, name,
                        $"storage '{s.Key}' is {s.StorageClass} of {s.Numel} elements ({nbytes} bytes) but its record " +
                        $"'{entry.FullName}' holds {entry.Length} bytes");
                CheckEntrySize(entry, fileLength, file, name);
                storages.Add(s.Key, (s, entry));
                storedBytes += nbytes;
            }

            var (numel, viewReach) = CheckView(t, file, name);
            reach[s.Key] = Math.Max(reach.GetValueOrDefault(s.Key), viewReach);
            materializedBytes = checked(materializedBytes + numel * elementSize);
            tensors.Add(new PlannedTensor(
                new TorchPickleEntry(name, s.DType, t.Size, t.Stride, t.StorageOffset, s.Key, s.Numel, s.Location, t.IsParameter), t));
        }

        if (materializedBytes > checked(MaxExpansion * storedBytes + ExpansionSlack))
            throw new CheckpointFormatException(file, null,
                $"the tensors' views would expand {storedBytes} stored bytes to {materializedBytes} bytes in memory " +
                $"(more than {MaxExpansion}× + 64 MiB); refusing to allocate that much for this file");
        return new Plan_(prefix, tensors, storages.ToDictionary(kv => kv.Key, kv => kv.Value.Entry, StringComparer.Ordinal), reach);
    }

    /// <summary>Checks a view lies within its storage and returns its element count and the storage elements it reaches
    /// (largest index + 1; 0 for an empty view).</summary>
    private static (long Numel, long Reach) CheckView(TorchPickleUnpickler.TensorRef t, string file, string name)
    {
        long numel = 1;
        long maxIndex = t.StorageOffset;
        try
        {
            for (int i = 0; i < t.Size.Length; i++)
                numel = checked(numel * t.Size[i]);
            if (numel == 0) return (0, 0);
            for (int i = 0; i < t.Size.Length; i++)
                maxIndex = checked(maxIndex + checked((t.Size[i] - 1) * t.Stride[i]));
        }
        catch (OverflowException)
        {
            throw new CheckpointFormatException(file, name,
                $"size {Safetensors.FormatShape(t.Size)} with stride {Safetensors.FormatShape(t.Stride)} overflows 64-bit indexing");
        }
        if (maxIndex >= t.Storage.Numel)
            throw new CheckpointFormatException(file, name,
                $"the view (offset {t.StorageOffset}, size {Safetensors.FormatShape(t.Size)}, stride " +
                $"{Safetensors.FormatShape(t.Stride)}) reaches element {maxIndex} of storage '{t.Storage.Key}', " +
                $"which has {t.Storage.Numel} elements");
        if (numel > t.Storage.Numel)
            throw new CheckpointFormatException(file, name,
                $"the view (size {Safetensors.FormatShape(t.Size)}, stride {Safetensors.FormatShape(t.Stride)}) has more " +
                $"elements than its storage '{t.Storage.Key}' ({t.Storage.Numel}); expanded (stride-0) views are not supported");
        return (numel, maxIndex + 1);
    }

    private static void CheckEntrySize(ZipArchiveEntry entry, long fileLength, string file, string? tensor)
    {
        if (entry.CompressedLength < 0 || entry.Length < 0)
            throw new CheckpointFormatException(file, tensor, $"record '{entry.FullName}' has a negative size");
        if (entry.CompressedLength > fileLength)
            throw new CheckpointFormatException(file, tensor,
                $"record '{entry.FullName}' claims {entry.CompressedLength} bytes but the file is {fileLength} bytes (truncated file?)");
        bool stored = entry.CompressedLength == entry.Length;
        if (!stored && entry.Length > entry.CompressedLength * MaxDeflateRatio + 1024)
            throw new CheckpointFormatException(file, tensor,
                $"record '{entry.FullName}' claims {entry.Length} bytes from {entry.CompressedLength} compressed bytes, " +
                "more than deflate can produce (corrupt file or zip bomb)");
    }

    private static (string Prefix, ZipArchiveEntry Pickle) FindArchiveFolder(ZipArchive archive, string file)
    {
        ZipArchiveEntry? found = null;
        bool torchScript = false;
        foreach (var e in archive.Entries)
        {
            string n = e.FullName;
            int slash = n.IndexOf('/');
            if (slash <= 0) continue;
            string rest = n[(slash + 1)..];
            if (rest == "constants.pkl" || rest.StartsWith("code/", StringComparison.Ordinal)) torchScript = true;
            if (rest != "data.pkl") continue;
            if (found is not null && found.FullName != n)
                throw new CheckpointFormatException(file, null,
                    $"the zip holds more than one data.pkl ('{found.FullName}', '{n}'); a torch.save archive has one top-level folder");
            found ??= e;
        }
        if (found is null)
            throw new CheckpointFormatException(file, null,
                "the zip has no '<archive>/data.pkl' record, so it is not a torch.save checkpoint");
        if (torchScript)
            throw new CheckpointFormatException(file, null,
                "this is a TorchScript archive (torch.jit.save), not a torch.save state dict; LoraMix cannot load it");
        string name = found.FullName;
        return (name[..(name.IndexOf('/') + 1)], found);
    }

    private static void CheckBookkeeping(Dictionary<string, ZipArchiveEntry> records, long fileLength, string file)
    {
        if (records.TryGetValue("byteorder", out var byteOrder))
        {
            string order = Encoding.ASCII.GetString(ReadSmallRecord(byteOrder, 64, fileLength, file, "byteorder")).Trim();
            if (order != "little")
                throw new CheckpointFormatException(file, null,
                    $"the byteorder record says '{order}'; LoraMix reads only little-endian checkpoints");
        }
        if (records.TryGetValue("version", out var version) || records.TryGetValue(".data/version", out version))
        {
            string text = Encoding.ASCII.GetString(ReadSmallRecord(version, 64, fileLength, file, "version")).Trim();
            if (!long.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out long v) ||
                v < 1 || v > 1000)
                throw new CheckpointFormatException(file, null,
                    $"the version record is '{(text.Length > 40 ? text[..40] + "..." : text)}', expected a small integer such as 3");
        }
    }

    // ------------------------------------------------------------------ loading

    private static OrderedDictionary<string, Tensor> Materialize(Plan_ plan, string file)
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("torch checkpoint I/O is implemented for little-endian hosts only");
        var uses = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in plan.Tensors) uses[t.Entry.StorageKey] = uses.GetValueOrDefault(t.Entry.StorageKey) + 1;

        var result = new OrderedDictionary<string, Tensor>(plan.Tensors.Count, StringComparer.Ordinal);
        var loaded = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        bool ok = false;
        try
        {
            foreach (var t in plan.Tensors)
            {
                var e = t.Entry;
                if (!loaded.TryGetValue(e.StorageKey, out var storage))
                {
                    storage = LoadStorage(plan.Storages[e.StorageKey], e, plan.Reach[e.StorageKey], file);
                    loaded.Add(e.StorageKey, storage);
                }
                int remaining = --uses[e.StorageKey];
                Tensor tensor;
                if (remaining == 0 && e.StorageOffset == 0 && e.NumberOfElements == e.StorageNumel && IsContiguous(e.Shape, e.Stride))
                {
                    tensor = storage.reshape(e.Shape); // sole user of the whole storage: a view of it is independent
                }
                else
                {
                    tensor = empty(e.Shape, storage.dtype, CPU);
                    if (e.NumberOfElements > 0)
                    {
                        using var view = storage.as_strided(e.Shape, e.Stride, e.StorageOffset);
                        tensor.copy_(view);
                    }
                }
                if (remaining == 0)
                {
                    loaded.Remove(e.StorageKey);
                    storage.Dispose();
                }
                result.Add(e.Name, tensor);
            }
            ok = true;
            return result;
        }
        finally
        {
            foreach (var s in loaded.Values) s.Dispose();
            if (!ok)
                foreach (var t in result.Values) t.Dispose();
        }
    }

    private static bool IsContiguous(long[] shape, long[] stride)
    {
        long expected = 1;
        for (int i = shape.Length - 1; i >= 0; i--)
        {
            if (shape[i] != 1 && stride[i] != expected) return false;
            expected *= shape[i];
        }
        return true;
    }

    /// <summary>Inflates the first <paramref name="reachElements"/> elements of a storage (all its views need) into a new
    /// CPU tensor; the rest of the record is never read.</summary>
    private static unsafe Tensor LoadStorage(ZipArchiveEntry entry, TorchPickleEntry first, long reachElements, string file)
    {
        var dtype = SafetensorsDTypes.ToScalarType(first.DType);
        long total = reachElements * SafetensorsDTypes.ElementSize(first.DType);   // <= entry.Length (checked in Plan)
        var storage = empty([reachElements], dtype, CPU);
        try
        {
            if (total == 0) return storage;
            byte* basePtr = (byte*)storage.data_ptr();
            using var input = entry.Open();
            long done = 0;
            while (done < total)
            {
                int chunk = (int)Math.Min(total - done, ChunkBytes);
                int read = input.ReadAtLeast(new Span<byte>(basePtr + done, chunk), chunk, throwOnEndOfStream: false);
                if (read < chunk)
                    throw new CheckpointFormatException(file, first.Name,
                        $"record '{entry.FullName}' ended after {done + read} of its {entry.Length} bytes (truncated or corrupt file)");
                done += read;
            }
            GC.KeepAlive(storage);
            return storage;
        }
        catch
        {
            storage.Dispose();
            throw;
        }
    }

    // ------------------------------------------------------------------ zip helpers

    private static ZipArchive OpenArchive(Stream stream, string file)
    {
        if (!stream.CanSeek)
            throw new ArgumentException($"{file}: the stream must be seekable to read a zip", nameof(stream));
        long start = stream.Position;
        Span<byte> magic = stackalloc byte[4];
        int n = stream.ReadAtLeast(magic, 4, throwOnEndOfStream: false);
        stream.Position = start;
        if (n >= 2 && magic[0] == 0x80 && magic[1] <= 5)
            throw new CheckpointFormatException(file, null,
                "this is a legacy (pre-1.6, non-zip) torch.save file; LoraMix reads only the zip format. Re-save it with " +
                "torch ≥ 1.6 (torch.save(torch.load(path, weights_only=True), path)) or convert it to safetensors");
        if (n < 4 || magic[0] != (byte)'P' || magic[1] != (byte)'K')
            throw new CheckpointFormatException(file, null, "the file is not a zip archive, so it is not a torch.save checkpoint");
        return new ZipArchive(stream, ZipArchiveMode.Read, leaveOpen: true);
    }

    private static byte[] ReadSmallRecord(ZipArchiveEntry entry, int max, long fileLength, string file, string what)
    {
        if (entry.Length > max)
            throw new CheckpointFormatException(file, null, $"the {what} record is {entry.Length} bytes, more than the {max}-byte limit");
        CheckEntrySize(entry, fileLength, file, null);
        var buffer = new byte[entry.Length];
        using var input = entry.Open();
        int read = input.ReadAtLeast(buffer, buffer.Length, throwOnEndOfStream: false);
        if (read < buffer.Length)
            throw new CheckpointFormatException(file, null,
                $"the {what} record ended after {read} of its {buffer.Length} bytes (truncated or corrupt file)");
        return buffer;
    }

    /// <summary>Turns the exceptions a corrupt zip or an impossible tensor can raise into <see cref="CheckpointFormatException"/>.</summary>
    private static T Guard<T>(string file, Func<T> body)
    {
        try
        {
            return body();
        }
        catch (CheckpointFormatException)
        {
            throw;
        }
        catch (Exception e) when (e is InvalidDataException or IOException or NotSupportedException or OverflowException
                                      or ExternalException or ArgumentException or IndexOutOfRangeException
                                      or InvalidOperationException)
        {
            if (e is ArgumentException { ParamName: "stream" }) throw;
            throw new CheckpointFormatException(file, null, $"cannot read the torch zip checkpoint: {e.Message}", e);
        }
    }
}
