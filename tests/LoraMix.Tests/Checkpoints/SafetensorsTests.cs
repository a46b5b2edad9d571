using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using LoraMix.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

/// <summary>A temp folder deleted with the test.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);

    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "loramix-st-" + Guid.NewGuid().ToString("N"));

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

/// <summary>Helpers shared by the safetensors tests.</summary>
internal static class StTest
{
    /// <summary>A tensor of random bytes (0/1 for BOOL) of the given dtype and shape.</summary>
    public static Tensor RandomTensor(SafetensorsDType dtype, long[] shape, Random rng)
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

    /// <summary>The raw bytes of a tensor (contiguous, CPU).</summary>
    public static byte[] Bytes(Tensor t)
    {
        if (t.NumberOfElements == 0) return [];
        using var c = t.cpu().contiguous();
        return c.bytes.ToArray();
    }

    /// <summary>Same dtype, shape and bytes.</summary>
    public static void AssertSame(Tensor expected, Tensor actual, string? what = null)
    {
        Assert.True(expected.dtype == actual.dtype, $"{what}: dtype {actual.dtype}, expected {expected.dtype}");
        Assert.Equal(expected.shape, actual.shape);
        Assert.Equal(Bytes(expected), Bytes(actual));
    }

    /// <summary>A safetensors file from a header text and a data buffer; the length prefix counts UTF-8 bytes.</summary>
    public static byte[] Craft(string header, int dataLength) => Craft(Encoding.UTF8.GetBytes(header), new byte[dataLength]);

    /// <summary>A safetensors file from header bytes and data.</summary>
    public static byte[] Craft(byte[] header, byte[] data)
    {
        var file = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)header.Length);
        header.CopyTo(file, 8);
        data.CopyTo(file, 8 + header.Length);
        return file;
    }

    public static readonly long[][] Shapes = [[], [0], [3], [2, 3], [2, 0, 4], [1, 2, 3, 2], [5, 1]];
}

public sealed class SafetensorsTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    // ---------------------------------------------------------------- round trips

    [Fact]
    public void EveryDTypeAndShape_RoundTrips_ThroughOneFile()
    {
        using var scope = NewDisposeScope();
        var rng = new Random(1);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var dt in SafetensorsDTypes.All)
            for (int i = 0; i < StTest.Shapes.Length; i++)
                tensors.Add(new($"{SafetensorsDTypes.ToName(dt)}.{i}", StTest.RandomTensor(dt, StTest.Shapes[i], rng)));
        string path = _dir.File("all.safetensors");

        SafetensorsWriter.Write(path, tensors);

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(tensors.Count, reader.Entries.Count);
        Assert.Empty(reader.Metadata);
        foreach (var (name, expected) in tensors)
        {
            var entry = reader.GetEntry(name);
            Assert.Equal(SafetensorsDTypes.FromScalarType(expected.dtype), entry.DType);
            Assert.Equal(expected.shape, entry.Shape);
            Assert.Equal(expected.NumberOfElements * expected.ElementSize, entry.ByteLength);
            StTest.AssertSame(expected, reader.ReadTensor(name), name);
            var into = empty(expected.shape, expected.dtype);
            reader.ReadInto(name, into);
            StTest.AssertSame(expected, into, name);
        }
        long previousEnd = 0;
        foreach (var e in reader.Entries)
        {
            Assert.Equal(previousEnd, e.Begin);
            Assert.Equal(0, e.Begin % SafetensorsDTypes.ElementSize(e.DType)); // aligned, as the Rust layout guarantees
            previousEnd = e.End;
        }
        Assert.Equal(0, reader.DataStart % 8);
    }

    [Fact]
    public void NonContiguousAndConvertedTensors_AreWrittenAsTheirValues()
    {
        using var scope = NewDisposeScope();
        var m = arange(12, dtype: ScalarType.Float32).reshape(3, 4);
        var t = m.t(); // non-contiguous view
        string path = _dir.File("nc.safetensors");

        SafetensorsWriter.Write(path, [new("t", t), new("slice", m[.., 1])]);

        using var reader = SafetensorsReader.Open(path);
        StTest.AssertSame(t.contiguous(), reader.ReadTensor("t"));
        StTest.AssertSame(m[.., 1].contiguous(), reader.ReadTensor("slice"));
    }

    [Fact]
    public void ReadInto_ConvertsDTypeAndLayout()
    {
        using var scope = NewDisposeScope();
        var w = randn(4, 6);
        string path = _dir.File("f32.safetensors");
        SafetensorsWriter.Write(path, [new("w", w)]);
        using var reader = SafetensorsReader.Open(path);

        var bf16 = zeros(4, 6, ScalarType.BFloat16);
        reader.ReadInto("w", bf16);
        StTest.AssertSame(w.to(ScalarType.BFloat16), bf16);

        var f64 = zeros(4, 6, ScalarType.Float64);
        reader.ReadInto("w", f64);
        StTest.AssertSame(w.to(ScalarType.Float64), f64);

        var big = zeros(6, 4);
        var view = big.t(); // [4, 6], non-contiguous
        reader.ReadInto("w", view);
        StTest.AssertSame(w, view.contiguous());

        // A contiguous view at a non-zero storage offset is filled in place, and nothing around it is touched.
        var rows = full(new long[] { 6, 6 }, 9f);
        reader.ReadInto("w", rows[1..5]);
        StTest.AssertSame(w, rows[1..5]);
        Assert.True(rows[0].eq(9f).all().item<bool>() && rows[5].eq(9f).all().item<bool>());

        var param = new TorchSharp.Modules.Parameter(zeros(4, 6), requires_grad: true);
        reader.ReadInto("w", param);
        StTest.AssertSame(w, param.detach());
        Assert.True(param.requires_grad);

        var bf16Param = new TorchSharp.Modules.Parameter(zeros(4, 6, ScalarType.BFloat16), requires_grad: true);
        reader.ReadInto("w", bf16Param);
        StTest.AssertSame(w.to(ScalarType.BFloat16), bf16Param.detach());
    }

    [Fact]
    public void ReadInto_OnCuda_WhenAvailable()
    {
        if (!cuda.is_available()) return; // TorchSharp-cpu build: nothing to check
        using var scope = NewDisposeScope();
        var w = randn(3, 5);
        string path = _dir.File("cuda.safetensors");
        SafetensorsWriter.Write(path, [new("w", w.cuda())]);
        using var reader = SafetensorsReader.Open(path);
        var dest = zeros(3, 5, ScalarType.BFloat16, device: CUDA);
        reader.ReadInto("w", dest);
        StTest.AssertSame(w.to(ScalarType.BFloat16), dest.cpu());
    }

    [Fact]
    public void ReadInto_ShapeMismatch_NamesFileTensorAndBothShapes()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("shape.safetensors");
        SafetensorsWriter.Write(path, [new("layer.w", ones(2, 3))]);
        using var reader = SafetensorsReader.Open(path);

        var ex = Assert.ThrowsAny<CheckpointFormatException>(() => reader.ReadInto("layer.w", zeros(3, 2)));

        Assert.Contains(path, ex.Message);
        Assert.Contains("'layer.w'", ex.Message);
        Assert.Contains("[2, 3]", ex.Message);
        Assert.Contains("[3, 2]", ex.Message);
        Assert.Equal("layer.w", ex.TensorName);
    }

    [Fact]
    public void SmallChunks_StillRoundTrip()
    {
        using var scope = NewDisposeScope();
        int saved = Safetensors.ChunkBytes;
        Safetensors.ChunkBytes = 3; // forces many partial reads/writes, not aligned to elements
        try
        {
            var rng = new Random(7);
            var a = StTest.RandomTensor(SafetensorsDType.F32, [5, 7], rng);
            var b = StTest.RandomTensor(SafetensorsDType.I64, [3], rng);
            string path = _dir.File("chunks.safetensors");
            SafetensorsWriter.Write(path, [new("a", a), new("b", b)]);
            using var reader = SafetensorsReader.Open(path);
            StTest.AssertSame(a, reader.ReadTensor("a"));
            StTest.AssertSame(b, reader.ReadTensor("b"));
        }
        finally
        {
            Safetensors.ChunkBytes = saved;
        }
    }

    [Fact]
    public void LargeTensors_MoveThroughNativeMemory_WithoutProportionalManagedAllocations()
    {
        using var scope = NewDisposeScope();
        var big = randn(8 << 20); // 32 MiB
        string path = _dir.File("big.safetensors");

        long before = GC.GetAllocatedBytesForCurrentThread();
        SafetensorsWriter.Write(path, [new("big", big)]);
        long writeAllocated = GC.GetAllocatedBytesForCurrentThread() - before;

        using var reader = SafetensorsReader.Open(path);
        before = GC.GetAllocatedBytesForCurrentThread();
        var read = reader.ReadTensor("big");
        var into = zeros(8 << 20);
        reader.ReadInto("big", into);
        long readAllocated = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.True(writeAllocated < 4 << 20, $"writer allocated {writeAllocated} managed bytes");
        Assert.True(readAllocated < 1 << 20, $"reader allocated {readAllocated} managed bytes");
        StTest.AssertSame(big, read);
        StTest.AssertSame(big, into);
    }

    [Fact]
    public void Metadata_RoundTrips_WithEscapes()
    {
        using var scope = NewDisposeScope();
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["quote\"back\\slash"] = "line\nbreak\ttab\r\b\f",
            ["control"] = "\u0001\u001f\u007f",
            ["unicode"] = "é中😀/</script>",
            ["empty"] = "",
        };
        string path = _dir.File("meta.safetensors");

        SafetensorsWriter.Write(path, [new("x", ones(2))], metadata);

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal), reader.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal));
        string header = Encoding.UTF8.GetString(File.ReadAllBytes(path), 8, (int)reader.DataStart - 8);
        Assert.Contains("\"control\":\"\\u0001\\u001f\u007f\"", header); // serde_json: \u00XX, lowercase hex, DEL raw
        Assert.Contains("\"line\\nbreak\\ttab\\r\\b\\f\"", header);
        Assert.Contains("é中😀/</script>", header); // raw UTF-8, no \u escapes, '/' not escaped
        Assert.StartsWith("{\"__metadata__\":{\"control\"", header); // metadata first, keys sorted
    }

    [Fact]
    public void EmptyMetadata_IsWrittenAsAnEmptyObject_AndNullMeansNone()
    {
        using var scope = NewDisposeScope();
        string withEmpty = _dir.File("e.safetensors"), without = _dir.File("n.safetensors");
        SafetensorsWriter.Write(withEmpty, [new("x", ones(1))], new Dictionary<string, string>());
        SafetensorsWriter.Write(without, [new("x", ones(1))]);
        Assert.StartsWith("{\"__metadata__\":{},\"x\"", Encoding.UTF8.GetString(File.ReadAllBytes(withEmpty)[8..]));
        Assert.StartsWith("{\"x\"", Encoding.UTF8.GetString(File.ReadAllBytes(without)[8..]));
    }

    // ---------------------------------------------------------------- exact bytes

    [Fact]
    public void Golden_TinyStateDict_MatchesTheSpecByteForByte()
    {
        using var scope = NewDisposeScope();
        var tensors = new List<KeyValuePair<string, Tensor>>
        {
            new("b", tensor(new float[] { 1f, 2f })),
            new("a", tensor(new long[] { 7 })),
            new("c", tensor(new float[] { 1f, -2f }).to(ScalarType.BFloat16)),
        };
        string path = _dir.File("golden.safetensors");

        SafetensorsWriter.Write(path, tensors);

        // I64 sorts before F32 before BF16 (descending Rust Dtype order), so the data is a, b, c and the header lists them so.
        const string json =
            "{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}," +
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}," +
            "\"c\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[16,20]}}";
        Assert.Equal(164, json.Length);
        var expected = new List<byte> { 168, 0, 0, 0, 0, 0, 0, 0 }; // N = 164 + 4 spaces, so 8 + N = 176 = 22 * 8
        expected.AddRange(Encoding.ASCII.GetBytes(json));
        expected.AddRange([0x20, 0x20, 0x20, 0x20]);
        expected.AddRange([7, 0, 0, 0, 0, 0, 0, 0]);              // a: int64 7
        expected.AddRange([0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40]); // b: 1.0f, 2.0f
        expected.AddRange([0x80, 0x3F, 0x00, 0xC0]);              // c: bf16 1.0 (0x3F80), -2.0 (0xC000)
        Assert.Equal(expected.ToArray(), File.ReadAllBytes(path));
    }

    [Fact]
    public void Golden_WithMetadata_PutsMetadataFirst()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("golden-meta.safetensors");
        SafetensorsWriter.Write(path,
            [new("b", tensor(new float[] { 1f, 2f })), new("a", tensor(new long[] { 7 })), new("c", tensor(new float[] { 1f, -2f }).to(ScalarType.BFloat16))],
            new Dictionary<string, string> { ["format"] = "pt" });

        const string json =
            "{\"__metadata__\":{\"format\":\"pt\"}," +
            "\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}," +
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}," +
            "\"c\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[16,20]}}";
        Assert.Equal(195, json.Length);
        var expected = new List<byte> { 200, 0, 0, 0, 0, 0, 0, 0 }; // 195 + 5 spaces
        expected.AddRange(Encoding.ASCII.GetBytes(json));
        expected.AddRange([0x20, 0x20, 0x20, 0x20, 0x20]);
        expected.AddRange([7, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40, 0x80, 0x3F, 0x00, 0xC0]);
        Assert.Equal(expected.ToArray(), File.ReadAllBytes(path));
    }

    [Fact]
    public void Golden_RustLibraryTestVectors()
    {
        // Byte arrays from the safetensors crate's own unit tests (test_serialization, test_empty).
        using var scope = NewDisposeScope();
        string path = _dir.File("rust.safetensors");
        SafetensorsWriter.Write(path, [new("attn.0", arange(6, dtype: ScalarType.Float32).reshape(1, 2, 3))]);
        byte[] attn =
        [
            64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100,
            116, 121, 112, 101, 34, 58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34,
            58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100, 97, 116, 97, 95, 111, 102, 102, 115,
            101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0, 0, 0, 128, 63,
            0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64,
        ];
        Assert.Equal(attn, File.ReadAllBytes(path));

        SafetensorsWriter.Write(path, []);
        Assert.Equal([8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32], File.ReadAllBytes(path));
        using (var r = SafetensorsReader.Open(path)) Assert.Empty(r.Entries);

        SafetensorsWriter.Write(path, [], new Dictionary<string, string> { ["framework"] = "pt" });
        byte[] meta =
        [
            40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95,
            95, 34, 58, 123, 34, 102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112,
            116, 34, 125, 125, 32, 32, 32, 32, 32,
        ];
        Assert.Equal(meta, File.ReadAllBytes(path));
    }

    [Fact]
    public void Layout_FollowsRustDtypeOrder_ThenUtf8NameOrder()
    {
        using var scope = NewDisposeScope();
        var names = new (string Name, ScalarType Type)[]
        {
            ("f64", ScalarType.Float64), ("i64", ScalarType.Int64), ("f32", ScalarType.Float32), ("i32", ScalarType.Int32),
            ("f16", ScalarType.Float16), ("bf16", ScalarType.BFloat16), ("i16", ScalarType.Int16), ("i8", ScalarType.Int8),
            ("u8", ScalarType.Byte), ("bool", ScalarType.Bool),
            // Same dtype: UTF-8 byte order, which differs from UTF-16 ordinal order for these two.
            ("\uFF61", ScalarType.Float32), ("\U0001F600", ScalarType.Float32), ("Z", ScalarType.Float32), ("a", ScalarType.Float32),
        };
        string path = _dir.File("order.safetensors");
        SafetensorsWriter.Write(path, names.Select(n => new KeyValuePair<string, Tensor>(n.Name, zeros(new long[] { 1 }, n.Type))));

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(
            ["i64", "f64", "Z", "a", "f32", "\uFF61", "\U0001F600", "i32", "bf16", "f16", "i16", "i8", "u8", "bool"],
            reader.Entries.Select(e => e.Name));
        // The header lists them in the same order.
        string header = Encoding.UTF8.GetString(File.ReadAllBytes(path), 8, (int)reader.DataStart - 8);
        var headerOrder = JsonDocument.Parse(header).RootElement.EnumerateObject().Select(p => p.Name);
        Assert.Equal(reader.Entries.Select(e => e.Name), headerOrder);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    [InlineData(6)]
    [InlineData(7)]
    [InlineData(8)]
    public void HeaderIsPaddedWithSpaces_ToAMultipleOf8(int nameLength)
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("pad.safetensors");
        SafetensorsWriter.Write(path, [new(new string('é', nameLength), ones(1))]); // 2 UTF-8 bytes per char

        byte[] file = File.ReadAllBytes(path);
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(file);
        Assert.Equal(0UL, (8 + n) % 8);
        string header = Encoding.UTF8.GetString(file, 8, (int)n);
        string trimmed = header.TrimEnd(' ');
        Assert.EndsWith("}", trimmed);
        Assert.True(header.Length - trimmed.Length < 8);
        Assert.Equal(8 + (long)n + 4, file.LongLength);
    }

    // ---------------------------------------------------------------- malformed files

    private static readonly Dictionary<string, (byte[] File, string? Tensor, string Fragment)> s_malformed = BuildMalformed();

    public static TheoryData<string> MalformedCases => new(s_malformed.Keys);

    private static Dictionary<string, (byte[], string?, string)> BuildMalformed()
    {
        const string ok = "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]";
        var d = new Dictionary<string, (byte[], string?, string)>
        {
            ["shorter-than-8"] = ([1, 0, 0], null, "too short"),
            ["empty-file"] = ([], null, "too short"),
            ["header-length-0"] = ([0, 0, 0, 0, 0, 0, 0, 0, 1, 2], null, "header length is 0"),
            ["header-length-beyond-file"] = (StTest.Craft("{}", 0)[..9], null, "larger than"),
            ["header-length-over-100MB"] = ([0x00, 0xE1, 0xF5, 0x05, 0x01, 0, 0, 0, (byte)'{', (byte)'}'], null, "100000000"),
            ["header-length-max-u64"] = ([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, (byte)'{', (byte)'}'], null, "exceeds"),
            ["invalid-utf8"] = (StTest.Craft([(byte)'{', (byte)'"', 0xC3, 0x28, (byte)'"', (byte)':', (byte)'1', (byte)'}'], []), null, "UTF-8"),
            ["invalid-json"] = (StTest.Craft("{\"a\":", 0), null, "not valid JSON"),
            ["trailing-garbage"] = (StTest.Craft("{}x", 0), null, "not valid JSON"),
            ["json-array"] = (StTest.Craft("[1,2]", 0), null, "array, expected an object"),
            ["json-string"] = (StTest.Craft("\"x\"", 0), null, "expected an object"),
            ["lone-surrogate-name"] = (StTest.Craft("{\"\\ud800\":{" + ok + "}}", 8), null, "not valid Unicode"),
            ["duplicate-tensor"] = (StTest.Craft("{\"w\":{" + ok + "},\"w\":{" + ok + "}}", 8), "w", "twice"),
            ["duplicate-escaped-tensor"] = (StTest.Craft("{\"w\":{" + ok + "},\"\\u0077\":{" + ok + "}}", 8), "w", "twice"),
            ["duplicate-field"] = (StTest.Craft("{\"w\":{" + ok + ",\"dtype\":\"F32\"}}", 8), "w", "'dtype' appears twice"),
            ["entry-not-object"] = (StTest.Craft("{\"w\":5}", 0), "w", "number; expected an object"),
            ["entry-null"] = (StTest.Craft("{\"w\":null}", 0), "w", "null; expected an object"),
            ["missing-dtype"] = (StTest.Craft("{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "w", "no 'dtype'"),
            ["missing-shape"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8), "w", "no 'shape'"),
            ["missing-offsets"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8), "w", "no 'data_offsets'"),
            ["dtype-not-string"] = (StTest.Craft("{\"w\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "w", "'dtype' is a JSON number"),
            ["unknown-dtype"] = (StTest.Craft("{\"w\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "w", "unknown dtype 'F33'; supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL"),
            ["lowercase-dtype"] = (StTest.Craft("{\"w\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "w", "unknown dtype 'f32'"),
            ["unsupported-dtype"] = (StTest.Craft("{\"w\":{\"dtype\":\"U16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8), "w", "'U16' is not supported"),
            ["shape-not-array"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", 8), "w", "'shape' is a JSON string"),
            ["shape-float"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8), "w", "non-negative integers"),
            ["shape-string-dim"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8), "w", "non-negative integers"),
            ["negative-dim"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8), "w", "negative dimension -2"),
            ["huge-negative-dim"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[-99999999999999999999],\"data_offsets\":[0,8]}}", 8), "w", "negative dimension"),
            ["dim-above-2^63"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[9223372036854775808],\"data_offsets\":[0,8]}}", 8), "w", "non-negative integers below 2^63"),
            ["shape-overflow"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,8]}}", 8), "w", "overflows"),
            ["shape-overflow-with-zero"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[0,4611686018427387904,4611686018427387904],\"data_offsets\":[0,0]}}", 0), "w", "overflows"),
            ["size-mismatch"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12), "w", "data_offsets [0, 12] span 12 bytes but shape [2, 2] of F32 needs 16"),
            ["offsets-not-array"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":8}}", 8), "w", "'data_offsets' is 8"),
            ["offsets-three"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8), "w", "two non-negative integers"),
            ["offsets-negative"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[-1,-1]}}", 0), "w", "non-negative"),
            ["offsets-string"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[\"0\",\"8\"]}}", 8), "w", "non-negative"),
            ["begin-after-end"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8), "w", "begin after"),
            ["beyond-buffer"] = (StTest.Craft("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 8), "w", "beyond the data buffer, which is 8 bytes"),
            ["overlap"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12), "b", "overlap tensor 'a'"),
            ["same-range-twice"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "b", "overlap"),
            ["empty-inside-other"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}", 8), "e", "overlap"),
            ["hole"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12), "b", "hole"),
            ["hole-at-start"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), "a", "hole"),
            ["incomplete-buffer"] = (StTest.Craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8), null, "incomplete buffer"),
            ["data-without-tensors"] = (StTest.Craft("{}", 8), null, "incomplete buffer"),
            ["metadata-string"] = (StTest.Craft("{\"__metadata__\":\"x\"}", 0), null, "'__metadata__' is a JSON string"),
            ["metadata-array"] = (StTest.Craft("{\"__metadata__\":[]}", 0), null, "must be an object"),
            ["metadata-number-value"] = (StTest.Craft("{\"__metadata__\":{\"k\":1}}", 0), null, "'k' has a JSON number value"),
            ["metadata-object-value"] = (StTest.Craft("{\"__metadata__\":{\"k\":{}}}", 0), null, "values must be strings"),
            ["metadata-twice"] = (StTest.Craft("{\"__metadata__\":{},\"__metadata__\":{}}", 0), null, "twice"),
            ["deep-nesting"] = (StTest.Craft("{\"w\":" + new string('[', 500) + new string(']', 500) + "}", 0), null, "not valid JSON"),
        };
        return d;
    }

    [Theory]
    [MemberData(nameof(MalformedCases))]
    public void MalformedFile_ThrowsSafetensorsFormatException_NamingFileAndTensor(string caseName)
    {
        var (bytes, tensorName, fragment) = s_malformed[caseName];
        string path = _dir.File($"bad-{caseName}.safetensors");
        File.WriteAllBytes(path, bytes);

        var ex = Assert.Throws<SafetensorsFormatException>(() =>
        {
            using var reader = SafetensorsReader.Open(path);
        });

        Assert.StartsWith(path + ": ", ex.Message);
        Assert.Equal(path, ex.FilePath);
        Assert.Equal(tensorName, ex.TensorName);
        if (tensorName is not null) Assert.Contains($"tensor '{tensorName}'", ex.Message);
        Assert.Contains(fragment, ex.Message);
    }

    [Fact]
    public void ValidEdgeCases_AreAccepted()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("edge.safetensors");
        // Header order differs from data order; unknown fields ignored; null metadata; empty tensors; 0-d scalar; no padding.
        string header = "{\"__metadata__\":null,\"z\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[4,12],\"extra\":[1]}," +
                        "\"e\":{\"dtype\":\"BF16\",\"shape\":[0,3],\"data_offsets\":[12,12]}," +
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        var data = new byte[12];
        BinaryPrimitives.WriteSingleLittleEndian(data, 1.5f);
        BinaryPrimitives.WriteInt64LittleEndian(data.AsSpan(4), -3);
        File.WriteAllBytes(path, StTest.Craft(Encoding.UTF8.GetBytes(header), data));

        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(["a", "z", "e"], reader.Entries.Select(e => e.Name));
        Assert.Empty(reader.Metadata);
        Assert.Equal(1.5f, reader.ReadTensor("a").item<float>());
        var z = reader.ReadTensor("z");
        Assert.Empty(z.shape);
        Assert.Equal(-3L, z.item<long>());
        var e = reader.ReadTensor("e");
        Assert.Equal([0L, 3L], e.shape);
        Assert.Equal(ScalarType.BFloat16, e.dtype);
    }

    [Fact]
    public void FileTruncatedAfterOpen_ThrowsFormatException()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("shrink.safetensors");
        SafetensorsWriter.Write(path, [new("w", ones(16))]);
        using var reader = SafetensorsReader.Open(path);
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite)) fs.SetLength(fs.Length - 10);

        var ex = Assert.Throws<SafetensorsFormatException>(() => reader.ReadTensor("w"));
        Assert.Contains(path, ex.Message);
        Assert.Equal("w", ex.TensorName);
    }

    [Fact]
    public void UnknownTensor_ThrowsKeyNotFound_NamingFileAndTensor()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("known.safetensors");
        SafetensorsWriter.Write(path, [new("present", ones(1))]);
        using var reader = SafetensorsReader.Open(path);

        Assert.False(reader.Contains("absent"));
        Assert.True(reader.Contains("present"));
        var ex = Assert.Throws<KeyNotFoundException>(() => reader.ReadTensor("absent"));
        Assert.Contains(path, ex.Message);
        Assert.Contains("'absent'", ex.Message);
        Assert.Contains("present", ex.Message);
        Assert.Throws<KeyNotFoundException>(() => reader.GetEntry("absent"));
    }

    [Fact]
    public void DisposedReader_RefusesToRead()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("disposed.safetensors");
        SafetensorsWriter.Write(path, [new("w", ones(2))]);
        var reader = SafetensorsReader.Open(path);
        reader.Dispose();
        reader.Dispose();
        Assert.Throws<ObjectDisposedException>(() => reader.ReadTensor("w"));
        Assert.Throws<ObjectDisposedException>(() => reader.ReadInto("w", zeros(2)));
    }

    // ---------------------------------------------------------------- writer contract

    [Fact]
    public void ProducerThrowingHalfway_LeavesNoFileAndNoTempFile()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("atomic.safetensors");
        var layout = new[]
        {
            new SafetensorsTensorSpec("a", SafetensorsDType.F32, [4]),
            new SafetensorsTensorSpec("b", SafetensorsDType.F32, [4]),
            new SafetensorsTensorSpec("c", SafetensorsDType.F32, [4]),
        };
        int calls = 0;

        Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(path, layout, spec =>
            ++calls == 2 ? throw new InvalidOperationException("boom") : ones(4)));

        Assert.Equal(2, calls);
        Assert.False(File.Exists(path));
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path));
    }

    [Fact]
    public void FailedOverwrite_KeepsThePreviousFile()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("keep.safetensors");
        SafetensorsWriter.Write(path, [new("old", ones(3))]);
        byte[] before = File.ReadAllBytes(path);

        Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(path,
            [new SafetensorsTensorSpec("new", SafetensorsDType.F32, [3])], _ => throw new InvalidOperationException("boom")));

        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.EnumerateFileSystemEntries(_dir.Path));
    }

    [Fact]
    public void ProducerReturningWrongShape_Throws_AndWritesNothing()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("wrong.safetensors");
        var ex = Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(path,
            [new SafetensorsTensorSpec("w", SafetensorsDType.F32, [2, 3])], _ => ones(3, 2)));
        Assert.Contains("'w'", ex.Message);
        Assert.Contains("[3, 2]", ex.Message);
        Assert.Contains("[2, 3]", ex.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path));
    }

    [Fact]
    public void StreamingWriter_ConvertsToTheDeclaredDType_AndFreesWhatTheProducerCreated()
    {
        using var scope = NewDisposeScope();
        var kept = randn(3);
        var created = new List<Tensor>();
        string path = _dir.File("stream.safetensors");

        SafetensorsWriter.Write(path,
        [
            new SafetensorsTensorSpec("made", SafetensorsDType.BF16, [3]),
            new SafetensorsTensorSpec("kept", SafetensorsDType.F32, [3]),
        ], spec =>
        {
            if (spec.Name == "kept") return kept;
            var t = kept * 2;
            created.Add(t);
            return t;
        });

        Assert.False(kept.IsInvalid);
        Assert.True(created.Single().IsInvalid);
        using var reader = SafetensorsReader.Open(path);
        Assert.Equal(SafetensorsDType.BF16, reader.GetEntry("made").DType);
        StTest.AssertSame((kept * 2).to(ScalarType.BFloat16), reader.ReadTensor("made"));
        StTest.AssertSame(kept, reader.ReadTensor("kept"));
    }

    [Fact]
    public void Writer_RejectsBadLayouts()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("reject.safetensors");
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path, [new("x", ones(1)), new("x", ones(1))]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path, [new("__metadata__", ones(1))]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path, [new("c", ones(2, dtype: ScalarType.ComplexFloat32))]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path, [new("bad\ud800", ones(1))]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path,
            [new SafetensorsTensorSpec("neg", SafetensorsDType.F32, [-1])], _ => ones(1)));
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path));
    }

    [Fact]
    public void DTypeConversions_AreConsistent()
    {
        foreach (var dt in SafetensorsDTypes.All)
        {
            Assert.Equal(dt, SafetensorsDTypes.FromScalarType(SafetensorsDTypes.ToScalarType(dt)));
            Assert.True(SafetensorsDTypes.TryParse(SafetensorsDTypes.ToName(dt), out var parsed));
            Assert.Equal(dt, parsed);
            using var t = empty(1, SafetensorsDTypes.ToScalarType(dt));
            Assert.Equal(t.ElementSize, SafetensorsDTypes.ElementSize(dt));
        }
        Assert.False(SafetensorsDTypes.TryParse("f32", out _));
        Assert.False(SafetensorsDTypes.TryParse("1", out _));
        Assert.False(SafetensorsDTypes.TryParse(null, out _));
        Assert.Throws<ArgumentOutOfRangeException>(() => SafetensorsDTypes.FromScalarType(ScalarType.ComplexFloat64));
    }

    // ---------------------------------------------------------------- model directories

    private static List<SafetensorsTensorSpec> DirLayout() =>
    [
        new("model.embed_tokens.weight", SafetensorsDType.F32, [8, 4]),   // 128 bytes
        new("model.layers.0.w", SafetensorsDType.F32, [4, 4]),           // 64
        new("model.layers.0.b", SafetensorsDType.BF16, [4]),             // 8
        new("model.layers.1.w", SafetensorsDType.F32, [4, 4]),           // 64
        new("model.layers.1.n", SafetensorsDType.I64, []),               // 8
        new("model.norm.weight", SafetensorsDType.F32, [4]),             // 16
        new("lm_head.weight", SafetensorsDType.F32, [8, 4]),             // 128
        new("empty", SafetensorsDType.F16, [0, 4]),                      // 0
    ];

    private static Dictionary<string, Tensor> DirTensors(IEnumerable<SafetensorsTensorSpec> layout, int seed)
    {
        var rng = new Random(seed);
        return layout.ToDictionary(s => s.Name, s => StTest.RandomTensor(s.DType, s.Shape, rng));
    }

    [Fact]
    public void ShardedDirectory_RoundTrips_WithIndex()
    {
        using var scope = NewDisposeScope();
        var layout = DirLayout();
        var tensors = DirTensors(layout, 3);
        string dir = _dir.File("sharded");
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };

        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name], maxShardBytes: 100, metadata);

        var files = Directory.GetFiles(dir).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        // 128 | 64+8+8 (80) | 64+16 (80) | 128+0 -> 4 shards
        Assert.Equal(
        [
            "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors", "model.safetensors.index.json",
        ], files);
        using (var index = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "model.safetensors.index.json"))))
        {
            Assert.Equal(416, index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64());
            var map = index.RootElement.GetProperty("weight_map").EnumerateObject().ToList();
            Assert.Equal(layout.Select(s => s.Name).Order(StringComparer.Ordinal), map.Select(p => p.Name));
            Assert.Equal("model-00001-of-00004.safetensors", map.Single(p => p.Name == "model.embed_tokens.weight").Value.GetString());
            Assert.Equal("model-00004-of-00004.safetensors", map.Single(p => p.Name == "empty").Value.GetString());
        }

        using var ckpt = SafetensorsCheckpoint.OpenDirectory(dir);
        Assert.Equal(4, ckpt.FilePaths.Count);
        Assert.Equal("pt", ckpt.Metadata["format"]);
        Assert.Equal(layout.Select(s => s.Name).Order(), ckpt.TensorNames.Order());
        foreach (var spec in layout)
        {
            StTest.AssertSame(tensors[spec.Name], ckpt.ReadTensor(spec.Name), spec.Name);
            Assert.Equal(spec.Shape, ckpt.GetEntry(spec.Name).Shape);
        }
        var bf16 = zeros(8, 4, ScalarType.BFloat16);
        ckpt.ReadInto("lm_head.weight", bf16);
        StTest.AssertSame(tensors["lm_head.weight"].to(ScalarType.BFloat16), bf16);
        Assert.Throws<KeyNotFoundException>(() => ckpt.ReadTensor("nope"));
    }

    [Fact]
    public void OversizedTensor_GetsItsOwnShard()
    {
        using var scope = NewDisposeScope();
        var layout = new List<SafetensorsTensorSpec>
        {
            new("small1", SafetensorsDType.U8, [10]),
            new("huge", SafetensorsDType.U8, [100]),
            new("small2", SafetensorsDType.U8, [10]),
            new("small3", SafetensorsDType.U8, [10]),
        };
        var tensors = DirTensors(layout, 4);
        string dir = _dir.File("oversized");

        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name], maxShardBytes: 30);

        using var ckpt = SafetensorsCheckpoint.OpenDirectory(dir);
        Assert.Equal(3, ckpt.FilePaths.Count);
        using var second = SafetensorsReader.Open(ckpt.FilePaths[1]);
        Assert.Equal(["huge"], second.Entries.Select(e => e.Name));
        using var third = SafetensorsReader.Open(ckpt.FilePaths[2]);
        Assert.Equal(["small2", "small3"], third.Entries.Select(e => e.Name));
    }

    [Fact]
    public void WriteDirectory_SingleShard_WritesPlainFile_AndSwitchingLayoutsRemovesStaleFiles()
    {
        using var scope = NewDisposeScope();
        var layout = DirLayout();
        var tensors = DirTensors(layout, 5);
        string dir = _dir.File("switch");
        File.WriteAllText(Path.Combine(Directory.CreateDirectory(dir).FullName, "config.json"), "{}");

        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name], maxShardBytes: 100);
        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name]);
        Assert.Equal(["config.json", "model.safetensors"], Directory.GetFiles(dir).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        using (var ckpt = SafetensorsCheckpoint.OpenDirectory(dir))
            foreach (var spec in layout) StTest.AssertSame(tensors[spec.Name], ckpt.ReadTensor(spec.Name));

        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name], maxShardBytes: 200);
        Assert.Equal(
            ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json"],
            Directory.GetFiles(dir).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    [Fact]
    public void WriteDirectory_ProducerFailure_LeavesTheDirectoryAsItWas()
    {
        using var scope = NewDisposeScope();
        var layout = DirLayout();
        string dir = _dir.File("fail");
        Func<SafetensorsTensorSpec, Tensor> failing(Dictionary<string, Tensor> t) =>
            s => s.Name == "model.norm.weight" ? throw new InvalidOperationException("boom") : t[s.Name];

        // Into an empty directory: nothing at all is left behind.
        Assert.Throws<InvalidOperationException>(() =>
            SafetensorsCheckpoint.WriteDirectory(dir, layout, failing(DirTensors(layout, 6)), maxShardBytes: 100));
        Assert.Empty(Directory.EnumerateFileSystemEntries(dir));

        // Over an earlier sharded checkpoint: every file keeps its bytes, and it still loads.
        var old = DirTensors(layout, 7);
        SafetensorsCheckpoint.WriteDirectory(dir, layout, s => old[s.Name], maxShardBytes: 100);
        var before = Directory.GetFiles(dir).Order(StringComparer.Ordinal).Select(f => (f, File.ReadAllBytes(f))).ToList();
        Assert.Throws<InvalidOperationException>(() =>
            SafetensorsCheckpoint.WriteDirectory(dir, layout, failing(DirTensors(layout, 8)), maxShardBytes: 100));
        var after = Directory.GetFiles(dir).Order(StringComparer.Ordinal).Select(f => (f, File.ReadAllBytes(f))).ToList();
        Assert.Equal(before.Select(b => b.f), after.Select(a => a.f));
        for (int i = 0; i < before.Count; i++) Assert.Equal(before[i].Item2, after[i].Item2);
        using var ckpt = SafetensorsCheckpoint.OpenDirectory(dir);
        StTest.AssertSame(old["lm_head.weight"], ckpt.ReadTensor("lm_head.weight"));
    }

    private string WriteShards(string name, params (string File, string[] Tensors)[] shards)
    {
        string dir = Directory.CreateDirectory(_dir.File(name)).FullName;
        foreach (var (file, names) in shards)
            SafetensorsWriter.Write(Path.Combine(dir, file), names.Select(n => new KeyValuePair<string, Tensor>(n, ones(2))));
        return dir;
    }

    private static void WriteIndex(string dir, string weightMapJson) =>
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"),
            "{\"metadata\": {\"total_size\": 0}, \"weight_map\": " + weightMapJson + "}");

    [Fact]
    public void OpenDirectory_ReportsInconsistentCheckpoints()
    {
        using var scope = NewDisposeScope();

        string empty = Directory.CreateDirectory(_dir.File("empty")).FullName;
        var ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(empty));
        Assert.Contains(empty, ex.Message);
        Assert.Contains("model.safetensors", ex.Message);

        string missingDir = _dir.File("does-not-exist");
        Assert.Contains(missingDir, Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(missingDir)).Message);

        string missingShard = WriteShards("missing-shard", ("s1.safetensors", ["a"]));
        WriteIndex(missingShard, "{\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\"}");
        ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(missingShard));
        Assert.Contains(missingShard, ex.Message);
        Assert.Contains("s2.safetensors", ex.Message);
        Assert.Contains("does not exist", ex.Message);

        string absent = WriteShards("absent", ("s1.safetensors", ["a"]), ("s2.safetensors", ["b"]));
        WriteIndex(absent, "{\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\", \"c\": \"s2.safetensors\"}");
        ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(absent));
        Assert.Contains(absent, ex.Message);
        Assert.Equal("c", ex.TensorName);
        Assert.Contains("does not contain it", ex.Message);

        string extra = WriteShards("extra", ("s1.safetensors", ["a", "x"]), ("s2.safetensors", ["b"]));
        WriteIndex(extra, "{\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\"}");
        ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(extra));
        Assert.Contains(extra, ex.Message);
        Assert.Equal("x", ex.TensorName);
        Assert.Contains("does not list it", ex.Message);

        string twice = WriteShards("twice", ("s1.safetensors", ["a", "b"]), ("s2.safetensors", ["b"]));
        WriteIndex(twice, "{\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\"}");
        ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(twice));
        Assert.Contains(twice, ex.Message);
        Assert.Equal("b", ex.TensorName);
        Assert.Contains("two shards", ex.Message);

        string wrongShard = WriteShards("wrong-shard", ("s1.safetensors", ["a"]), ("s2.safetensors", ["b"]));
        WriteIndex(wrongShard, "{\"a\": \"s2.safetensors\", \"b\": \"s2.safetensors\"}");
        ex = Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(wrongShard));
        Assert.Contains(wrongShard, ex.Message);

        string badJson = WriteShards("bad-json", ("s1.safetensors", ["a"]));
        File.WriteAllText(Path.Combine(badJson, "model.safetensors.index.json"), "{\"weight_map\": ");
        Assert.Contains(badJson, Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(badJson)).Message);

        string noMap = WriteShards("no-map", ("s1.safetensors", ["a"]));
        File.WriteAllText(Path.Combine(noMap, "model.safetensors.index.json"), "{\"metadata\": {}}");
        Assert.Contains("weight_map", Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(noMap)).Message);

        string escape = WriteShards("escape", ("s1.safetensors", ["a"]));
        WriteIndex(escape, "{\"a\": \"../escape/s1.safetensors\"}");
        Assert.Contains("plain file name", Assert.ThrowsAny<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(escape)).Message);

        string corruptShard = WriteShards("corrupt-shard", ("s1.safetensors", ["a"]));
        File.WriteAllBytes(Path.Combine(corruptShard, "s2.safetensors"), [1, 2, 3]);
        WriteIndex(corruptShard, "{\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\"}");
        var sfe = Assert.Throws<SafetensorsFormatException>(() => SafetensorsCheckpoint.OpenDirectory(corruptShard));
        Assert.Contains(Path.Combine(corruptShard, "s2.safetensors"), sfe.Message);
    }

    [Fact]
    public void OpenFile_AndDisposedCheckpoint()
    {
        using var scope = NewDisposeScope();
        string path = _dir.File("one.safetensors");
        SafetensorsWriter.Write(path, [new("w", ones(2))]);
        var ckpt = SafetensorsCheckpoint.OpenFile(path);
        Assert.Equal(["w"], ckpt.TensorNames);
        Assert.True(ckpt.Contains("w"));
        ckpt.Dispose();
        Assert.Throws<ObjectDisposedException>(() => ckpt.ReadTensor("w"));
    }
}
