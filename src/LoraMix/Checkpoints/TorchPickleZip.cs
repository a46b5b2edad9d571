using System.Buffers.Binary;
using System.Text;

namespace LoraMix.Checkpoints;

/// <summary>
/// Writes a zip the way PyTorch's <c>PyTorchStreamWriter</c> (miniz) does for <c>torch.save</c>: every record stored
/// (uncompressed) under one folder, its data aligned to 64 bytes by an extra field <c>"FB" len "ZZZ..."</c> in the local
/// header, general-purpose flags 0x0808 (UTF-8 names, data descriptor), zero DOS time, a data descriptor after each record,
/// and ZIP64 end-of-central-directory records (ZIP64 extra fields where sizes or offsets reach 4 GiB).
/// </summary>
internal sealed class TorchPickleZipWriter
{
    internal const int Alignment = 64;

    private const uint LocalHeaderSig = 0x04034b50;
    private const uint DataDescriptorSig = 0x08074b50;
    private const uint CentralHeaderSig = 0x02014b50;
    private const uint Zip64EocdSig = 0x06064b50;
    private const uint Zip64LocatorSig = 0x07064b50;
    private const uint EocdSig = 0x06054b50;
    private const ushort Flags = 0x0808;
    private const long Max32 = 0xFFFFFFFF;

    private readonly Stream _out;
    private readonly string _prefix;
    private long _pos;
    private readonly List<(byte[] Name, long Offset, long Size, uint Crc)> _central = [];

    public TorchPickleZipWriter(Stream output, string archiveName)
    {
        _out = output;
        _prefix = archiveName + "/";
    }

    /// <summary>Writes a record from managed memory.</summary>
    public void WriteRecord(string name, ReadOnlySpan<byte> data)
    {
        long offset = BeginRecord(name, data.Length);
        uint crc = Crc32.Update(0, data);
        Write(data);
        EndRecord(name, offset, data.Length, crc);
    }

    /// <summary>Writes a record of <paramref name="size"/> bytes produced in chunks by <paramref name="produce"/>, which
    /// writes through the given callback; the CRC is computed on the fly.</summary>
    public void WriteRecord(string name, long size, Action<Action<ReadOnlySpan<byte>>> produce)
    {
        long offset = BeginRecord(name, size);
        uint crc = 0;
        long written = 0;
        produce(chunk =>
        {
            crc = Crc32.Update(crc, chunk);
            Write(chunk);
            written += chunk.Length;
        });
        if (written != size)
            throw new InvalidOperationException($"record '{name}': {written} bytes were produced, {size} were announced");
        EndRecord(name, offset, size, crc);
    }

    private long BeginRecord(string name, long size)
    {
        byte[] fullName = Encoding.UTF8.GetBytes(_prefix + name);
        long offset = _pos;
        bool zip64 = size >= Max32 || offset >= Max32;
        int zip64Len = zip64 ? 4 + (size >= Max32 ? 16 : 0) + (offset >= Max32 ? 8 : 0) : 0;
        long start = offset + 30 + fullName.Length + zip64Len + 4;
        int padding = (int)((Alignment - start % Alignment) % Alignment);

        Span<byte> h = stackalloc byte[30];
        BinaryPrimitives.WriteUInt32LittleEndian(h, LocalHeaderSig);
        BinaryPrimitives.WriteUInt16LittleEndian(h[4..], 0);      // version needed (miniz: 0 for stored)
        BinaryPrimitives.WriteUInt16LittleEndian(h[6..], Flags);
        BinaryPrimitives.WriteUInt16LittleEndian(h[8..], 0);      // method: stored
        BinaryPrimitives.WriteUInt32LittleEndian(h[10..], 0);     // DOS time and date
        BinaryPrimitives.WriteUInt32LittleEndian(h[14..], 0);     // CRC: in the data descriptor
        BinaryPrimitives.WriteUInt32LittleEndian(h[18..], 0);     // sizes: in the data descriptor
        BinaryPrimitives.WriteUInt32LittleEndian(h[22..], 0);
        BinaryPrimitives.WriteUInt16LittleEndian(h[26..], (ushort)fullName.Length);
        BinaryPrimitives.WriteUInt16LittleEndian(h[28..], (ushort)(zip64Len + 4 + padding));
        Write(h);
        Write(fullName);
        if (zip64)
        {
            var extra = new byte[zip64Len];
            BinaryPrimitives.WriteUInt16LittleEndian(extra, 0x0001);
            BinaryPrimitives.WriteUInt16LittleEndian(extra.AsSpan(2), (ushort)(zip64Len - 4));
            int p = 4;
            if (size >= Max32)
            {
                BinaryPrimitives.WriteInt64LittleEndian(extra.AsSpan(p), size);
                BinaryPrimitives.WriteInt64LittleEndian(extra.AsSpan(p + 8), size);
                p += 16;
            }
            if (offset >= Max32) BinaryPrimitives.WriteInt64LittleEndian(extra.AsSpan(p), offset);
            Write(extra);
        }
        var pad = new byte[4 + padding];
        pad[0] = (byte)'F';
        pad[1] = (byte)'B';
        BinaryPrimitives.WriteUInt16LittleEndian(pad.AsSpan(2), (ushort)padding);
        pad.AsSpan(4).Fill((byte)'Z');
        Write(pad);
        return offset;
    }

    private void EndRecord(string name, long offset, long size, uint crc)
    {
        bool zip64 = size >= Max32 || offset >= Max32;
        Span<byte> d = stackalloc byte[24];
        BinaryPrimitives.WriteUInt32LittleEndian(d, DataDescriptorSig);
        BinaryPrimitives.WriteUInt32LittleEndian(d[4..], crc);
        if (zip64)
        {
            BinaryPrimitives.WriteInt64LittleEndian(d[8..], size);
            BinaryPrimitives.WriteInt64LittleEndian(d[16..], size);
            Write(d);
        }
        else
        {
            BinaryPrimitives.WriteUInt32LittleEndian(d[8..], (uint)size);
            BinaryPrimitives.WriteUInt32LittleEndian(d[12..], (uint)size);
            Write(d[..16]);
        }
        _central.Add((Encoding.UTF8.GetBytes(_prefix + name), offset, size, crc));
    }

    /// <summary>Writes the central directory and the (ZIP64) end records.</summary>
    public void Finish()
    {
        long cdStart = _pos;
        foreach (var (name, offset, size, crc) in _central)
        {
            bool bigSize = size >= Max32, bigOffset = offset >= Max32;
            int extraLen = bigSize || bigOffset ? 4 + (bigSize ? 16 : 0) + (bigOffset ? 8 : 0) : 0;
            var h = new byte[46 + name.Length + extraLen];
            BinaryPrimitives.WriteUInt32LittleEndian(h, CentralHeaderSig);
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(4), 0);    // version made by
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(6), 0);    // version needed
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(8), Flags);
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(10), 0);   // stored
            BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(12), 0);   // DOS time and date
            BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(16), crc);
            BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(20), bigSize ? uint.MaxValue : (uint)size);
            BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(24), bigSize ? uint.MaxValue : (uint)size);
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(28), (ushort)name.Length);
            BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(30), (ushort)extraLen);
            // comment length, disk start, internal and external attributes: 0
            BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(42), bigOffset ? uint.MaxValue : (uint)offset);
            name.CopyTo(h, 46);
            if (extraLen > 0)
            {
                int p = 46 + name.Length;
                BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(p), 0x0001);
                BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(p + 2), (ushort)(extraLen - 4));
                p += 4;
                if (bigSize)
                {
                    BinaryPrimitives.WriteInt64LittleEndian(h.AsSpan(p), size);
                    BinaryPrimitives.WriteInt64LittleEndian(h.AsSpan(p + 8), size);
                    p += 16;
                }
                if (bigOffset) BinaryPrimitives.WriteInt64LittleEndian(h.AsSpan(p), offset);
            }
            Write(h);
        }
        long cdSize = _pos - cdStart;
        long zip64Eocd = _pos;
        long count = _central.Count;

        Span<byte> z = stackalloc byte[56];
        z.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(z, Zip64EocdSig);
        BinaryPrimitives.WriteInt64LittleEndian(z[4..], 44);
        BinaryPrimitives.WriteUInt16LittleEndian(z[12..], 45);
        BinaryPrimitives.WriteUInt16LittleEndian(z[14..], 45);
        BinaryPrimitives.WriteInt64LittleEndian(z[24..], count);
        BinaryPrimitives.WriteInt64LittleEndian(z[32..], count);
        BinaryPrimitives.WriteInt64LittleEndian(z[40..], cdSize);
        BinaryPrimitives.WriteInt64LittleEndian(z[48..], cdStart);
        Write(z);

        Span<byte> l = stackalloc byte[20];
        BinaryPrimitives.WriteUInt32LittleEndian(l, Zip64LocatorSig);
        BinaryPrimitives.WriteUInt32LittleEndian(l[4..], 0);
        BinaryPrimitives.WriteInt64LittleEndian(l[8..], zip64Eocd);
        BinaryPrimitives.WriteUInt32LittleEndian(l[16..], 1);
        Write(l);

        Span<byte> e = stackalloc byte[22];
        e.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(e, EocdSig);
        ushort count16 = (ushort)Math.Min(count, 0xFFFF);
        BinaryPrimitives.WriteUInt16LittleEndian(e[8..], count16);
        BinaryPrimitives.WriteUInt16LittleEndian(e[10..], count16);
        BinaryPrimitives.WriteUInt32LittleEndian(e[12..], (uint)Math.Min(cdSize, Max32));
        BinaryPrimitives.WriteUInt32LittleEndian(e[16..], (uint)Math.Min(cdStart, Max32));
        Write(e);
    }

    private void Write(ReadOnlySpan<byte> bytes)
    {
        _out.Write(bytes);
        _pos += bytes.Length;
    }
}

/// <summary>CRC-32 (ISO-HDLC, the zip checksum), slicing-by-8.</summary>
internal static class Crc32
{
    private static readonly uint[] s_table = BuildTable();

    private static uint[] BuildTable()
    {
        var t = new uint[8 * 256];
        for (uint i = 0; i < 256; i++)
        {
            uint c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        for (int i = 0; i < 256; i++)
            for (int s = 1; s < 8; s++)
                t[s * 256 + i] = (t[(s - 1) * 256 + i] >> 8) ^ t[t[(s - 1) * 256 + i] & 0xFF];
        return t;
    }

    /// <summary>Continues a CRC (start with 0) over more bytes.</summary>
    public static uint Update(uint crc, ReadOnlySpan<byte> data)
    {
        var t = s_table;
        uint c = ~crc;
        int i = 0;
        for (; i + 8 <= data.Length; i += 8)
        {
            uint lo = c ^ BinaryPrimitives.ReadUInt32LittleEndian(data[i..]);
            uint hi = BinaryPrimitives.ReadUInt32LittleEndian(data[(i + 4)..]);
            c = t[7 * 256 + (lo & 0xFF)] ^ t[6 * 256 + ((lo >> 8) & 0xFF)] ^ t[5 * 256 + ((lo >> 16) & 0xFF)] ^ t[4 * 256 + (lo >> 24)] ^
                t[3 * 256 + (hi & 0xFF)] ^ t[2 * 256 + ((hi >> 8) & 0xFF)] ^ t[1 * 256 + ((hi >> 16) & 0xFF)] ^ t[hi >> 24];
        }
        for (; i < data.Length; i++) c = t[(c ^ data[i]) & 0xFF] ^ (c >> 8);
        return ~c;
    }
}
