using System.Diagnostics;
using System.Text;
using LoraMix.Configuration;

namespace LoraMix.Tests.Configuration;

/// <summary>Hostile YAML/JSON configurations: alias bombs, deep nesting, size, encoding; all end in a
/// <see cref="ConfigFileException"/> naming the file and the line or key, quickly and without a large allocation.</summary>
public sealed class ConfigLimitsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-cfg-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static ConfigFileException Refused(string text, string source = "bomb.yaml")
    {
        var watch = Stopwatch.StartNew();
        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<ConfigFileException>(() => ConfigDocument.Parse(text, source));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(5), $"took {watch.Elapsed}");
        Assert.True(allocated < 512L << 20, $"allocated {allocated} bytes");
        Assert.Equal(source, e.FilePath);
        Assert.StartsWith(source + ": ", e.Message);
        return e;
    }

    /// <summary>"Billion laughs": 9 levels of 9 aliases (9^9 ≈ 387 million leaves, over 6 GB expanded).</summary>
    private static string BillionLaughs(int levels = 9)
    {
        var sb = new StringBuilder("a0: &a0 [lol]\n");
        for (int i = 1; i <= levels; i++)
            sb.Append($"a{i}: &a{i} [{string.Join(", ", Enumerable.Repeat($"*a{i - 1}", 9))}]\n");
        return sb.ToString();
    }

    [Fact]
    public void AnAliasBombIsRefusedBeforeItIsExpanded()
    {
        var e = Refused(BillionLaughs());
        Assert.Contains($"more than {ConfigDocument.MaxNodes} values", e.Message);
        Assert.Contains("(line ", e.Message);
        // a few aliases of a small anchor are fine, and expand to copies
        var ok = ConfigDocument.Parse("base: &b {r: 8, alpha: 16}\nx: *b\ny: *b\n", "ok.yaml");
        Assert.Equal(8, ok.Int("x.r"));
        Assert.Equal(16, ok.Int("y.alpha"));
    }

    [Theory]
    [InlineData(20_000)]
    [InlineData(500_000)]
    public void DeepFlowNestingIsRefusedWithoutOverflowingTheStack(int depth)
    {
        var e = Refused("a: " + new string('[', depth) + new string(']', depth) + "\n");
        Assert.Contains($"deeper than {ConfigDocument.MaxDepth}", e.Message);
        Refused("a: " + new string('{', depth));   // unterminated: the limit fires before the syntax error
        var json = Refused(string.Concat(Enumerable.Repeat("{\"a\":", Math.Min(depth, 100_000))) + "1" + new string('}', Math.Min(depth, 100_000)), "deep.json");
        Assert.Contains("a.a.a", json.Key);
    }

    [Fact]
    public void DeepBlockNestingIsRefused()
    {
        var sb = new StringBuilder();
        for (int i = 0; i < 2_000; i++) sb.Append(' ', i).Append("k:\n");
        Refused(sb.ToString());
        Refused("a:\n  " + string.Concat(Enumerable.Repeat("- ", 5_000)) + "x\n");
    }

    [Fact]
    public void NestingAtTheLimitIsAcceptedAndOneMoreLevelIsNot()
    {
        // The root mapping is level 1, so MaxDepth - 1 brackets fit.
        string Nest(int n) => "a: " + new string('[', n) + new string(']', n);
        ConfigDocument.Parse(Nest(ConfigDocument.MaxDepth - 1), "ok.yaml");
        Refused(Nest(ConfigDocument.MaxDepth));
        // an alias counts at its full depth where it is used
        string deep = "d: &d " + new string('[', 40) + new string(']', 40) + "\n";
        ConfigDocument.Parse(deep + "x: *d\n", "ok.yaml");
        Assert.Contains("deeper than", Refused(deep + "x: " + new string('[', 30) + "*d" + new string(']', 30) + "\n").Message);
    }

    [Fact]
    public void OversizedDocumentsAreRefused()
    {
        string big = "a: '" + new string('x', ConfigDocument.MaxDocumentSize) + "'\n";
        Assert.Contains("at most 1 MiB", Refused(big).Message);
        string path = Path.Combine(_dir, "big.yaml");
        File.WriteAllText(path, big);
        var e = Assert.Throws<ConfigFileException>(() => ConfigDocument.Load(path));
        Assert.Equal("(file)", e.Key);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void AliasesMustReferToEarlierAnchorsAndKeysMustBeScalars()
    {
        Assert.Contains("*nope", Refused("a: *nope\n").Message);
        Assert.Contains("*a", Refused("a: &a [1, *a]\n").Message);   // a cycle: the anchor is not complete yet
        Assert.Contains("plain strings", Refused("? [a, b]\n: 1\n").Message);
        Assert.Contains("plain strings", Refused("m: &m {k: 1}\n*m : 2\n").Message);
        var aliasKey = ConfigDocument.Parse("k: &k name\n*k : 2\n", "ok.yaml");
        Assert.Equal(2, aliasKey.Int("name"));
        var dup = Refused("adapter:\n  r: 1\n  r: 2\n");
        Assert.Equal("adapter.r", dup.Key);
        Assert.Contains("line 3", dup.Message);
        Assert.Contains("second YAML document", Refused("a: 1\n---\nb: 2\n").Message);
    }

    [Fact]
    public void InvalidUtf8AndUnpairedSurrogatesNameTheLine()
    {
        string path = Path.Combine(_dir, "bad.yaml");
        File.WriteAllBytes(path, [.. "model: m\nname: "u8, 0xC3, 0x28, .. "\n"u8]);
        var e = Assert.Throws<ConfigFileException>(() => ConfigDocument.Load(path));
        Assert.Equal("line 2", e.Key);
        Assert.Contains("invalid UTF-8 (byte 0xC3 at column 7)", e.Message);

        // an escape that decodes to an unpaired surrogate is refused (by YamlDotNet's scanner), naming the line
        Assert.Equal("line 2", Refused("model: m\nname: \"a\\ud800\"\n").Key);
        Assert.Equal("line 1", Refused("\"\\udc00\": 1\n").Key);   // in a key too
        // an unpaired surrogate character (text from a caller, not a file) is refused by the converter, naming the key
        var surrogate = Refused("model: m\nname: a\ud800\n");
        Assert.Equal("name", surrogate.Key);
        Assert.Contains("unpaired UTF-16 surrogate", surrogate.Message);
        Assert.Contains("line 2", surrogate.Message);

        // a byte-order mark is not an error
        File.WriteAllBytes(path, [0xEF, 0xBB, 0xBF, .. "model: m\n"u8]);
        Assert.Equal("m", ConfigDocument.Load(path).String("model"));
    }

    [Theory]
    [InlineData("1e400")]
    [InlineData("-1e400")]
    [InlineData(".inf")]
    [InlineData("NaN")]
    [InlineData("nan")]
    [InlineData("Infinity")]
    [InlineData("\"1e999\"")]
    public void NonFiniteNumbersAreRefusedByTheTypedAccessors(string value)
    {
        var d = ConfigDocument.Parse($"x: {value}\n", "n.yaml");
        var e = Assert.Throws<ConfigFileException>(() => d.Double("x"));
        Assert.Equal("x", e.Key);
        Assert.Contains(value == ".inf" ? "expected a number" : "expected a finite number", e.Message);
        Assert.Throws<ConfigFileException>(() => d.Int("x"));
        // the value can be named in other accessors' messages (NaN and infinity have no JSON form to print)
        Assert.Contains("expected true or false", Assert.Throws<ConfigFileException>(() => d.Bool("x", false)).Message);
    }

    [Fact]
    public void SetOverridesAreBoundedToo()
    {
        var d = ConfigDocument.Parse("a: 1\n", "c.yaml");
        var path = Assert.Throws<ConfigFileException>(() => d.Set(string.Join('.', Enumerable.Repeat("k", 100_000)) + "=1"));
        Assert.Contains($"at most {ConfigDocument.MaxDepth}", path.Message);
        Assert.Throws<ConfigFileException>(() => d.Set("a=" + new string('[', 100_000)));
        Assert.Throws<ConfigFileException>(() => d.Set("x.y={" + BillionLaughs().TrimEnd('\n').Replace("\n", ", ") + "}"));
        Assert.Contains("unpaired", Assert.Throws<ConfigFileException>(() => d.Set("a=\ud800")).Message);
        // the key path counts toward the depth of the value
        string keys = string.Join('.', Enumerable.Repeat("k", ConfigDocument.MaxDepth - 1));
        d.Set(keys + "=[1]");
        Assert.Throws<ConfigFileException>(() => d.Set(keys + "=[[1]]"));
    }
}
