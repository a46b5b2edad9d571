using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>
/// Writes a <c>name → tensor</c> dict as PyTorch's <c>torch.save(state_dict)</c> does (zip format, pickle protocol 2), so that
/// <c>torch.load(path, weights_only=True)</c>, PEFT and MoE-PEFT read it as a normal <c>adapter_model.bin</c>.
/// </summary>
/// <remarks>
/// <para>The archive folder is the file name without its last extension (<c>adapter_model.bin</c> → <c>adapter_model/</c>),
/// as torch names it for an ASCII path; for a stream, a non-ASCII or an empty stem it is <c>archive/</c> (as torch does for
/// file objects). Records, in torch 2.x order: <c>data.pkl</c>, <c>.format_version</c> (<c>1</c>),
/// <c>.storage_alignment</c> (<c>64</c>), <c>byteorder</c> (<c>little</c>), <c>data/0</c>, <c>data/1</c>, ..., <c>version</c>
/// (<c>3\n</c>) and <c>.data/serialization_id</c>; all stored uncompressed with their data 64-byte aligned.</para>
/// <para><c>data.pkl</c> is byte for byte what Python's pickler writes for an <c>OrderedDict</c> of plain (non-Parameter,
/// <c>requires_grad=False</c>) contiguous tensors: <c>collections.OrderedDict()</c>, then per tensor
/// <c>torch._utils._rebuild_tensor_v2(('storage', torch.FloatStorage, '0', 'cpu', numel), 0, size, stride, False,
/// OrderedDict())</c>, with the same memo indices. Each tensor gets its own storage, made contiguous and copied to the
/// CPU (non-contiguous inputs and views are written as their contiguous values). The write is atomic.</para>
/// </remarks>
public static class TorchPickleWriter
{
    private const int ChunkBytes = 16 << 20;

    /// <summary>Writes the tensors, in enumeration order, to <paramref name="path"/> atomically.</summary>
    /// <exception cref="ArgumentException">A null or duplicate name, a null tensor, or a dtype torch files cannot hold here
    /// (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL).</exception>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(tensors);
        var items = Validate(path, tensors);
        string archiveName = ArchiveNameFor(path);
        AtomicFile.Write(path, fs => WriteCore(fs, archiveName, items));
    }

    /// <summary>Writes the tensors to a stream under the archive folder <paramref name="archiveName"/>
    /// (torch uses <c>archive</c> for streams).</summary>
    public static void Write(Stream stream, IEnumerable<KeyValuePair<string, Tensor>> tensors, string archiveName = "archive")
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(tensors);
        ArgumentException.ThrowIfNullOrEmpty(archiveName);
        if (archiveName.Contains('/') || archiveName.Contains('\\'))
            throw new ArgumentException($"the archive name '{archiveName}' must not contain a path separator", nameof(archiveName));
        WriteCore(stream, archiveName, Validate("stream", tensors));
    }

    /// <summary>The archive folder torch uses for a file path: the file name up to its last '.', or <c>archive</c> when
    /// that is empty or not ASCII.</summary>
    public static string ArchiveNameFor(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        int start = Math.Max(path.LastIndexOf('/'), path.LastIndexOf('\\')) + 1;
        string name = path[start..];
        int dot = name.LastIndexOf('.');
        string stem = dot >= 0 ? name[..dot] : name;
        return stem.Length == 0 || !Ascii.IsValid(stem) ? "archive" : stem;
    }

    /// <summary>The <c>data.pkl</c> bytes for tensors of these dtypes and shapes (exposed for tests).</summary>
    internal static byte[] BuildPickle(IReadOnlyList<(string Name, SafetensorsDType DType, long[] Shape)> tensors)
    {
        var p = new PickleEmitter();
        p.Proto(2);
        p.Global("collections", "OrderedDict");
        p.EmptyTuple();
        p.Reduce();
        p.Memoize();
        // Python's batch_setitems: batches of 1000; a batch of one uses SETITEM.
        for (int start = 0; start < tensors.Count; start += 1000)
        {
            int n = Math.Min(1000, tensors.Count - start);
            if (n > 1) p.Mark();
            for (int i = start; i < start + n; i++)
            {
                var (name, dtype, shape) = tensors[i];
                p.Unicode(name);
                p.Tensor(i.ToString(CultureInfo.InvariantCulture), dtype, shape);
            }
            p.Op(n > 1 ? (byte)'u' : (byte)'s');
        }
        p.Op((byte)'.');
        return p.ToArray();
    }

    // ------------------------------------------------------------------ internals

    private static List<(string Name, Tensor Tensor, SafetensorsDType DType)> Validate(string path,
        IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        var items = new List<(string, Tensor, SafetensorsDType)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, tensor) in tensors)
        {
            if (name is null) throw new ArgumentException($"{path}: a tensor name is null", nameof(tensors));
            if (!seen.Add(name)) throw new ArgumentException($"{path}: tensor name '{name}' appears twice", nameof(tensors));
            if (tensor is null) throw new ArgumentException($"{path}: tensor '{name}' is null", nameof(tensors));
            if (!SafetensorsDTypes.TryFromScalarType(tensor.dtype, out var dtype))
                throw new ArgumentException(
                    $"{path}: tensor '{name}' has dtype {tensor.dtype}; supported: {SafetensorsDTypes.SupportedNames}", nameof(tensors));
            try
            {
                _ = new UTF8Encoding(false, throwOnInvalidBytes: true).GetByteCount(name);
            }
            catch (EncoderFallbackException e)
            {
                throw new ArgumentException($"{path}: tensor name '{name}' is not valid Unicode (lone surrogate)", nameof(tensors), e);
            }
            items.Add((name, tensor, dtype));
        }
        return items;
    }

    private static void WriteCore(Stream stream, string archiveName, List<(string Name, Tensor Tensor, SafetensorsDType DType)> items)
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("torch checkpoint I/O is implemented for little-endian hosts only");
        var zip = new TorchPickleZipWriter(stream, archiveName);
        var pickle = BuildPickle(items.Select(i => (i.Name, i.DType, i.Tensor.shape)).ToList());
        var crcs = new List<uint>();
        var names = new List<string>();
        void Record(string name, ReadOnlySpan<byte> data)
        {
            zip.WriteRecord(name, data);
            names.Add(name);
            crcs.Add(Crc32.Update(0, data));
        }

        Record("data.pkl", pickle);
        Record(".format_version", "1"u8);
        Record(".storage_alignment", "64"u8);
        Record("byteorder", "little"u8);
        for (int i = 0; i < items.Count; i++)
        {
            using var scope = NewDisposeScope();
            var (_, tensor, dtype) = items[i];
            var source = tensor.detach();
            if (source.device_type != DeviceType.CPU) source = source.cpu();
            if (!source.is_contiguous()) source = source.contiguous();
            long bytes = checked(source.NumberOfElements * SafetensorsDTypes.ElementSize(dtype));
            string name = "data/" + i.ToString(CultureInfo.InvariantCulture);
            uint crc = 0;
            zip.WriteRecord(name, bytes, emit =>
            {
                EmitNative(source, bytes, chunk =>
                {
                    crc = Crc32.Update(crc, chunk);
                    emit(chunk);
                });
            });
            names.Add(name);
            crcs.Add(crc);
        }
        Record("version", "3\n"u8);
        zip.WriteRecord(".data/serialization_id", Encoding.ASCII.GetBytes(SerializationId(names, crcs)));
        zip.Finish();
    }

    private static unsafe void EmitNative(Tensor source, long bytes, Action<ReadOnlySpan<byte>> emit)
    {
        if (bytes == 0) return;
        byte* basePtr = (byte*)source.data_ptr();
        for (long done = 0; done < bytes;)
        {
            int chunk = (int)Math.Min(bytes - done, ChunkBytes);
            emit(new ReadOnlySpan<byte>(basePtr + done, chunk));
            done += chunk;
        }
        GC.KeepAlive(source);
    }

    /// <summary>40 decimal digits: a hash of the record names, then one of their CRCs (torch's layout; its exact hash
    /// function is not reproduced, and readers only log the id).</summary>
    private static string SerializationId(List<string> names, List<uint> crcs)
    {
        ulong nameHash = 14695981039346656037UL, crcHash = 14695981039346656037UL;
        foreach (string n in names)
            foreach (byte b in Encoding.UTF8.GetBytes(n)) nameHash = (nameHash ^ b) * 1099511628211UL;
        foreach (uint c in crcs) crcHash = (crcHash ^ c) * 1099511628211UL;
        return nameHash.ToString("D20", CultureInfo.InvariantCulture) + crcHash.ToString("D20", CultureInfo.InvariantCulture);
    }

    /// <summary>Emits pickle protocol 2 as CPython's C pickler does, memo indices included.</summary>
    private sealed class PickleEmitter
    {
        private readonly MemoryStream _out = new();
        private readonly Dictionary<string, uint> _memoized = new(StringComparer.Ordinal);
        private uint _memoCount;

        public byte[] ToArray() => _out.ToArray();

        public void Op(byte op) => _out.WriteByte(op);

        public void Proto(byte version)
        {
            Op(0x80);
            Op(version);
        }

        public void Mark() => Op((byte)'(');

        public void EmptyTuple() => Op((byte)')');

        public void Reduce() => Op((byte)'R');

        /// <summary>Stores the top of the stack in the next memo slot (BINPUT / LONG_BINPUT).</summary>
        public uint Memoize()
        {
            uint index = _memoCount++;
            if (index < 256)
            {
                Op((byte)'q');
                Op((byte)index);
            }
            else
            {
                Op((byte)'r');
                Span<byte> b = stackalloc byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(b, index);
                _out.Write(b);
            }
            return index;
        }

        private void Get(uint index)
        {
            if (index < 256)
            {
                Op((byte)'h');
                Op((byte)index);
            }
            else
            {
                Op((byte)'j');
                Span<byte> b = stackalloc byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(b, index);
                _out.Write(b);
            }
        }

        /// <summary>A module-level global; the pickler memoizes it and refers back to it by BINGET afterwards.</summary>
        public void Global(string module, string name)
        {
            string key = "global:" + module + "\n" + name;
            if (_memoized.TryGetValue(key, out uint index))
            {
                Get(index);
                return;
            }
            Op((byte)'c');
            _out.Write(Encoding.ASCII.GetBytes(module + "\n" + name + "\n"));
            _memoized[key] = Memoize();
        }

        /// <summary>A fresh str object: BINUNICODE + BINPUT.</summary>
        public void Unicode(string s)
        {
            byte[] utf8 = Encoding.UTF8.GetBytes(s);
            Op((byte)'X');
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)utf8.Length);
            _out.Write(b);
            _out.Write(utf8);
            Memoize();
        }

        /// <summary>A str constant shared by every tensor (torch's <c>'storage'</c> and <c>'cpu'</c>): BINGET after the first.</summary>
        private void SharedUnicode(string s)
        {
            string key = "str:" + s;
            if (_memoized.TryGetValue(key, out uint index))
            {
                Get(index);
                return;
            }
            Unicode(s);
            _memoized[key] = _memoCount - 1;
        }

        public void Int(long v)
        {
            if (v is >= 0 and <= 0xFF)
            {
                Op((byte)'K');
                Op((byte)v);
            }
            else if (v is >= 0 and <= 0xFFFF)
            {
                Op((byte)'M');
                Span<byte> b = stackalloc byte[2];
                BinaryPrimitives.WriteUInt16LittleEndian(b, (ushort)v);
                _out.Write(b);
            }
            else if (v is >= int.MinValue and <= int.MaxValue)
            {
                Op((byte)'J');
                Span<byte> b = stackalloc byte[4];
                BinaryPrimitives.WriteInt32LittleEndian(b, (int)v);
                _out.Write(b);
            }
            else
            {
                // LONG1: minimal little-endian two's complement.
                Span<byte> b = stackalloc byte[8];
                BinaryPrimitives.WriteInt64LittleEndian(b, v);
                int n = 8;
                while (n > 1 && ((b[n - 1] == 0 && (b[n - 2] & 0x80) == 0) || (b[n - 1] == 0xFF && (b[n - 2] & 0x80) != 0))) n--;
                Op(0x8a);
                Op((byte)n);
                _out.Write(b[..n]);
            }
        }

        /// <summary>A tuple of ints as <c>save_tuple</c> writes it: EMPTY_TUPLE, TUPLE1..3 or MARK ... TUPLE, then BINPUT.</summary>
        public void IntTuple(long[] values)
        {
            if (values.Length == 0)
            {
                EmptyTuple();
                return;
            }
            if (values.Length > 3) Mark();
            foreach (long v in values) Int(v);
            Op(values.Length switch { 1 => 0x85, 2 => 0x86, 3 => 0x87, _ => (byte)'t' });
            Memoize();
        }

        /// <summary><c>_rebuild_tensor_v2(('storage', cls, key, 'cpu', numel), 0, size, stride, False, OrderedDict())</c>.</summary>
        public void Tensor(string storageKey, SafetensorsDType dtype, long[] shape)
        {
            long numel = 1;
            foreach (long d in shape) numel = checked(numel * d);
            var stride = new long[shape.Length];
            long acc = 1;
            for (int i = shape.Length - 1; i >= 0; i--)
            {
                stride[i] = acc;
                acc = checked(acc * Math.Max(shape[i], 1));
            }

            Global("torch._utils", "_rebuild_tensor_v2");
            Mark();
            Mark();
            SharedUnicode("storage");
            Global("torch", TorchPickleUnpickler.StorageClassName(dtype));
            Unicode(storageKey);
            SharedUnicode("cpu");
            Int(numel);
            Op((byte)'t');
            Memoize();
            Op((byte)'Q'); // BINPERSID
            Int(0);
            IntTuple(shape);
            IntTuple(stride);
            Op(0x89); // NEWFALSE
            Global("collections", "OrderedDict");
            EmptyTuple();
            Reduce();
            Memoize();
            Op((byte)'t');
            Memoize();
            Reduce();
            Memoize();
        }
    }
}
