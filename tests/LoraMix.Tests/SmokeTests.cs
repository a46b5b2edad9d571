using System.Text;
using TorchSharp;

namespace LoraMix.Tests;

public class SmokeTests
{
    [Fact]
    public void TorchSharpLoadsAndComputes()
    {
        using var a = torch.ones(2, 3);
        using var b = torch.ones(3, 4);
        using var c = a.matmul(b);
        Assert.Equal(3f, c[1, 2].item<float>());
        using var x = torch.tensor(new[] { 2.0f }).requires_grad_();
        using var y = (x * x).sum();
        y.backward();
        using var g = x.grad!;
        Assert.Equal(4f, g.item<float>());
    }

    /// <summary>
    /// The build's native fix: in this test's own output folder, libLibTorchSharp.so's need for GLIBCXX_3.4.32 is weak
    /// exactly when the host libstdc++ lacks that version, and the NuGet cache's copy is never modified.
    /// </summary>
    [Fact]
    public void NativeFixWeakensOnlyWhatTheHostLacks()
    {
        if (!OperatingSystem.IsLinux()) return;
        string? lib = Directory.GetFiles(AppContext.BaseDirectory, "libLibTorchSharp.so", SearchOption.AllDirectories).FirstOrDefault();
        Assert.NotNull(lib);
        string? host = new[] { "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6" }
            .FirstOrDefault(File.Exists);
        if (host is null) return;
        bool hostHas = Encoding.ASCII.GetString(File.ReadAllBytes(host)).Contains("\0GLIBCXX_3.4.32\0", StringComparison.Ordinal);
        var needs = VersionNeeds(File.ReadAllBytes(lib));
        Assert.True(needs.ContainsKey("GLIBCXX_3.4.32"), "TorchSharp 0.107.0 is expected to need GLIBCXX_3.4.32");
        Assert.Equal(!hostHas, (needs["GLIBCXX_3.4.32"] & 2) != 0);
        // versions the host does have keep their flags (never weakened)
        Assert.Equal(0, needs["GLIBCXX_3.4"] & 2);

        string cache = Path.Combine(Environment.GetEnvironmentVariable("NUGET_PACKAGES")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages"),
            "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (File.Exists(cache)) Assert.Equal(0, VersionNeeds(File.ReadAllBytes(cache))["GLIBCXX_3.4.32"] & 2);
    }

    // Independent reader of ELF64 .gnu.version_r: version name -> vna_flags, for needs on libstdc++.so.6.
    private static Dictionary<string, int> VersionNeeds(byte[] elf)
    {
        var result = new Dictionary<string, int>();
        long shoff = BitConverter.ToInt64(elf, 0x28);
        int shentsize = BitConverter.ToUInt16(elf, 0x3A), shnum = BitConverter.ToUInt16(elf, 0x3C);
        string Str(int at) { int e = at; while (elf[e] != 0) e++; return Encoding.ASCII.GetString(elf, at, e - at); }
        for (int s = 0; s < shnum; s++)
        {
            int sh = (int)shoff + s * shentsize;
            if (BitConverter.ToUInt32(elf, sh + 4) != 0x6ffffffe) continue;
            int off = (int)BitConverter.ToInt64(elf, sh + 0x18);
            int strtab = (int)BitConverter.ToInt64(elf, (int)shoff + BitConverter.ToInt32(elf, sh + 0x28) * shentsize + 0x18);
            int vn = off;
            for (int i = 0; i < BitConverter.ToInt32(elf, sh + 0x2C); i++)
            {
                string file = Str(strtab + BitConverter.ToInt32(elf, vn + 4));
                int aux = vn + BitConverter.ToInt32(elf, vn + 8);
                for (int a = 0; a < BitConverter.ToUInt16(elf, vn + 2); a++)
                {
                    if (file == "libstdc++.so.6") result[Str(strtab + BitConverter.ToInt32(elf, aux + 8))] = BitConverter.ToUInt16(elf, aux + 4);
                    aux += BitConverter.ToInt32(elf, aux + 12);
                }
                vn += BitConverter.ToInt32(elf, vn + 12);
            }
        }
        return result;
    }
}
