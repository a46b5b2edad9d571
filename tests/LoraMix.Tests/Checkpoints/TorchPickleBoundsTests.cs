using System.IO.Compression;
using LoraMix.Checkpoints;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

/// <summary>
/// A small torch zip checkpoint whose storage declares far more data than its tensors use (a deflated run of zeros:
/// 64 MiB from about 64 KB) costs nothing beyond the tensors: the caller's check of names and shapes runs before any
/// storage is inflated, and only the prefix of a storage its views reach is inflated and allocated.
/// </summary>
public sealed class TorchPickleBoundsTests
{
    private const int StorageElements = 16 << 20;   // 64 MiB of float32

    /// <summary>A stream that counts the bytes read from it.</summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        public long BytesRead { get; private set; }
        public override bool CanRead => true;
        public override bool CanSeek => true;
        public override bool CanWrite => false;
        public override long Length => inner.Length;
        public override long Position { get => inner.Position; set => inner.Position = value; }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => Count(inner.Read(buffer, offset, count));
        public override int Read(Span<byte> buffer) => Count(inner.Read(buffer));
        public override long Seek(long offset, SeekOrigin origin) => inner.Seek(offset, origin);
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        private int Count(int n)
        {
            BytesRead += n;
            return n;
        }
    }

    /// <summary>{"w": a [2, 3] view at the start of a FloatStorage of <see cref="StorageElements"/> elements}, every
    /// record deflated; returns the file and the compressed size of the storage record.</summary>
    private static (byte[] File, long CompressedStorage) SmallViewOfAHugeStorage()
    {
        var pk = new Pk().Proto(2).Raw(0x7d).Put(0).X("w")
            .Global("torch._utils", "_rebuild_tensor_v2")
            .Mark().Mark().X("storage").Global("torch", "FloatStorage").X("0").X("cpu").J(StorageElements).Op('t').Op('Q')
            .K(0).K(2).K(3).Tuple2().K(3).K(1).Tuple2().False()
            .Global("collections", "OrderedDict").Op(')').Op('R').Op('t').Op('R')
            .Op('s').Op('.');
        var data = new byte[StorageElements * 4L];
        TpTest.F32Bytes(1, 2, 3, 4, 5, 6).CopyTo(data, 0);
        byte[] stored = TpTest.Archive(pk.Bytes, ("0", data));

        using var src = new ZipArchive(new MemoryStream(stored), ZipArchiveMode.Read);
        using var outMs = new MemoryStream();
        using (var dst = new ZipArchive(outMs, ZipArchiveMode.Create, leaveOpen: true))
            foreach (var e in src.Entries)
            {
                using var i = e.Open();
                using var o = dst.CreateEntry(e.FullName, CompressionLevel.SmallestSize).Open();
                i.CopyTo(o);
            }
        byte[] file = outMs.ToArray();
        using var check = new ZipArchive(new MemoryStream(file), ZipArchiveMode.Read);
        long compressed = check.Entries.Single(e => e.FullName.EndsWith("data/0", StringComparison.Ordinal)).CompressedLength;
        return (file, compressed);
    }

    private static readonly Lazy<(byte[] File, long CompressedStorage)> s_file = new(SmallViewOfAHugeStorage);

    [Fact]
    public void TheCallersCheck_RunsBeforeAnyStorageIsInflated()
    {
        var (file, compressed) = s_file.Value;
        using var stream = new CountingStream(new MemoryStream(file, writable: false));
        IReadOnlyList<TorchPickleEntry>? seen = null;
        var e = Assert.Throws<CheckpointFormatException>(() => TorchPickleReader.Read(stream, "adapter_model.bin", entries =>
        {
            seen = entries;
            throw new CheckpointFormatException("adapter_model.bin", "w", "refused by the caller");
        }));
        Assert.Contains("refused by the caller", e.Message);
        var w = Assert.Single(seen!);
        Assert.Equal("w", w.Name);
        Assert.Equal(new long[] { 2, 3 }, w.Shape);
        Assert.Equal(StorageElements, w.StorageNumel);
        // data.pkl and the zip directory were read; the storage record (~64 KB compressed) was not.
        Assert.True(stream.BytesRead < compressed / 2, $"read {stream.BytesRead} bytes; the storage record alone is {compressed}");
    }

    [Fact]
    public void OnlyThePrefixTheViewsReach_IsInflated()
    {
        var (file, compressed) = s_file.Value;
        Assert.True(compressed < file.Length && file.Length < 1 << 20, $"the fixture should be small: {file.Length} bytes");
        using var stream = new CountingStream(new MemoryStream(file, writable: false));
        using var scope = NewDisposeScope();
        var loaded = TorchPickleReader.Read(stream, "adapter_model.bin");
        Assert.Equal(new float[] { 1, 2, 3, 4, 5, 6 }, loaded["w"].data<float>().ToArray());
        Assert.Equal(new long[] { 2, 3 }, loaded["w"].shape);
        Assert.True(stream.BytesRead < compressed / 2, $"read {stream.BytesRead} bytes; the storage record alone is {compressed}");
    }
}
