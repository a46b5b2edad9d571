using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using CsCheck;
using LoraMix.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

/// <summary>Builds pickle bytes opcode by opcode (independent of <see cref="TorchPickleWriter"/>).</summary>
internal sealed class Pk
{
    private readonly List<byte> _b = [];

    public byte[] Bytes => [.. _b];

    public Pk Raw(params byte[] bytes)
    {
        _b.AddRange(bytes);
        return this;
    }

    public Pk Op(char c) => Raw((byte)c);
    public Pk Proto(byte v) => Raw(0x80, v);
    public Pk Mark() => Op('(');
    public Pk Put(byte i) => Raw((byte)'q', i);
    public Pk Get(byte i) => Raw((byte)'h', i);
    public Pk K(byte v) => Raw((byte)'K', v);

    public Pk M(ushort v) => Raw((byte)'M', (byte)v, (byte)(v >> 8));

    public Pk J(int v)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(b, v);
        return Op('J').Raw(b);
    }

    /// <summary>BINUNICODE: 'X', u32 length, UTF-8.</summary>
    public Pk X(string s)
    {
        var utf8 = Encoding.UTF8.GetBytes(s);
        var len = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(len, (uint)utf8.Length);
        return Op('X').Raw(len).Raw(utf8);
    }

    /// <summary>SHORT_BINUNICODE (protocol 4).</summary>
    public Pk ShortX(string s)
    {
        var utf8 = Encoding.UTF8.GetBytes(s);
        return Raw(0x8c, (byte)utf8.Length).Raw(utf8);
    }

    /// <summary>GLOBAL 'module\nname\n'.</summary>
    public Pk Global(string module, string name) => Op('c').Raw(Encoding.ASCII.GetBytes(module + "\n" + name + "\n"));

    public Pk Tuple2() => Raw(0x86);
    public Pk Tuple1() => Raw(0x85);
    public Pk Tuple3() => Raw(0x87);
    public Pk False() => Raw(0x89);
    public Pk True() => Raw(0x88);
}

/// <summary>Helpers for the torch checkpoint tests.</summary>
internal static class TpTest
{
    /// <summary>A zip like torch's (entries under one folder), built with System.IO.Compression: stored, unaligned.</summary>
    public static byte[] Zip(string folder, params (string Name, byte[] Data)[] records)
    {
        using var ms = new MemoryStream();
        using (var zip = new ZipArchive(ms, ZipArchiveMode.Create, leaveOpen: true))
        {
            foreach (var (name, data) in records)
            {
                var e = zip.CreateEntry(folder + "/" + name, CompressionLevel.NoCompression);
                using var s = e.Open();
                s.Write(data);
            }
        }
        return ms.ToArray();
    }

    /// <summary>A torch-style archive around a data.pkl and raw storages.</summary>
    public static byte[] Archive(byte[] pickle, params (string Key, byte[] Data)[] storages)
    {
        var records = new List<(string, byte[])> { ("data.pkl", pickle), ("byteorder", "little"u8.ToArray()) };
        records.AddRange(storages.Select(s => ("data/" + s.Key, s.Data)));
        records.Add(("version", "3\n"u8.ToArray()));
        records.Add((".data/serialization_id", "0123456789012345678901234567890123456789"u8.ToArray()));
        return Zip("archive", [.. records]);
    }

    public static IReadOnlyDictionary<string, Tensor> Load(byte[] file, string name = "test.bin")
    {
        using var ms = new MemoryStream(file, writable: false);
        return TorchPickleReader.Read(ms, name);
    }

    public static byte[] F32Bytes(params float[] values)
    {
        var b = new byte[values.Length * 4];
        for (int i = 0; i < values.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(b.AsSpan(i * 4), values[i]);
        return b;
    }

    public static Tensor Random(SafetensorsDType dtype, long[] shape, Random rng)
    {
        var t = empty(shape, SafetensorsDTypes.ToScalarType(dtype));
        if (t.NumberOfElements == 0) return t;
        var bytes = new byte[t.NumberOfElements * SafetensorsDTypes.ElementSize(dtype)];
        rng.NextBytes(bytes);
        if (dtype == SafetensorsDType.BOOL)
            for (int i = 0; i < bytes.Length; i++) bytes[i] &= 1;
        t.bytes = bytes;
        return t;
    }

    public static byte[] Bytes(Tensor t)
    {
        if (t.NumberOfElements == 0) return [];
        using var c = t.cpu().contiguous();
        return c.bytes.ToArray();
    }

    public static void AssertSame(Tensor expected, Tensor actual, string? what = null)
    {
        Assert.True(expected.dtype == actual.dtype, $"{what}: dtype {actual.dtype}, expected {expected.dtype}");
        Assert.Equal(expected.shape, actual.shape);
        Assert.Equal(Bytes(expected), Bytes(actual));
    }

    /// <summary>The data offsets of the local file records of a zip, by name (parsed by hand from the local headers).</summary>
    public static List<(string Name, long DataOffset, ushort Flags, ushort Method, byte[] Extra)> LocalRecords(byte[] zip)
    {
        var result = new List<(string, long, ushort, ushort, byte[])>();
        int p = 0;
        while (p + 30 <= zip.Length && BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(p)) == 0x04034b50)
        {
            ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(p + 6));
            ushort method = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(p + 8));
            int nameLen = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(p + 26));
            int extraLen = BinaryPrimitives.ReadUInt16LittleEndian(zip.AsSpan(p + 28));
            string name = Encoding.UTF8.GetString(zip, p + 30, nameLen);
            byte[] extra = zip.AsSpan(p + 30 + nameLen, extraLen).ToArray();
            long data = p + 30 + nameLen + extraLen;
            result.Add((name, data, flags, method, extra));
            // Find the data descriptor that follows (stored data: size from the central directory is simpler, scan instead).
            int next = p + 30 + nameLen + extraLen;
            int desc = IndexOf(zip, [0x50, 0x4b, 0x07, 0x08], next);
            if (desc < 0) break;
            uint size = BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(desc + 8));
            // The descriptor search could hit data bytes; trust it only when the size matches the distance.
            while (desc >= 0 && desc - next != size)
            {
                desc = IndexOf(zip, [0x50, 0x4b, 0x07, 0x08], desc + 1);
                if (desc >= 0) size = BinaryPrimitives.ReadUInt32LittleEndian(zip.AsSpan(desc + 8));
            }
            if (desc < 0) break;
            p = desc + 16;
        }
        return result;
    }

    private static int IndexOf(byte[] haystack, byte[] needle, int from) =>
        from >= haystack.Length ? -1 : haystack.AsSpan(from).IndexOf(needle) is var i and >= 0 ? from + i : -1;
}

public sealed class TorchPickleTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-tp-" + Guid.NewGuid().ToString("N"));

    public TorchPickleTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }

    private string File(string name) => Path.Combine(_dir, name);

    private const string QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    private const string QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

    // ================================================================== round trips

    public static TheoryData<SafetensorsDType> DTypes =>
    [
        SafetensorsDType.F32, SafetensorsDType.BF16, SafetensorsDType.F16, SafetensorsDType.I64, SafetensorsDType.I32,
        SafetensorsDType.BOOL, SafetensorsDType.U8, SafetensorsDType.F64, SafetensorsDType.I16, SafetensorsDType.I8,
    ];

    [Theory]
    [MemberData(nameof(DTypes))]
    public void RoundTrip_EveryDType_SeveralShapes(SafetensorsDType dtype)
    {
        using var scope = NewDisposeScope();
        var rng = new Random(7 + (int)dtype);
        long[][] shapes = [[], [0], [1], [5], [2, 3], [2, 0, 4], [1, 2, 3, 2], [3, 1]];
        var tensors = shapes.Select((s, i) => new KeyValuePair<string, Tensor>($"t{i}.{string.Join("x", s)}", TpTest.Random(dtype, s, rng))).ToList();
        string path = File($"rt_{dtype}.bin");

        TorchPickleWriter.Write(path, tensors);
        var loaded = TorchPickleReader.Read(path);

        Assert.Equal(tensors.Select(t => t.Key), loaded.Keys);
        foreach (var (name, expected) in tensors) TpTest.AssertSame(expected, loaded[name], name);
        var entries = TorchPickleReader.ReadEntries(path);
        Assert.Equal(tensors.Select(t => t.Key), entries.Select(e => e.Name));
        Assert.All(entries, e => Assert.Equal(dtype, e.DType));
        Assert.Equal(shapes, entries.Select(e => e.Shape));
    }

    [Fact]
    public void RoundTrip_NonContiguousInputs_AreWrittenContiguous()
    {
        using var scope = NewDisposeScope();
        var baseT = arange(24, ScalarType.Float32).reshape(4, 6);
        var inputs = new Dictionary<string, Tensor>
        {
            ["transposed"] = baseT.t(),
            ["strided"] = baseT.index(TensorIndex.Colon, TensorIndex.Slice(0, 6, 2)),
            ["offset_view"] = baseT.narrow(0, 2, 2),
            ["expanded"] = arange(3, ScalarType.Int64).unsqueeze(0).expand(4, 3),
            ["bf16_view"] = baseT.to(ScalarType.BFloat16).t()[1],
        };
        string path = File("noncontig.bin");
        TorchPickleWriter.Write(path, inputs);
        var loaded = TorchPickleReader.Read(path);
        foreach (var (name, expected) in inputs)
        {
            TpTest.AssertSame(expected, loaded[name], name);
            Assert.True(loaded[name].is_contiguous());
        }
        // Each storage holds exactly the tensor's elements: the writer made them contiguous.
        foreach (var e in TorchPickleReader.ReadEntries(path))
        {
            Assert.Equal(0, e.StorageOffset);
            Assert.Equal(e.NumberOfElements, e.StorageNumel);
        }
    }

    [Fact]
    public void RoundTrip_RandomTensorSets_Property()
    {
        var genDType = Gen.Int[0, SafetensorsDTypes.All.Count - 1].Select(i => SafetensorsDTypes.All[i]);
        var genShape = Gen.Int[0, 4].Array[0, 3].Select(d => d.Select(x => (long)x).ToArray());
        var genName = Gen.Int[0, 9].Select(i => new[] { "a", "é", "中", "😀", ".", "_", "0", "layers", "\n", "'" }[i]).Array[0, 4].Select(string.Concat);
        Gen.Select(genName, genDType, genShape, Gen.Int).Array[0, 6].Sample(items =>
        {
            using var scope = NewDisposeScope();
            var tensors = items.Select((t, i) => new KeyValuePair<string, Tensor>(t.Item1 + "#" + i,
                TpTest.Random(t.Item2, t.Item3, new Random(t.Item4)))).ToList();
            using var ms = new MemoryStream();
            TorchPickleWriter.Write(ms, tensors);
            ms.Position = 0;
            var loaded = TorchPickleReader.Read(ms, "mem");
            Assert.Equal(tensors.Select(t => t.Key), loaded.Keys);
            foreach (var (name, expected) in tensors) TpTest.AssertSame(expected, loaded[name], name);
        }, iter: 100);
    }

    [Fact]
    public void RoundTrip_ManyTensors_UsesLongBinputAndBatchedSetitems()
    {
        using var scope = NewDisposeScope();
        // 1001 tensors: memo indices pass 255 (LONG_BINPUT/LONG_BINGET) and the last batch has one item (SETITEM).
        var tensors = Enumerable.Range(0, 1001).Select(i => new KeyValuePair<string, Tensor>($"w{i}", tensor(new[] { (float)i }))).ToList();
        var pickle = TorchPickleWriter.BuildPickle(tensors.Select(t => (t.Key, SafetensorsDType.F32, new long[] { 1 })).ToList());
        Assert.Equal((byte)'s', pickle[^2]); // ... SETITEMS, key, value, SETITEM, STOP
        Assert.Contains((byte)'r', pickle);
        string path = File("many.bin");
        TorchPickleWriter.Write(path, tensors);
        var loaded = TorchPickleReader.Read(path);
        Assert.Equal(1001, loaded.Count);
        for (int i = 0; i < 1001; i += 100) Assert.Equal((float)i, loaded[$"w{i}"].item<float>());
    }

    // ================================================================== writer = what torch.save writes

    /// <summary>
    /// data.pkl of <c>torch.save(OrderedDict([("a", torch.zeros(2, 8)), ("b", torch.zeros(3, dtype=torch.bfloat16))]))</c>
    /// as CPython's pickler (protocol 2) writes it, opcode by opcode, with its memo indices.
    /// </summary>
    private static byte[] TorchOrderedDictPickle() => new Pk()
        .Proto(2)
        .Global("collections", "OrderedDict").Put(0)
        .Op(')').Op('R').Put(1)                                   // OrderedDict()
        .Mark()                                                   // batch of 2 items
        .X("a").Put(2)
        .Global("torch._utils", "_rebuild_tensor_v2").Put(3)
        .Mark()                                                   // args tuple
        .Mark().X("storage").Put(4).Global("torch", "FloatStorage").Put(5).X("0").Put(6).X("cpu").Put(7).K(16)
        .Op('t').Put(8).Op('Q')                                   // BINPERSID
        .K(0)                                                     // storage_offset
        .K(2).K(8).Tuple2().Put(9)                                // size
        .K(8).K(1).Tuple2().Put(10)                               // stride
        .False()                                                  // requires_grad
        .Get(0).Op(')').Op('R').Put(11)                           // OrderedDict() backward hooks
        .Op('t').Put(12).Op('R').Put(13)
        .X("b").Put(14)
        .Get(3)
        .Mark()
        .Mark().Get(4).Global("torch", "BFloat16Storage").Put(15).X("1").Put(16).Get(7).K(3)
        .Op('t').Put(17).Op('Q')
        .K(0)
        .K(3).Tuple1().Put(18)
        .K(1).Tuple1().Put(19)
        .False()
        .Get(0).Op(')').Op('R').Put(20)
        .Op('t').Put(21).Op('R').Put(22)
        .Op('u')                                                  // SETITEMS
        .Op('.')
        .Bytes;

    [Fact]
    public void Writer_DataPkl_IsByteForByteWhatTorchSaveWrites()
    {
        var actual = TorchPickleWriter.BuildPickle(
        [
            ("a", SafetensorsDType.F32, [2, 8]),
            ("b", SafetensorsDType.BF16, [3]),
        ]);
        Assert.Equal(Convert.ToHexString(TorchOrderedDictPickle()), Convert.ToHexString(actual));
    }

    [Fact]
    public void Writer_SingleAndScalarTensors_MatchTorchOpcodes()
    {
        // torch.save(OrderedDict(w=torch.tensor(5, dtype=torch.int64))): one item -> SETITEM, 0-d -> EMPTY_TUPLE size/stride.
        var expected = new Pk()
            .Proto(2)
            .Global("collections", "OrderedDict").Put(0).Op(')').Op('R').Put(1)
            .X("w").Put(2)
            .Global("torch._utils", "_rebuild_tensor_v2").Put(3)
            .Mark()
            .Mark().X("storage").Put(4).Global("torch", "LongStorage").Put(5).X("0").Put(6).X("cpu").Put(7).K(1)
            .Op('t').Put(8).Op('Q')
            .K(0).Op(')').Op(')').False()
            .Get(0).Op(')').Op('R').Put(9)
            .Op('t').Put(10).Op('R').Put(11)
            .Op('s').Op('.')
            .Bytes;
        var actual = TorchPickleWriter.BuildPickle([("w", SafetensorsDType.I64, [])]);
        Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(actual));

        // Large sizes use BININT2 / BININT / LONG1 like CPython; an empty dict is just OrderedDict().
        var big = TorchPickleWriter.BuildPickle([("x", SafetensorsDType.U8, [70000, 300, 0, 5])]);
        Assert.Contains(Convert.ToHexString([(byte)'J', 0x70, 0x11, 0x01, 0x00]), Convert.ToHexString(big)); // 70000
        Assert.Contains(Convert.ToHexString([(byte)'M', 0x2c, 0x01]), Convert.ToHexString(big));              // 300
        var empty = TorchPickleWriter.BuildPickle([]);
        Assert.Equal(Convert.ToHexString(new Pk().Proto(2).Global("collections", "OrderedDict").Put(0).Op(')').Op('R').Put(1).Op('.').Bytes),
            Convert.ToHexString(empty));
    }

    [Fact]
    public void Writer_ZipLayout_IsTorchs()
    {
        using var scope = NewDisposeScope();
        string path = File("adapter_model.bin");
        TorchPickleWriter.Write(path, [new(QA, zeros(2, 8)), new(QB, ones(8, 2, dtype: ScalarType.BFloat16))]);
        byte[] bytes = System.IO.File.ReadAllBytes(path);

        string[] expectedOrder =
        [
            "adapter_model/data.pkl", "adapter_model/.format_version", "adapter_model/.storage_alignment",
            "adapter_model/byteorder", "adapter_model/data/0", "adapter_model/data/1", "adapter_model/version",
            "adapter_model/.data/serialization_id",
        ];
        var local = TpTest.LocalRecords(bytes);
        Assert.Equal(expectedOrder, local.Select(r => r.Name));
        foreach (var r in local)
        {
            Assert.Equal(0, r.DataOffset % 64);                           // 64-byte aligned data
            Assert.Equal((ushort)0x0808, r.Flags);                        // UTF-8 names + data descriptor, as miniz writes
            Assert.Equal((ushort)0, r.Method);                            // stored
            Assert.Equal((byte)'F', r.Extra[0]);                          // "FB" padding field of 'Z's
            Assert.Equal((byte)'B', r.Extra[1]);
            Assert.Equal(r.Extra.Length - 4, BinaryPrimitives.ReadUInt16LittleEndian(r.Extra.AsSpan(2)));
            Assert.All(r.Extra.Skip(4), b => Assert.Equal((byte)'Z', b));
        }
        // ZIP64 end of central directory, as torch's writer (MZ_ZIP_FLAG_WRITE_ZIP64) emits.
        Assert.True(bytes.AsSpan().IndexOf(new byte[] { 0x50, 0x4b, 0x06, 0x06 }) > 0);

        using var zip = new ZipArchive(new MemoryStream(bytes), ZipArchiveMode.Read);
        Assert.Equal(expectedOrder, zip.Entries.Select(e => e.FullName));
        string Text(string name)
        {
            using var r = new StreamReader(zip.GetEntry("adapter_model/" + name)!.Open());
            return r.ReadToEnd();
        }
        Assert.Equal("3\n", Text("version"));
        Assert.Equal("little", Text("byteorder"));
        Assert.Equal("1", Text(".format_version"));
        Assert.Equal("64", Text(".storage_alignment"));
        Assert.Matches("^[0-9]{40}$", Text(".data/serialization_id"));
        Assert.All(zip.Entries, e => Assert.Equal(e.Length, e.CompressedLength));
        Assert.Equal(64, zip.GetEntry("adapter_model/data/0")!.Length);
        Assert.Equal(32, zip.GetEntry("adapter_model/data/1")!.Length);
        // data.pkl is the exact torch pickle for these two tensors.
        using var pkl = new MemoryStream();
        zip.GetEntry("adapter_model/data.pkl")!.Open().CopyTo(pkl);
        Assert.Equal(TorchPickleWriter.BuildPickle([(QA, SafetensorsDType.F32, [2, 8]), (QB, SafetensorsDType.BF16, [8, 2])]), pkl.ToArray());
    }

    [Theory]
    [InlineData("adapter_model.bin", "adapter_model")]
    [InlineData("/x/y/pytorch_model.bin", "pytorch_model")]
    [InlineData("/x/ckpt.tar.pt", "ckpt.tar")]
    [InlineData("weights", "weights")]
    [InlineData("/x/.bin", "archive")]
    [InlineData("/x/modèle.bin", "archive")]
    public void Writer_ArchiveName_FollowsTorch(string path, string expected) =>
        Assert.Equal(expected, TorchPickleWriter.ArchiveNameFor(path));

    [Fact]
    public void Writer_IsAtomic_AndRejectsBadInput()
    {
        using var scope = NewDisposeScope();
        string path = File("atomic.bin");
        TorchPickleWriter.Write(path, [new("a", ones(2))]);
        byte[] before = System.IO.File.ReadAllBytes(path);
        Assert.Throws<ArgumentException>(() => TorchPickleWriter.Write(path, [new("a", ones(2)), new("a", ones(3))]));
        Assert.Throws<ArgumentException>(() => TorchPickleWriter.Write(path, [new("c", ones(2, dtype: ScalarType.ComplexFloat32))]));
        Assert.Equal(before, System.IO.File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(_dir));
    }

    // ================================================================== hand-built torch fixtures

    /// <summary>
    /// The data.pkl torch 2.x writes for
    /// <c>torch.save({QA: torch.zeros(2, 8), QB: torch.zeros(8, 2)}, "adapter_model.bin")</c> (a plain dict, as PEFT's
    /// get_peft_model_state_dict returns): EMPTY_DICT, then MARK ... SETITEMS, with CPython's memo indices.
    /// </summary>
    private static byte[] PeftDictPickle()
    {
        static byte[] S(string s) => Encoding.ASCII.GetBytes(s);
        static byte[] U32(int n) => [(byte)n, (byte)(n >> 8), (byte)(n >> 16), (byte)(n >> 24)];
        var b = new List<byte>();
        void Add(params byte[][] parts) { foreach (var p in parts) b.AddRange(p); }
        Add([0x80, 0x02]);                                        // PROTO 2
        Add([0x7d], [0x71, 0x00]);                                // EMPTY_DICT, BINPUT 0
        Add([0x28]);                                              // MARK
        Add([0x58], U32(QA.Length), S(QA), [0x71, 0x01]);         // BINUNICODE key, BINPUT 1
        Add([0x63], S("torch._utils\n_rebuild_tensor_v2\n"), [0x71, 0x02]);
        Add([0x28]);                                              // MARK (args)
        Add([0x28]);                                              // MARK (persistent id)
        Add([0x58], U32(7), S("storage"), [0x71, 0x03]);
        Add([0x63], S("torch\nFloatStorage\n"), [0x71, 0x04]);
        Add([0x58], U32(1), S("0"), [0x71, 0x05]);
        Add([0x58], U32(3), S("cpu"), [0x71, 0x06]);
        Add([0x4b, 0x10]);                                        // BININT1 16 (numel)
        Add([0x74], [0x71, 0x07]);                                // TUPLE, BINPUT 7
        Add([0x51]);                                              // BINPERSID
        Add([0x4b, 0x00]);                                        // storage_offset 0
        Add([0x4b, 0x02, 0x4b, 0x08, 0x86, 0x71, 0x08]);          // (2, 8)
        Add([0x4b, 0x08, 0x4b, 0x01, 0x86, 0x71, 0x09]);          // (8, 1)
        Add([0x89]);                                              // NEWFALSE
        Add([0x63], S("collections\nOrderedDict\n"), [0x71, 0x0a]);
        Add([0x29, 0x52, 0x71, 0x0b]);                            // EMPTY_TUPLE, REDUCE, BINPUT 11
        Add([0x74, 0x71, 0x0c]);                                  // TUPLE (args), BINPUT 12
        Add([0x52, 0x71, 0x0d]);                                  // REDUCE, BINPUT 13
        Add([0x58], U32(QB.Length), S(QB), [0x71, 0x0e]);
        Add([0x68, 0x02]);                                        // BINGET 2: _rebuild_tensor_v2
        Add([0x28, 0x28]);
        Add([0x68, 0x03]);                                        // 'storage'
        Add([0x68, 0x04]);                                        // torch.FloatStorage
        Add([0x58], U32(1), S("1"), [0x71, 0x0f]);
        Add([0x68, 0x06]);                                        // 'cpu'
        Add([0x4b, 0x10]);
        Add([0x74, 0x71, 0x10, 0x51]);
        Add([0x4b, 0x00]);
        Add([0x4b, 0x08, 0x4b, 0x02, 0x86, 0x71, 0x11]);          // (8, 2)
        Add([0x4b, 0x02, 0x4b, 0x01, 0x86, 0x71, 0x12]);          // (2, 1)
        Add([0x89]);
        Add([0x68, 0x0a, 0x29, 0x52, 0x71, 0x13]);                // OrderedDict()
        Add([0x74, 0x71, 0x14, 0x52, 0x71, 0x15]);
        Add([0x75]);                                              // SETITEMS
        Add([0x2e]);                                              // STOP
        return [.. b];
    }

    [Fact]
    public void TorchFixture_PeftAdapterBin_Loads()
    {
        byte[] file = TpTest.Zip("adapter_model",
            ("data.pkl", PeftDictPickle()),
            ("byteorder", "little"u8.ToArray()),
            ("data/0", new byte[64]),
            ("data/1", new byte[64]),
            ("version", "3\n"u8.ToArray()),
            (".data/serialization_id", "1234567890123456789012345678901234567890"u8.ToArray()));
        string path = File("adapter_model.bin");
        System.IO.File.WriteAllBytes(path, file);

        var entries = TorchPickleReader.ReadEntries(path);
        Assert.Equal([QA, QB], entries.Select(e => e.Name));
        Assert.Equal([2L, 8], entries[0].Shape);
        Assert.Equal([8L, 2], entries[1].Shape);
        Assert.All(entries, e => Assert.Equal(SafetensorsDType.F32, e.DType));
        Assert.Equal(["0", "1"], entries.Select(e => e.StorageKey));

        using var scope = NewDisposeScope();
        var loaded = TorchPickleReader.Read(path);
        Assert.Equal([QA, QB], loaded.Keys);
        Assert.Equal(ScalarType.Float32, loaded[QA].dtype);
        Assert.Equal([2L, 8], loaded[QA].shape);
        Assert.Equal([8L, 2], loaded[QB].shape);
        Assert.Equal(0f, loaded[QA].abs().sum().item<float>());
        Assert.Equal(0f, loaded[QB].abs().sum().item<float>());
    }

    /// <summary>fixtures/peft_adapter_cpython.bin: data.pkl written by CPython's pickler with torch's reduce protocol
    /// reproduced by stubs (see fixtures/make_fixture.py).</summary>
    [Fact]
    public void TorchFixture_CPythonPickled_MatchesHandWrittenOpcodes_AndLoads()
    {
        string path = SharedAssets.FindTestFile(Path.Combine("Checkpoints", "fixtures", "peft_adapter_cpython.bin"))
            ?? throw new FileNotFoundException("fixture peft_adapter_cpython.bin not found");
        using (var zip = ZipFile.OpenRead(path))
        {
            using var pkl = new MemoryStream();
            using (var s = zip.GetEntry("adapter_model/data.pkl")!.Open()) s.CopyTo(pkl);
            // The opcodes written out by hand above are exactly what CPython emits.
            Assert.Equal(Convert.ToHexString(PeftDictPickle()), Convert.ToHexString(pkl.ToArray()));
        }
        using var scope = NewDisposeScope();
        var loaded = TorchPickleReader.Read(path);
        Assert.Equal([QA, QB], loaded.Keys);
        TpTest.AssertSame(zeros(2, 8), loaded[QA], QA);
        TpTest.AssertSame(arange(16, ScalarType.Float32).reshape(8, 2), loaded[QB], QB);
    }

    [Fact]
    public void TorchFixture_MoePeftParameters_OnCuda_WithStateDictMetadata_Loads()
    {
        // torch.save(model.state_dict(keep_vars=True)) of nn.Parameters saved on cuda:0: an OrderedDict with a `_metadata`
        // attribute (BUILD), _rebuild_parameter wrappers, and BININT2 sizes.
        const string Gate = "mixlora.layers.0.mlp.moe_gate.weight";
        const string ExpA = "mixlora.layers.0.mlp.gate_proj.experts.1.lora_A.weight";
        var pk = new Pk()
            .Proto(2)
            .Global("collections", "OrderedDict").Put(0).Op(')').Op('R').Put(1)
            .Mark()
            .X(Gate).Put(2)
            .Global("torch._utils", "_rebuild_parameter").Put(3)
            .Mark()                                                         // (tensor, requires_grad, hooks)
            .Global("torch._utils", "_rebuild_tensor_v2").Put(4)
            .Mark()
            .Mark().X("storage").Put(5).Global("torch", "FloatStorage").Put(6).X("0").Put(7).X("cuda:0").Put(8).K(6)
            .Op('t').Put(9).Op('Q')
            .K(0).K(2).K(3).Tuple2().Put(10).K(3).K(1).Tuple2().Put(11).True()
            .Get(0).Op(')').Op('R').Put(12)
            .Op('t').Put(13).Op('R').Put(14)
            .True()
            .Get(0).Op(')').Op('R').Put(15)
            .Op('t').Put(16).Op('R').Put(17)
            .X(ExpA).Put(18)
            .Get(3)
            .Mark()
            .Get(4)
            .Mark()
            .Mark().Get(5).Get(6).X("1").Put(19).Get(8).M(300)
            .Op('t').Put(20).Op('Q')
            .K(0).K(1).M(300).Tuple2().Put(21).M(300).K(1).Tuple2().Put(22).True()
            .Get(0).Op(')').Op('R').Put(23)
            .Op('t').Put(24).Op('R').Put(25)
            .True()
            .Get(0).Op(')').Op('R').Put(26)
            .Op('t').Put(27).Op('R').Put(28)
            .Op('u')
            // state: {'_metadata': OrderedDict([('', {'version': 1})])}, then BUILD
            .Raw(0x7d).Put(29).X("_metadata").Put(30).Get(0).Op(')').Op('R').Put(31).X("").Put(32)
            .Raw(0x7d).Put(33).X("version").Put(34).K(1).Op('s').Op('s').Op('s')
            .Op('b')
            .Op('.');
        var gate = Enumerable.Range(0, 6).Select(i => i * 0.5f).ToArray();
        var expA = Enumerable.Range(0, 300).Select(i => -(float)i).ToArray();
        byte[] file = TpTest.Archive(pk.Bytes, ("0", TpTest.F32Bytes(gate)), ("1", TpTest.F32Bytes(expA)));

        using var scope = NewDisposeScope();
        var loaded = TpTest.Load(file);
        Assert.Equal([Gate, ExpA], loaded.Keys);
        Assert.Equal(gate, loaded[Gate].data<float>().ToArray());
        Assert.Equal([2L, 3], loaded[Gate].shape);
        Assert.Equal(expA, loaded[ExpA].data<float>().ToArray());
        Assert.Equal([1L, 300], loaded[ExpA].shape);
        Assert.Equal(ScalarType.Float32, loaded[ExpA].dtype);
        Assert.Equal(DeviceType.CPU, loaded[ExpA].device_type);

        using var ms = new MemoryStream(file);
        var entries = TorchPickleReader.ReadEntries(ms, "moe");
        Assert.All(entries, e => Assert.True(e.IsParameter));
        Assert.All(entries, e => Assert.Equal("cuda:0", e.Location));
    }

    [Fact]
    public void TorchFixture_SharedStorageViews_HonorOffsetAndStride()
    {
        // t = torch.arange(12.).reshape(4, 3); torch.save({"a": t, "b": t[1:], "c": t.t()}): one storage of 12 floats,
        // b at storage_offset 3, c with stride (1, 3).
        var pk = new Pk().Proto(2).Raw(0x7d).Put(0).Mark();
        void Tensor(string name, byte offset, byte[] size, byte[] stride, bool first)
        {
            pk.X(name);
            if (first) pk.Global("torch._utils", "_rebuild_tensor_v2").Put(1); else pk.Get(1);
            pk.Mark().Mark().X("storage").Global("torch", "FloatStorage").X("0").X("cpu").K(12).Op('t').Op('Q');
            pk.K(offset);
            foreach (var s in size) pk.K(s);
            pk.Tuple2();
            foreach (var s in stride) pk.K(s);
            pk.Tuple2().False().Global("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R');
        }
        Tensor("a", 0, [4, 3], [3, 1], first: true);
        Tensor("b", 3, [3, 3], [3, 1], first: false);
        Tensor("c", 0, [3, 4], [1, 3], first: false);
        pk.Op('u').Op('.');
        var values = Enumerable.Range(0, 12).Select(i => (float)i).ToArray();
        byte[] file = TpTest.Archive(pk.Bytes, ("0", TpTest.F32Bytes(values)));

        using var scope = NewDisposeScope();
        var loaded = TpTest.Load(file);
        var t = tensor(values).reshape(4, 3);
        TpTest.AssertSame(t, loaded["a"], "a");
        TpTest.AssertSame(t.narrow(0, 1, 3), loaded["b"], "b");
        TpTest.AssertSame(t.t(), loaded["c"], "c");
        // The loaded tensors are independent.
        loaded["a"].fill_(-1);
        Assert.Equal(3f, loaded["b"][0, 0].item<float>());
        Assert.Equal(1f, loaded["c"][1, 0].item<float>());
    }

    [Fact]
    public void TorchFixture_Protocol4_AndUntypedStorage_Load()
    {
        // Protocol 4 framing, SHORT_BINUNICODE, MEMOIZE and STACK_GLOBAL; an UntypedStorage (bytes) persistent id.
        var pk = new Pk()
            .Proto(4).Raw(0x95, 0, 0, 0, 0, 0, 0, 0, 0)
            .Raw(0x7d).Raw(0x94)
            .ShortX("raw").Raw(0x94)
            .ShortX("torch._utils").ShortX("_rebuild_tensor_v2").Raw(0x93).Raw(0x94)
            .Mark()
            .Mark().ShortX("storage").ShortX("torch").ShortX("UntypedStorage").Raw(0x93).ShortX("0").ShortX("cpu").K(4).Op('t').Op('Q')
            .K(0).K(4).Tuple1().K(1).Tuple1().False()
            .ShortX("collections").ShortX("OrderedDict").Raw(0x93).Op(')').Op('R')
            .Op('t').Op('R')
            .Op('s').Op('.');
        byte[] file = TpTest.Archive(pk.Bytes, ("0", [1, 2, 3, 250]));
        using var scope = NewDisposeScope();
        var loaded = TpTest.Load(file);
        Assert.Equal(ScalarType.Byte, loaded["raw"].dtype);
        Assert.Equal(new byte[] { 1, 2, 3, 250 }, loaded["raw"].data<byte>().ToArray());
    }

    [Fact]
    public void Reader_AcceptsDeflatedEntries()
    {
        using var scope = NewDisposeScope();
        using var ms = new MemoryStream();
        TorchPickleWriter.Write(ms, [new("w", arange(100, ScalarType.Float32))]);
        // Re-pack every record deflated.
        using var src = new ZipArchive(new MemoryStream(ms.ToArray()), ZipArchiveMode.Read);
        using var outMs = new MemoryStream();
        using (var dst = new ZipArchive(outMs, ZipArchiveMode.Create, leaveOpen: true))
            foreach (var e in src.Entries)
            {
                using var i = e.Open();
                using var o = dst.CreateEntry(e.FullName, CompressionLevel.Optimal).Open();
                i.CopyTo(o);
            }
        var loaded = TpTest.Load(outMs.ToArray());
        Assert.Equal(4950f, loaded["w"].sum().item<float>());
    }

    // ================================================================== malicious pickles

    private static readonly string s_marker = Path.Combine(Path.GetTempPath(), "loramix-pwned-" + Guid.NewGuid().ToString("N"));

    private static Pk TensorPrefix(Pk pk) => pk
        .Global("torch._utils", "_rebuild_tensor_v2")
        .Mark()
        .Mark().X("storage").Global("torch", "FloatStorage").X("0").X("cpu").K(1).Op('t').Op('Q');

    private static Pk TensorSuffix(Pk pk) => pk
        .Op(')').Op(')').False().Global("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R');

    /// <summary>name → (data.pkl, fragment the error must contain).</summary>
    private static readonly Dictionary<string, (byte[] Pickle, string Fragment)> s_malicious = new()
    {
        ["os.system"] = (new Pk().Proto(2).Global("os", "system").X($"touch {s_marker}").Tuple1().Op('R').Op('.').Bytes, "os.system"),
        ["posix.system"] = (new Pk().Proto(2).Global("posix", "system").X($"touch {s_marker}").Tuple1().Op('R').Op('.').Bytes, "posix.system"),
        ["builtins.eval"] = (new Pk().Proto(2).Global("builtins", "eval").X("__import__('os').system('id')").Tuple1().Op('R').Op('.').Bytes, "builtins.eval"),
        ["__builtin__.exec"] = (new Pk().Proto(2).Global("__builtin__", "exec").X("print(1)").Tuple1().Op('R').Op('.').Bytes, "__builtin__.exec"),
        ["subprocess.Popen"] = (new Pk().Proto(2).Global("subprocess", "Popen").X("touch").X(s_marker).Tuple2().Tuple1().Op('R').Op('.').Bytes, "subprocess.Popen"),
        ["stack_global os.system"] = (new Pk().Proto(4).ShortX("os").ShortX("system").Raw(0x93).ShortX($"touch {s_marker}").Tuple1().Op('R').Op('.').Bytes, "os.system"),
        ["stack_global builtins.getattr"] = (new Pk().Proto(4).ShortX("builtins").ShortX("getattr").Raw(0x93).Op('.').Bytes, "builtins.getattr"),
        ["stack_global torch.load"] = (new Pk().Proto(4).ShortX("torch").ShortX("load").Raw(0x93).Op('.').Bytes, "torch.load"),
        ["INST"] = (new Pk().Proto(2).Mark().X($"touch {s_marker}").Op('i').Raw(Encoding.ASCII.GetBytes("os\nsystem\n")).Op('.').Bytes, "INST"),
        ["OBJ"] = (new Pk().Proto(2).Mark().X("x").Op('o').Op('.').Bytes, "OBJ"),
        ["EXT1"] = (new Pk().Proto(2).Raw(0x82, 1).Op('.').Bytes, "EXT1"),
        ["PERSID text"] = (new Pk().Proto(2).Op('P').Raw(Encoding.ASCII.GetBytes("0\n")).Op('.').Bytes, "PERSID"),
        // A __reduce__ payload nested as a value of the state dict.
        ["nested in OrderedDict"] = (new Pk().Proto(2)
            .Global("collections", "OrderedDict").Op(')').Op('R')
            .X("weight").Global("os", "system").X($"touch {s_marker}").Tuple1().Op('R')
            .Op('s').Op('.').Bytes, "os.system"),
        // _rebuild_tensor_v2 whose storage_offset argument is itself a forbidden call.
        ["argument of _rebuild_tensor_v2"] = (TensorSuffix(TensorPrefix(new Pk().Proto(2).Raw(0x7d).X("w"))
                .Global("builtins", "eval").X("0").Tuple1().Op('R'))
            .Op('s').Op('.').Bytes, "builtins.eval"),
        ["_rebuild_from_type_v2"] = (new Pk().Proto(2).Global("torch._utils", "_rebuild_from_type_v2").Op('.').Bytes, "torch._utils._rebuild_from_type_v2"),
        ["BUILD on a tensor"] = (TensorSuffix(TensorPrefix(new Pk().Proto(2).Raw(0x7d).X("w")).K(0))
            .Raw(0x7d).Op('b').Op('s').Op('.').Bytes, "BUILD"),
        ["SETITEM on a non-dict"] = (new Pk().Proto(2).Global("collections", "OrderedDict").X("k").X("v").Op('s').Op('.').Bytes, "SETITEM"),
        ["APPEND on a non-list"] = (new Pk().Proto(2).Raw(0x7d).K(1).Op('a').Op('.').Bytes, "APPEND"),
        ["NEWOBJ on a string"] = (new Pk().Proto(2).X("os").Op(')').Raw(0x81).Op('.').Bytes, "NEWOBJ"),
        ["REDUCE on a string"] = (new Pk().Proto(2).X("system").Op(')').Op('R').Op('.').Bytes, "REDUCE"),
    };

    public static TheoryData<string> MaliciousCases => new(s_malicious.Keys);

    [Theory]
    [MemberData(nameof(MaliciousCases))]
    public void Malicious_Pickles_AreRefused_NothingRuns(string name)
    {
        var (pickle, fragment) = s_malicious[name];
        byte[] file = TpTest.Archive(pickle, ("0", new byte[4]));

        var e = Assert.Throws<CheckpointFormatException>(() => TpTest.Load(file, "evil.bin"));
        Assert.Contains(fragment, e.Message);
        Assert.Contains("evil.bin", e.Message);
        Assert.Contains("may execute code", e.Message);
        Assert.Contains("only loads tensor data", e.Message);
        using var ms = new MemoryStream(file);
        Assert.Throws<CheckpointFormatException>(() => TorchPickleReader.ReadEntries(ms, "evil.bin"));
        // Nothing was executed: the file `touch` would have created does not exist (trivially: nothing is ever run).
        Assert.False(System.IO.File.Exists(s_marker));
    }

    // ================================================================== malformed files

    private static byte[] ValidPickle(byte numel = 4, byte dim = 4) =>
        TensorSuffixWith(TensorPrefixWith(new Pk().Proto(2).Raw(0x7d).X("w"), numel).K(0).K(dim).Tuple1().K(1).Tuple1())
            .Op('s').Op('.').Bytes;

    private static Pk TensorPrefixWith(Pk pk, byte numel) => pk
        .Global("torch._utils", "_rebuild_tensor_v2")
        .Mark()
        .Mark().X("storage").Global("torch", "FloatStorage").X("0").X("cpu").K(numel).Op('t').Op('Q');

    private static Pk TensorSuffixWith(Pk pk) => pk.False().Global("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R');

    private static readonly Dictionary<string, (byte[] File, string Fragment)> s_malformed = new()
    {
        ["not a zip"] = ("hello world, not a zip"u8.ToArray(), "not a zip"),
        ["legacy format"] = ([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19], "legacy"),
        ["empty zip"] = (TpTest.Zip("archive"), "no '<archive>/data.pkl'"),
        ["torchscript"] = (TpTest.Zip("m", ("data.pkl", ValidPickle()), ("constants.pkl", [0x80, 0x02, 0x2e]), ("data/0", new byte[16])), "TorchScript"),
        ["truncated pickle"] = (TpTest.Archive(ValidPickle()[..^5], ("0", new byte[16])), "data.pkl"),
        ["missing storage"] = (TpTest.Archive(ValidPickle()), "data/0"),
        ["storage too small"] = (TpTest.Archive(ValidPickle(), ("0", new byte[12])), "holds 12 bytes"),
        ["storage too big"] = (TpTest.Archive(ValidPickle(), ("0", new byte[20])), "holds 20 bytes"),
        ["view out of bounds"] = (TpTest.Archive(ValidPickle(numel: 4, dim: 5), ("0", new byte[16])), "reaches element 4"),
        ["no STOP"] = (TpTest.Archive(ValidPickle()[..^1], ("0", new byte[16])), "STOP"),
        ["top is a list"] = (TpTest.Archive(new Pk().Proto(2).Op(']').Op('.').Bytes), "a list"),
        ["non-tensor value"] = (TpTest.Archive(new Pk().Proto(2).Raw(0x7d).X("epoch").K(3).Op('s').Op('.').Bytes), "the integer 3"),
        ["non-string key"] = (TpTest.Archive(new Pk().Proto(2).Raw(0x7d).K(3).K(3).Op('s').Op('.').Bytes), "keys must be strings"),
        ["tuple value"] = (TpTest.Archive(new Pk().Proto(2).Raw(0x7d).Mark()
            .X("w").Op(')').X("w").Op(')').Op('u').Op('.').Bytes), "the value is a tuple"),
        ["big endian"] = (TpTest.Zip("archive", ("data.pkl", ValidPickle()), ("byteorder", "big"u8.ToArray()), ("data/0", new byte[16])), "big"),
        ["bad version"] = (TpTest.Zip("archive", ("data.pkl", ValidPickle()), ("version", "x\n"u8.ToArray()), ("data/0", new byte[16])), "version"),
        ["unsupported dtype"] = (TpTest.Archive(new Pk().Proto(2).Global("torch", "ComplexFloatStorage").Op('.').Bytes), "ComplexFloatStorage"),
        ["protocol 6"] = (TpTest.Archive(new Pk().Proto(6).Op('.').Bytes), "protocol 6"),
        ["huge string length"] = (TpTest.Archive(new Pk().Proto(2).Op('X').Raw(0xff, 0xff, 0xff, 0x7f).Bytes), "runs past the end"),
        ["memo miss"] = (TpTest.Archive(new Pk().Proto(2).Get(7).Op('.').Bytes), "never stored"),
        ["stack underflow"] = (TpTest.Archive(new Pk().Proto(2).Op('R').Op('.').Bytes), "empty stack"),
        ["unknown opcode"] = (TpTest.Archive(new Pk().Proto(2).Raw(0xfe).Bytes), "0xfe"),
        ["expanded view"] = (TpTest.Archive(TensorSuffixWith(TensorPrefixWith(new Pk().Proto(2).Raw(0x7d).X("w"), 1)
            .K(0).K(100).Tuple1().K(0).Tuple1()).Op('s').Op('.').Bytes, ("0", new byte[4])), "stride-0"),
        ["negative size"] = (TpTest.Archive(TensorSuffixWith(TensorPrefixWith(new Pk().Proto(2).Raw(0x7d).X("w"), 1)
            .K(0).J(-1).Tuple1().K(1).Tuple1()).Op('s').Op('.').Bytes, ("0", new byte[4])), "negative dimension"),
        ["overflowing numel"] = (TpTest.Archive(TensorSuffixWith(new Pk().Proto(2).Raw(0x7d).X("w")
            .Global("torch._utils", "_rebuild_tensor_v2").Mark()
            .Mark().X("storage").Global("torch", "FloatStorage").X("0").X("cpu").Raw(0x8a, 8, 0, 0, 0, 0, 0, 0, 0, 0x40).Op('t').Op('Q')
            .K(0).K(1).Tuple1().K(1).Tuple1()).Op('s').Op('.').Bytes, ("0", new byte[4])), "overflows"),
        ["mismatched storage refs"] = (TpTest.Archive(new Pk().Proto(2).Raw(0x7d).Mark()
            .X("a").Raw(TensorSuffixWith(TensorPrefixWith(new Pk(), 4).K(0).K(4).Tuple1().K(1).Tuple1()).Bytes)
            .X("b").Raw(TensorSuffixWith(TensorPrefixWith(new Pk(), 2).K(0).K(2).Tuple1().K(1).Tuple1()).Bytes)
            .Op('u').Op('.').Bytes, ("0", new byte[16])), "earlier tensor"),
    };

    public static TheoryData<string> MalformedCases => new(s_malformed.Keys);

    [Theory]
    [MemberData(nameof(MalformedCases))]
    public void Malformed_Files_RaiseCheckpointFormatException(string name)
    {
        var (file, fragment) = s_malformed[name];
        var e = Assert.Throws<CheckpointFormatException>(() => TpTest.Load(file, "bad.bin"));
        Assert.Contains(fragment, e.Message);
        Assert.Equal("bad.bin", e.FilePath);
    }

    [Fact]
    public void Malformed_DuplicateKey_IsRefused()
    {
        var t = TensorSuffixWith(TensorPrefixWith(new Pk(), 4).K(0).K(4).Tuple1().K(1).Tuple1()).Bytes;
        var pk = new Pk().Proto(2).Raw(0x7d).Mark().X("w").Raw(t).X("w").Raw(t).Op('u').Op('.');
        var e = Assert.Throws<CheckpointFormatException>(() => TpTest.Load(TpTest.Archive(pk.Bytes, ("0", new byte[16]))));
        Assert.Contains("appears twice", e.Message);
        Assert.Equal("w", e.TensorName);
    }

    [Fact]
    public void Reader_MissingFile_IsFileNotFound() =>
        Assert.Throws<FileNotFoundException>(() => TorchPickleReader.Read(File("nope.bin")));

    // ================================================================== fuzz

    private static readonly Lazy<byte[]> s_fuzzBase = new(() =>
    {
        using var scope = NewDisposeScope();
        using var ms = new MemoryStream();
        var rng = new Random(3);
        TorchPickleWriter.Write(ms,
        [
            new("a.weight", TpTest.Random(SafetensorsDType.F32, [3, 4], rng)),
            new("b.bias", TpTest.Random(SafetensorsDType.BF16, [5], rng)),
            new("step", TpTest.Random(SafetensorsDType.I64, [], rng)),
            new("mask", TpTest.Random(SafetensorsDType.BOOL, [2, 0], rng)),
        ]);
        return ms.ToArray();
    });

    [Fact]
    public void Fuzz_ByteFlipsAndTruncations_LoadOrThrowCheckpointFormatException()
    {
        byte[] valid = s_fuzzBase.Value;
        int pickleStart = 0, pickleEnd = 0;
        {
            var rec = TpTest.LocalRecords(valid).First(r => r.Name.EndsWith("data.pkl", StringComparison.Ordinal));
            pickleStart = (int)rec.DataOffset;
            pickleEnd = pickleStart + TorchPickleWriter.BuildPickle(
                [("a.weight", SafetensorsDType.F32, [3, 4]), ("b.bias", SafetensorsDType.BF16, [5]),
                 ("step", SafetensorsDType.I64, []), ("mask", SafetensorsDType.BOOL, [2, 0])]).Length;
        }
        // Flips anywhere, flips concentrated in data.pkl (past the zip CRC checks the reader may or may not do), truncations.
        var genAnywhere = Gen.Select(Gen.Int[0, valid.Length - 1], Gen.Byte).Array[1, 4];
        var genPickle = Gen.Select(Gen.Int[pickleStart, pickleEnd - 1], Gen.Byte).Array[1, 3];
        var genCase = Gen.Select(Gen.Int[0, 2], genAnywhere, genPickle, Gen.Int[0, valid.Length - 1]);
        int loaded = 0, refused = 0;
        genCase.Sample((kind, anywhere, inPickle, cut) =>
        {
            byte[] file;
            if (kind == 2)
            {
                file = valid[..cut];
            }
            else
            {
                file = (byte[])valid.Clone();
                foreach (var (pos, value) in kind == 0 ? anywhere : inPickle) file[pos] = value;
            }
            using var scope = NewDisposeScope();
            try
            {
                TpTest.Load(file, "fuzz.bin");
                using var ms = new MemoryStream(file);
                TorchPickleReader.ReadEntries(ms, "fuzz.bin");
                loaded++;
            }
            catch (CheckpointFormatException)
            {
                refused++;
            }
        }, iter: 1000, threads: 1);
        Assert.True(refused > 0);
    }

    [Fact]
    public void Fuzz_RandomPickleBytes_NeverCrash()
    {
        // Arbitrary opcode soup inside a valid archive: only CheckpointFormatException (or a load) may come out.
        var ops = new byte[] { 0x80, 0x02, (byte)'(', (byte)'}', (byte)']', (byte)')', (byte)'N', 0x88, 0x89, (byte)'K', (byte)'t',
            0x85, 0x86, 0x87, (byte)'q', (byte)'h', (byte)'s', (byte)'u', (byte)'a', (byte)'e', (byte)'R', (byte)'Q', (byte)'b',
            (byte)'.', (byte)'0', (byte)'1', (byte)'2', 0x94, 0x81, (byte)'X', 0x8c, 0x8a, (byte)'c', 0x93 };
        Gen.Int[0, ops.Length - 1].Select(i => ops[i]).Array[1, 40].Sample(soup =>
        {
            byte[] file = TpTest.Archive([0x80, 0x02, .. soup, (byte)'.'], ("0", new byte[16]));
            try
            {
                TpTest.Load(file);
            }
            catch (CheckpointFormatException)
            {
            }
        }, iter: 1000, threads: 1);
    }
}
