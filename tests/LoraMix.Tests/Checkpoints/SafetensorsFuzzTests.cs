using System.Buffers.Binary;
using System.Text;
using System.Text.RegularExpressions;
using CsCheck;
using LoraMix.Checkpoints;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

/// <summary>Property tests: random tensor sets round-trip, and corrupted files fail only with SafetensorsFormatException.</summary>
public sealed partial class SafetensorsFuzzTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    // ---------------------------------------------------------------- generators

    /// <summary>A tensor to generate: dtype, shape and a seed for its bytes.</summary>
    public sealed record TensorCase(string Name, SafetensorsDType DType, long[] Shape, int Seed)
    {
        public override string ToString() => $"{Name}:{DType}[{string.Join(",", Shape)}]#{Seed}";
    }

    private static readonly Gen<string> GenNamePart =
        Gen.Int[0, 11].Select(i => new[] { "a", "b", "Z", "w", ".", "_", "0", "é", "中", "😀", "\"", "\\" }[i]).Array[0, 5]
            .Select(parts => string.Concat(parts));

    private static readonly Gen<long[]> GenShape = Gen.Int[0, 4].Array[0, 3].Select(dims => dims.Select(d => (long)d).ToArray());

    private static readonly Gen<SafetensorsDType> GenDType =
        Gen.Int[0, SafetensorsDTypes.All.Count - 1].Select(i => SafetensorsDTypes.All[i]);

    private static readonly Gen<TensorCase[]> GenTensorSet =
        Gen.Select(GenNamePart, GenDType, GenShape, Gen.Int).Array[0, 7]
            .Select(items => items.Select((t, i) => new TensorCase($"{t.Item1}#{i}", t.Item2, t.Item3, t.Item4)).ToArray());

    private static readonly Gen<Dictionary<string, string>?> GenMetadata =
        Gen.Select(GenNamePart, GenNamePart).Array[0, 3].Select(pairs => pairs.Length == 0
            ? null
            : pairs.Select((p, i) => (Key: p.Item1 + i, Value: p.Item2)).ToDictionary(p => p.Key, p => p.Value));

    private static Dictionary<string, Tensor> Materialize(TensorCase[] cases) =>
        cases.ToDictionary(c => c.Name, c => StTest.RandomTensor(c.DType, c.Shape, new Random(c.Seed)));

    // ---------------------------------------------------------------- (a) round trips

    [Fact]
    public void RandomTensorSets_RoundTrip()
    {
        Gen.Select(GenTensorSet, GenMetadata).Sample((cases, metadata) =>
        {
            using var scope = NewDisposeScope();
            var tensors = Materialize(cases);
            string path = _dir.File(Guid.NewGuid().ToString("N") + ".safetensors");

            SafetensorsWriter.Write(path, tensors, metadata);

            using var reader = SafetensorsReader.Open(path);
            Assert.Equal((metadata ?? []).OrderBy(kv => kv.Key, StringComparer.Ordinal),
                reader.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal));
            Assert.Equal(tensors.Count, reader.Entries.Count);
            Assert.Equal(0, reader.DataStart % 8);
            Assert.Equal(reader.FileLength, reader.DataStart + reader.Entries.Sum(e => e.ByteLength));
            // Data order = descending Rust dtype order, then UTF-8 name order.
            var expectedOrder = cases
                .OrderByDescending(c => SafetensorsDTypes.RustOrder(c.DType))
                .ThenBy(c => Encoding.UTF8.GetBytes(c.Name), Utf8Comparer.Instance)
                .Select(c => c.Name);
            Assert.Equal(expectedOrder, reader.Entries.Select(e => e.Name));
            foreach (var (name, expected) in tensors)
                StTest.AssertSame(expected, reader.ReadTensor(name), name);
            File.Delete(path);
        }, iter: 150);
    }

    [Fact]
    public void RandomTensorSets_RoundTrip_ThroughShardedDirectories()
    {
        Gen.Select(GenTensorSet, Gen.Long[1, 256]).Sample((cases, maxShard) =>
        {
            using var scope = NewDisposeScope();
            var tensors = Materialize(cases);
            var layout = cases.Select(c => new SafetensorsTensorSpec(c.Name, c.DType, c.Shape)).ToList();
            string dir = _dir.File(Guid.NewGuid().ToString("N"));

            SafetensorsCheckpoint.WriteDirectory(dir, layout, s => tensors[s.Name], maxShard);

            using var ckpt = SafetensorsCheckpoint.OpenDirectory(dir);
            Assert.Equal(layout.Select(s => s.Name).Order(StringComparer.Ordinal), ckpt.TensorNames.Order(StringComparer.Ordinal));
            Assert.Equal(ckpt.FilePaths.Count > 1, File.Exists(Path.Combine(dir, "model.safetensors.index.json")));
            foreach (var path in ckpt.FilePaths)
            {
                using var shard = SafetensorsReader.Open(path);
                long bytes = shard.Entries.Sum(e => e.ByteLength);
                // Over the limit only when one non-empty tensor is too big on its own (empty tensors never open a shard).
                Assert.True(bytes <= maxShard || shard.Entries.Count(e => e.ByteLength > 0) == 1, $"{path}: {bytes} bytes in {shard.Entries.Count} tensors");
            }
            foreach (var (name, expected) in tensors)
                StTest.AssertSame(expected, ckpt.ReadTensor(name), name);
            ckpt.Dispose();
            Directory.Delete(dir, recursive: true);
        }, iter: 60);
    }

    // ---------------------------------------------------------------- (b) corruptions

    /// <summary>A valid file to corrupt: mixed dtypes, a 0-d tensor, an empty tensor and metadata.</summary>
    private static readonly Lazy<byte[]> s_base = new(() =>
    {
        using var scope = NewDisposeScope();
        var rng = new Random(42);
        string path = Path.Combine(Path.GetTempPath(), $"loramix-st-base-{Guid.NewGuid():N}.safetensors");
        try
        {
            SafetensorsWriter.Write(path,
            [
                new("model.w", StTest.RandomTensor(SafetensorsDType.F32, [3, 4], rng)),
                new("model.b", StTest.RandomTensor(SafetensorsDType.BF16, [4], rng)),
                new("step", StTest.RandomTensor(SafetensorsDType.I64, [], rng)),
                new("mask", StTest.RandomTensor(SafetensorsDType.BOOL, [2, 3], rng)),
                new("ids", StTest.RandomTensor(SafetensorsDType.I32, [5], rng)),
                new("none", StTest.RandomTensor(SafetensorsDType.F16, [0, 2], rng)),
                new("bytes", StTest.RandomTensor(SafetensorsDType.U8, [7], rng)),
            ], new Dictionary<string, string> { ["format"] = "pt", ["note"] = "fuzz" });
            return File.ReadAllBytes(path);
        }
        finally
        {
            File.Delete(path);
        }
    });

    /// <summary>One way of damaging a file; <see cref="Apply"/> is deterministic.</summary>
    public abstract record Corruption
    {
        public abstract byte[] Apply(byte[] file);

        protected static (ulong N, string Header, byte[] Data) Split(byte[] file)
        {
            ulong n = BinaryPrimitives.ReadUInt64LittleEndian(file);
            return (n, Encoding.UTF8.GetString(file, 8, (int)n), file[(8 + (int)n)..]);
        }

        /// <summary>Reassembles a file from an edited header; with <paramref name="fixLength"/> the prefix matches it.</summary>
        protected static byte[] Join(ulong oldN, string header, byte[] data, bool fixLength)
        {
            byte[] h = Encoding.UTF8.GetBytes(header);
            var file = new byte[8 + h.Length + data.Length];
            BinaryPrimitives.WriteUInt64LittleEndian(file, fixLength ? (ulong)h.Length : oldN);
            h.CopyTo(file, 8);
            data.CopyTo(file, 8 + h.Length);
            return file;
        }
    }

    public sealed record Truncate(int Length) : Corruption
    {
        public override byte[] Apply(byte[] file) => file[..(Length % file.Length)];
    }

    public sealed record FlipBytes(int[] Positions, byte[] Masks, bool InHeader) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var copy = (byte[])file.Clone();
            int n = (int)BinaryPrimitives.ReadUInt64LittleEndian(file);
            int start = InHeader ? 8 : 8 + n, length = InHeader ? n : file.Length - 8 - n;
            if (length == 0) return copy;
            for (int i = 0; i < Positions.Length; i++)
                copy[start + Positions[i] % length] ^= Masks[i % Masks.Length] == 0 ? (byte)1 : Masks[i % Masks.Length];
            return copy;
        }
    }

    public sealed record SetLength(ulong Value) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var copy = (byte[])file.Clone();
            BinaryPrimitives.WriteUInt64LittleEndian(copy, Value);
            return copy;
        }
    }

    public sealed record ReplaceNumber(int Which, string Replacement, bool FixLength) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var (n, header, data) = Split(file);
            var numbers = Number().Matches(header);
            var m = numbers[Which % numbers.Count];
            return Join(n, header[..m.Index] + Replacement + header[(m.Index + m.Length)..], data, FixLength);
        }
    }

    public sealed record ReplaceDType(int Which, string Replacement, bool FixLength) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var (n, header, data) = Split(file);
            var dtypes = DType().Matches(header);
            var g = dtypes[Which % dtypes.Count].Groups[1];
            return Join(n, header[..g.Index] + Replacement + header[(g.Index + g.Length)..], data, FixLength);
        }
    }

    public sealed record ReplaceShape(int Which, long[] Dims, bool FixLength) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var (n, header, data) = Split(file);
            var shapes = Shape().Matches(header);
            var g = shapes[Which % shapes.Count].Groups[1];
            return Join(n, header[..g.Index] + string.Join(",", Dims) + header[(g.Index + g.Length)..], data, FixLength);
        }
    }

    public sealed record SpliceHeader(int Position, int Delete, string Insert, bool FixLength) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            var (n, header, data) = Split(file);
            int at = Position % (header.Length + 1);
            int del = Math.Min(Delete, header.Length - at);
            return Join(n, header[..at] + Insert + header[(at + del)..], data, FixLength);
        }
    }

    public sealed record ResizeData(int Delta) : Corruption
    {
        public override byte[] Apply(byte[] file) =>
            Delta >= 0 ? [.. file, .. new byte[Delta]] : file[..Math.Max(0, file.Length + Delta)];
    }

    public sealed record Both(Corruption First, Corruption Second) : Corruption
    {
        public override byte[] Apply(byte[] file)
        {
            byte[] once = First.Apply(file);
            // The second edit may assume a parseable frame; if the first broke it, keep the first alone.
            try { return Second.Apply(once); }
            catch (Exception e) when (e is ArgumentException or IndexOutOfRangeException or OverflowException or DivideByZeroException) { return once; }
        }
    }

    [GeneratedRegex(@"-?\d+")]
    private static partial Regex Number();

    [GeneratedRegex("\"dtype\":\"([^\"]*)\"")]
    private static partial Regex DType();

    [GeneratedRegex(@"""shape"":\[([^\]]*)\]")]
    private static partial Regex Shape();

    private static readonly Gen<string> GenNumberText = Gen.OneOf<string>(
        Gen.Int[0, 120].Select(i => i.ToString()),
        Gen.Long.Select(l => l.ToString()),
        Gen.ULong.Select(l => l.ToString()),
        Gen.OneOf("-1", "0", "1e3", "2.5", "-0", "\"7\"", "null", "[]", "{}", "9223372036854775807", "9223372036854775808",
            "18446744073709551616", "4611686018427387904", "00", "", "1,2", "]", "}"));

    private static readonly Gen<string> GenDTypeText = Gen.OneOf<string>(
        Gen.OneOf("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "F8_E4M3", "C64",
            "f32", "", "F32 ", "\\u0046\\u0033\\u0032", "\\\"", "\\ud800"),
        Gen.String[0, 6]);

    private static readonly Gen<long[]> GenDims = Gen.OneOf<long>(
        Gen.Long[0, 8], Gen.Long[-3, 3], Gen.Long, Gen.OneOf(long.MaxValue, 1L << 62, 1L << 31, 0L)).Array[0, 4];

    private static readonly Gen<string> GenInsert = Gen.OneOf<string>(
        Gen.OneOf("{", "}", "[", "]", ",", ":", "\"", "\\", "\"x\":1", "\"__metadata__\":{\"k\":1},", "\"z\":{},",
            "\"dup\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},", "\u0000", "\n", "é", "\\u0000", "\\ud800", "\"\\udc00\":1,"),
        Gen.String[0, 8]);

    private static readonly Gen<Corruption> GenSingle = Gen.Frequency<Corruption>(
        (2, Gen.Int[0, 100_000].Select(l => (Corruption)new Truncate(l))),
        (2, Gen.Select(Gen.Int[0, 100_000].Array[1, 4], Gen.Byte.Array[1, 4], Gen.Bool)
            .Select((p, m, h) => (Corruption)new FlipBytes(p, m, h))),
        (2, Gen.OneOf<ulong>(Gen.ULong, Gen.ULong[0, 700], Gen.OneOf(0UL, ulong.MaxValue, 100_000_000UL, 100_000_001UL, 1UL << 63))
            .Select(v => (Corruption)new SetLength(v))),
        (4, Gen.Select(Gen.Int[0, 1000], GenNumberText, Gen.Bool).Select((w, r, f) => (Corruption)new ReplaceNumber(w, r, f))),
        (2, Gen.Select(Gen.Int[0, 1000], GenDTypeText, Gen.Bool).Select((w, r, f) => (Corruption)new ReplaceDType(w, r, f))),
        (2, Gen.Select(Gen.Int[0, 1000], GenDims, Gen.Bool).Select((w, d, f) => (Corruption)new ReplaceShape(w, d, f))),
        (3, Gen.Select(Gen.Int[0, 1000], Gen.Int[0, 6], GenInsert, Gen.Bool).Select((p, d, s, f) => (Corruption)new SpliceHeader(p, d, s, f))),
        (1, Gen.Int[-40, 40].Select(d => (Corruption)new ResizeData(d))));

    private static readonly Gen<Corruption> GenCorruption = Gen.Frequency<Corruption>(
        (4, GenSingle),
        (1, Gen.Select(GenSingle, GenSingle).Select((a, b) => (Corruption)new Both(a, b))));

    [Fact]
    public void CorruptedFiles_EitherLoadOrThrowSafetensorsFormatException()
    {
        byte[] valid = s_base.Value;
        int loaded = 0, rejected = 0;
        GenCorruption.Sample(corruption =>
        {
            byte[] bytes = corruption.Apply(valid);
            string path = _dir.File(Guid.NewGuid().ToString("N") + ".safetensors");
            File.WriteAllBytes(path, bytes);
            try
            {
                Interlocked.Increment(ref LoadEverything(path) ? ref loaded : ref rejected);
            }
            finally
            {
                File.Delete(path);
            }
        }, iter: 1000);
        // Both outcomes occur (harmless data flips load; most header damage is caught), so the fuzzer is not degenerate.
        Assert.True(loaded > 0 && rejected > loaded, $"loaded {loaded}, rejected {rejected}");
    }

    [Fact]
    public void RandomHeaders_EitherLoadOrThrowSafetensorsFormatException()
    {
        // Structured-ish random JSON headers with a consistent length prefix and a random data buffer.
        var genEntry = Gen.Select(GenNamePart, GenDTypeText, GenDims, Gen.Int[0, 40].Array[0, 3])
            .Select((name, dtype, dims, offsets) =>
                $"\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{string.Join(",", dims)}],\"data_offsets\":[{string.Join(",", offsets)}]}}");
        var genFile = Gen.Select(genEntry.Array[0, 4], Gen.Int[0, 64], Gen.Bool)
            .Select((entries, dataLength, pad) => (Header: "{" + string.Join(",", entries) + "}" + (pad ? "   " : ""), DataLength: dataLength));
        genFile.Sample(t =>
        {
            string path = _dir.File(Guid.NewGuid().ToString("N") + ".safetensors");
            File.WriteAllBytes(path, StTest.Craft(t.Header, t.DataLength));
            try
            {
                LoadEverything(path);
            }
            finally
            {
                File.Delete(path);
            }
        }, iter: 500);
    }

    /// <summary>Opens the file and reads every tensor two ways: true when it loads, false on SafetensorsFormatException;
    /// any other exception fails the test.</summary>
    private static bool LoadEverything(string path)
    {
        using var scope = NewDisposeScope();
        try
        {
            using var reader = SafetensorsReader.Open(path);
            Assert.Equal(reader.FileLength, reader.DataStart + reader.Entries.Sum(e => e.ByteLength));
            foreach (var entry in reader.Entries)
            {
                var t = reader.ReadTensor(entry.Name);
                Assert.Equal(entry.Shape, t.shape);
                var converted = zeros(entry.Shape, ScalarType.Float32);
                reader.ReadInto(entry.Name, converted);
            }
            return true;
        }
        catch (SafetensorsFormatException e)
        {
            Assert.StartsWith(path + ": ", e.Message);
            return false;
        }
    }

    private sealed class Utf8Comparer : IComparer<byte[]>
    {
        public static readonly Utf8Comparer Instance = new();

        public int Compare(byte[]? x, byte[]? y) => x.AsSpan().SequenceCompareTo(y);
    }
}
