using System.Text;
using LoraMix.Data;

namespace LoraMix.Tests.Data;

/// <summary>Dataset files are decoded strictly: invalid UTF-8, unpaired surrogate escapes, deep nesting and oversized
/// records are typed errors naming file:line, and under skip_bad they are skipped and counted like other bad records.</summary>
public sealed class DatasetStrictTextTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-dsx-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, byte[] bytes)
    {
        string path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    private static byte[] U(string s) => Encoding.UTF8.GetBytes(s);

    /// <summary>Line 2 of three holds <paramref name="bad"/> inside a string value.</summary>
    private static byte[] ThreeLines(byte[] bad) =>
        [.. U("{\"text\": \"one\"}\n{\"text\": \"t"), .. bad, .. U("wo\"}\n{\"text\": \"three\"}\n")];

    public static TheoryData<string, byte[], string> BadBytes => new()
    {
        { "lone continuation byte", [0x80], "invalid UTF-8 (byte 0x80" },
        { "truncated sequence", [0xC3], "invalid UTF-8 (byte 0xC3" },
        { "overlong encoding", [0xC0, 0xAF], "invalid UTF-8 (byte 0xC0" },
        { "encoded surrogate", [0xED, 0xA0, 0x80], "invalid UTF-8 (byte 0xED" },
        { "0xFF", [0xFF], "invalid UTF-8 (byte 0xFF" },
        { "escaped lone high surrogate", U("\\ud800"), "unpaired UTF-16 surrogate" },
        { "escaped lone low surrogate", U("\\udc00x"), "unpaired UTF-16 surrogate" },
        { "reversed pair", U("\\udc00\\ud800"), "unpaired UTF-16 surrogate" },
    };

    [Theory]
    [MemberData(nameof(BadBytes))]
    public void JsonLinesNameTheLineAndSkipBadSkipsIt(string what, byte[] bad, string message)
    {
        string path = Write("d.jsonl", ThreeLines(bad));
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(2, e.Line);
        Assert.StartsWith($"{path}:2: ", e.Message);
        Assert.Contains(message, e.Message);

        var ds = DatasetReader.Load(path, skipBad: true);
        Assert.Equal(["one", "three"], ds.Records.Select(r => r.Text));
        Assert.Equal([1, 3], ds.Records.Select(r => r.Line));
        Assert.Single(ds.Skipped);
        Assert.Contains(message, ds.Skipped[0]);
        Assert.DoesNotContain(ds.Records, r => r.Text!.Contains('\uFFFD'));
        _ = what;
    }

    [Theory]
    [MemberData(nameof(BadBytes))]
    public void JsonArraysNameTheLineAndSkipBadSkipsTheRecord(string what, byte[] bad, string message)
    {
        string path = Write("d.json", [.. U("[\n  {\"text\": \"one\"},\n  {\"text\":\n    \"t"), .. bad, .. U("wo\"},\n  {\"text\": \"three\"}\n]\n")]);
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(4, e.Line);   // the line of the bad string, inside the record that starts on line 3
        Assert.Contains(message, e.Message);
        var ds = DatasetReader.Load(path, skipBad: true);
        Assert.Equal(["one", "three"], ds.Records.Select(r => r.Text));
        Assert.Single(ds.Skipped);
        _ = what;
    }

    [Fact]
    public void TextFilesNameTheLineAndSkipBadSkipsTheDocument()
    {
        string path = Write("d.txt", [.. U("first doc\n\nsecond "), 0xE2, 0x82, .. U(" doc\nstill second\n\r\nthird\n")]);
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(3, e.Line);
        Assert.Contains("invalid UTF-8 (byte 0xE2 at column 8)", e.Message);
        var ds = DatasetReader.Load(path, skipBad: true);
        Assert.Equal(["first doc", "third"], ds.Records.Select(r => r.Text));
        Assert.Equal([1, 6], ds.Records.Select(r => r.Line));
        Assert.Single(ds.Skipped);
    }

    [Fact]
    public void ValidSurrogatePairsBomAndCrlfAreFine()
    {
        string path = Write("ok.jsonl", [0xEF, 0xBB, 0xBF, .. U("{\"text\": \"\\ud83d\\ude00 and 😀\"}\r\n\r\n{\"text\": \"é\"}")]);
        var ds = DatasetReader.Load(path);
        Assert.Equal(["😀 and 😀", "é"], ds.Records.Select(r => r.Text));
        Assert.Equal([1, 3], ds.Records.Select(r => r.Line));
        string txt = Write("ok.txt", [0xEF, 0xBB, 0xBF, .. U("héllo\r\nworld\r\n")]);
        Assert.Equal("héllo\nworld", DatasetReader.Load(txt).Records.Single().Text);
    }

    [Fact]
    public void DeepNestingIsATypedErrorNamingTheLine()
    {
        string deep = new string('[', 100_000) + new string(']', 100_000);
        string jsonl = Write("deep.jsonl", U("{\"text\": \"ok\"}\n{\"text\": \"x\", \"extra\": " + deep + "}\n"));
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(jsonl));
        Assert.Equal(2, e.Line);
        Assert.Contains($"maximum configured depth of {DatasetReader.MaxJsonDepth}", e.Message);
        Assert.Single(DatasetReader.Load(jsonl, skipBad: true).Records);

        string json = Write("deep.json", U("[\n{\"text\": \"ok\"},\n" + deep + "\n]"));
        var a = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(json, skipBad: true));
        Assert.Equal(3, a.Line);
        Assert.Contains("depth", a.Message);
    }

    [Fact]
    public void OversizedLinesAreRefusedWithoutBeingBuffered()
    {
        string path = Path.Combine(_dir, "long.jsonl");
        using (var f = File.Create(path))
        {
            f.Write(U("{\"text\": \"ok\"}\n{\"text\": \""));
            var chunk = new byte[1 << 20];
            Array.Fill(chunk, (byte)'a');
            for (int i = 0; i <= DatasetReader.MaxRecordBytes >> 20; i++) f.Write(chunk);
            f.Write(U("\"}\n{\"text\": \"end\"}\n"));
        }
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(2, e.Line);
        Assert.Contains("longer than 64 MiB", e.Message);
        var ds = DatasetReader.Load(path, skipBad: true);
        Assert.Equal(["ok", "end"], ds.Records.Select(r => r.Text));
        Assert.Equal([1, 3], ds.Records.Select(r => r.Line));
    }

    [Fact]
    public void TrailingContentAfterAJsonArrayIsAnError()
    {
        string path = Write("t.json", U("[{\"text\": \"a\"}]\n// a comment is fine\n"));
        Assert.Single(DatasetReader.Load(path).Records);
        Write("t.json", U("[{\"text\": \"a\"}]\n{\"text\": \"b\"}\n"));
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(2, e.Line);
    }
}
