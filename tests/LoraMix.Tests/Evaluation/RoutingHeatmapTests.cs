using LoraMix.Evaluation;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Evaluation;

public sealed class RoutingHeatmapTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-heatmap-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static (int W, int H) PngSize(byte[] png)
    {
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
        int W = (png[16] << 24) | (png[17] << 16) | (png[18] << 8) | png[19];
        int H = (png[20] << 24) | (png[21] << 16) | (png[22] << 8) | png[23];
        return (W, H);
    }

    [Fact]
    public void WritesAPngSizedByTokensAndLayersAndShadesUntrustedSpans()
    {
        int layers = 4, tokens = 60;
        var experts = new int[layers, tokens];
        for (int l = 0; l < layers; l++) for (int t = 0; t < tokens; t++) experts[l, t] = (l + t) % 8;
        var labels = Enumerable.Range(0, tokens).Select(i => $"tok{i}\n").ToList();
        var privileges = Enumerable.Range(0, tokens).Select(i => i is >= 20 and < 40 ? Privilege.Untrusted : Privilege.User).ToList();

        string plain = Path.Combine(_dir, "plain.png"), shaded = Path.Combine(_dir, "shaded.png");
        RoutingHeatmap.Write(plain, experts, 8, labels);
        RoutingHeatmap.Write(shaded, experts, 8, labels, privileges);
        var (w, h) = PngSize(File.ReadAllBytes(plain));
        Assert.Equal(220 + tokens * 14, w);
        Assert.Equal(260 + layers * 28, h);
        Assert.NotEqual(File.ReadAllBytes(plain), File.ReadAllBytes(shaded));
        Assert.Empty(Directory.GetFiles(_dir, "*.tmp*"));
    }

    [Fact]
    public void MismatchedLabelsAreRejected()
    {
        var experts = new int[2, 3];
        Assert.Throws<ArgumentException>(() => RoutingHeatmap.Write(Path.Combine(_dir, "x.png"), experts, 4, ["a", "b"]));
        Assert.Throws<ArgumentException>(() => RoutingHeatmap.Write(Path.Combine(_dir, "x.png"), experts, 4, null, [Privilege.User]));
        Assert.False(File.Exists(Path.Combine(_dir, "x.png")));
    }
}
