using System.Text;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>Chat files are decoded strictly and bounded; errors name file:line.</summary>
public sealed class ChatFileStrictTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-chatx-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(byte[] bytes)
    {
        string path = Path.Combine(_dir, $"chat{Guid.NewGuid():N}.json");
        File.WriteAllBytes(path, bytes);
        return path;
    }

    private static byte[] U(string s) => Encoding.UTF8.GetBytes(s);

    [Theory]
    [InlineData(new byte[] { 0xFF })]
    [InlineData(new byte[] { 0xC3 })]
    [InlineData(new byte[] { 0xED, 0xB0, 0x80 })]
    public void InvalidUtf8IsRefusedWithTheLine(byte[] bad)
    {
        string path = Write([.. U("[\n  {\"role\": \"user\", \"content\": \"hi\"},\n  {\"role\": \"assistant\", \"content\": \""), .. bad, .. U("\"}\n]")]);
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(path));
        Assert.Equal(3, e.Line);
        Assert.StartsWith($"{path}:3: invalid UTF-8 (byte 0x{bad[0]:X2} at column 37)", e.Message);
    }

    [Theory]
    [InlineData("\\ud800")]
    [InlineData("x\\udfff")]
    [InlineData("\\ud800\\u0041")]
    public void UnpairedSurrogateEscapesAreRefusedWithTheLine(string escape)
    {
        string path = Write(U("[\n  {\"role\": \"user\", \"content\": \"hi\"},\n  {\"role\": \"assistant\",\n   \"content\": \"" + escape + "\"}\n]"));
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(path));
        Assert.Equal(4, e.Line);
        Assert.Contains("unpaired UTF-16 surrogate", e.Message);
        // in a key too
        path = Write(U("[{\"role\": \"user\", \"content\": \"hi\", \"" + escape + "\": 1}]"));
        Assert.Equal(1, Assert.Throws<ChatFileException>(() => ChatFile.Load(path)).Line);
        // a valid pair is text
        Assert.Equal("😀", ChatFile.Load(Write(U("[{\"role\": \"user\", \"content\": \"\\ud83d\\ude00\"}]")))[0].Content);
    }

    [Fact]
    public void ParseRefusesUnpairedSurrogateCharacters()
    {
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Parse("[\n{\"role\": \"user\", \"content\": \"a\ud800\"}]", "stdin"));
        Assert.Equal(2, e.Line);
        Assert.StartsWith("stdin:2: ", e.Message);
    }

    [Fact]
    public void DeepNestingIsATypedErrorWithTheLine()
    {
        string deep = new string('[', 200_000);
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(Write(U("[\n{\"role\": \"user\", \"content\": " + deep))));
        Assert.Equal(2, e.Line);
        Assert.Contains($"depth of {ChatFile.MaxJsonDepth}", e.Message);
    }

    [Fact]
    public void MessageErrorsNameTheLineOfTheMessage()
    {
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(Write(U(
            "{\"messages\": [\n  {\"role\": \"user\", \"content\": \"a\"},\n\n  {\"role\": \"root\", \"content\": \"b\"}\n]}"))));
        Assert.Equal(1, e.MessageIndex);
        Assert.Equal(4, e.Line);
        Assert.Contains(":4: message 1: unknown role 'root'", e.Message);
        var dup = Assert.Throws<ChatFileException>(() => ChatFile.Load(Write(U(
            "[{\"role\": \"user\", \"content\": \"a\"},\n {\"role\": \"user\", \"role\": \"system\", \"content\": \"b\"}]"))));
        Assert.Equal(2, dup.Line);
        Assert.Contains("'role' is given twice", dup.Message);
    }

    [Fact]
    public void OversizedFilesAreRefusedBeforeTheyAreRead()
    {
        string path = Path.Combine(_dir, "big.json");
        using (var f = File.Create(path)) f.SetLength(ChatFile.MaxFileBytes + 1);   // sparse: nothing to write
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(path));
        Assert.Contains("at most 64 MiB", e.Message);
        Assert.Null(e.Line);
    }
}
