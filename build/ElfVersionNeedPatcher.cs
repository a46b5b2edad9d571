// Build-time helper (compiled by MSBuild's RoslynCodeTaskFactory, see LoraMix.NativeFix.targets).
// Marks version needs on libstdc++ that the host's libstdc++ does not define as weak (VER_FLG_WEAK),
// so the dynamic loader prints a warning instead of refusing to load the library.
#nullable enable
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public sealed class LoraMixWeakenMissingGlibcxxVersions : Task
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlagWeak = 0x2;

    [Required]
    public ITaskItem[] Libraries { get; set; } = Array.Empty<ITaskItem>();

    private static readonly string[] CandidateLibstdcxx =
    {
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib/aarch64-linux-gnu/libstdc++.so.6", "/lib/aarch64-linux-gnu/libstdc++.so.6",
        "/usr/lib64/libstdc++.so.6", "/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6",
    };

    public override bool Execute()
    {
        string? system = CandidateLibstdcxx.FirstOrDefault(File.Exists);
        if (system == null)
        {
            Log.LogMessage(MessageImportance.Normal, "LoraMix native fix: no system libstdc++.so.6 found; nothing to do.");
            return true;
        }
        byte[] systemBytes = File.ReadAllBytes(system);
        foreach (ITaskItem item in Libraries)
        {
            string path = item.GetMetadata("FullPath");
            try
            {
                PatchOne(path, system, systemBytes);
            }
            catch (Exception e) when (e is IOException || e is InvalidDataException || e is UnauthorizedAccessException)
            {
                Log.LogError("LoraMix native fix: could not patch '{0}': {1}", path, e.Message);
            }
        }
        return !Log.HasLoggedErrors;
    }

    private void PatchOne(string path, string systemLib, byte[] systemBytes)
    {
        byte[] elf = File.ReadAllBytes(path);
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
            throw new InvalidDataException("not an ELF file");
        if (elf[4] != 2 || elf[5] != 1)
            throw new InvalidDataException("only 64-bit little-endian ELF is supported");

        ulong shoff = BitConverter.ToUInt64(elf, 0x28);
        ushort shentsize = BitConverter.ToUInt16(elf, 0x3A);
        ushort shnum = BitConverter.ToUInt16(elf, 0x3C);
        var weakened = new List<string>();
        for (int s = 0; s < shnum; s++)
        {
            int sh = checked((int)(shoff + (ulong)(s * shentsize)));
            if (BitConverter.ToUInt32(elf, sh + 4) != ShtGnuVerneed) continue;
            int secOffset = checked((int)BitConverter.ToUInt64(elf, sh + 0x18));
            uint link = BitConverter.ToUInt32(elf, sh + 0x28);
            uint count = BitConverter.ToUInt32(elf, sh + 0x2C);
            int strSh = checked((int)(shoff + (ulong)(link * shentsize)));
            int strOffset = checked((int)BitConverter.ToUInt64(elf, strSh + 0x18));

            int vn = secOffset;
            for (uint i = 0; i < count; i++)
            {
                ushort auxCount = BitConverter.ToUInt16(elf, vn + 2);
                string file = ReadCString(elf, strOffset + (int)BitConverter.ToUInt32(elf, vn + 4));
                int aux = vn + (int)BitConverter.ToUInt32(elf, vn + 8);
                for (int a = 0; a < auxCount; a++)
                {
                    string version = ReadCString(elf, strOffset + (int)BitConverter.ToUInt32(elf, aux + 8));
                    if (file == "libstdc++.so.6" && !Defines(systemBytes, version))
                    {
                        ushort flags = BitConverter.ToUInt16(elf, aux + 4);
                        if ((flags & VerFlagWeak) == 0)
                        {
                            flags |= VerFlagWeak;
                            elf[aux + 4] = (byte)(flags & 0xff);
                            elf[aux + 5] = (byte)(flags >> 8);
                            weakened.Add(version);
                        }
                    }
                    uint next = BitConverter.ToUInt32(elf, aux + 12);
                    if (next == 0) break;
                    aux += (int)next;
                }
                uint vnNext = BitConverter.ToUInt32(elf, vn + 12);
                if (vnNext == 0) break;
                vn += (int)vnNext;
            }
        }

        if (weakened.Count == 0)
        {
            Log.LogMessage(MessageImportance.Low, "LoraMix native fix: '{0}' needs nothing ({1} is new enough or already patched).", path, systemLib);
            return;
        }
        string temp = path + ".loramix-tmp";
        File.WriteAllBytes(temp, elf);
        // Delete first: the output copy may be a hard link into the NuGet cache, which must stay untouched.
        File.Delete(path);
        File.Move(temp, path);
        Log.LogMessage(MessageImportance.High, "LoraMix native fix: weakened {0} in '{1}' ({2} lacks them).",
            string.Join(", ", weakened), path, systemLib);
    }

    private static bool Defines(byte[] lib, string version)
    {
        // A version definition appears as a NUL-terminated string in the library's dynamic string table.
        byte[] needle = Encoding.ASCII.GetBytes(version + "\0");
        return IndexOf(lib, needle) >= 0;
    }

    private static int IndexOf(byte[] haystack, byte[] needle)
    {
        for (int i = 0; i <= haystack.Length - needle.Length; i++)
        {
            if (haystack[i] != needle[0]) continue;
            int j = 1;
            while (j < needle.Length && haystack[i + j] == needle[j]) j++;
            if (j == needle.Length && (i == 0 || haystack[i - 1] == 0)) return i;
        }
        return -1;
    }

    private static string ReadCString(byte[] data, int offset)
    {
        int end = offset;
        while (end < data.Length && data[end] != 0) end++;
        return Encoding.ASCII.GetString(data, offset, end - offset);
    }
}
