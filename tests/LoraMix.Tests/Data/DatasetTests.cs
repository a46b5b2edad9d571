using LoraMix.Data;
using LoraMix.Tokenization;
using Xunit;

namespace LoraMix.Tests.Data;

public sealed class DatasetTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-ds-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, string text)
    {
        string path = Path.Combine(_dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    [Fact]
    public void AlpacaRecordsBecomeUserAndAssistantTurns()
    {
        string path = Write("a.jsonl",
            "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\", \"system\": \"Be brief.\"}\n" +
            "\n" +
            "{\"instruction\": \"Say hi\", \"output\": \"hi\", \"history\": [[\"q\", \"a\"]]}\n");
        var ds = DatasetReader.Load(path);
        Assert.Equal(DatasetFormat.Alpaca, ds.Format);
        Assert.Equal(2, ds.Records.Count);
        var r0 = ds.Records[0];
        Assert.Equal(1, r0.Line);
        Assert.Equal([ChatRole.System, ChatRole.User, ChatRole.Assistant], r0.Messages!.Select(m => m.Role));
        Assert.Equal("Add\n1 2", r0.Messages![1].Content);
        Assert.Equal("3", r0.ExpectedAnswer);
        var r1 = ds.Records[1];
        Assert.Equal(3, r1.Line);
        Assert.Equal(["q", "a", "Say hi", "hi"], r1.Messages!.Select(m => m.Content));
        Assert.Equal(["q", "a", "Say hi"], r1.PromptMessages.Select(m => m.Content));
    }

    [Fact]
    public void ChatRecordsKeepUntrustedRolesAndShareGptMaps()
    {
        string path = Write("c.jsonl",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"data\", \"content\": \"D\"}, {\"role\": \"tool\", \"content\": \"T\"}, {\"role\": \"assistant\", \"content\": \"A\"}], \"family\": \"f\"}\n" +
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"H\"}, {\"from\": \"observation\", \"value\": \"O\"}, {\"from\": \"gpt\", \"value\": \"G\"}]}\n");
        var ds = DatasetReader.Load(path);
        Assert.Equal(DatasetFormat.Chat, ds.Format);
        Assert.Equal([ChatRole.System, ChatRole.Data, ChatRole.Tool, ChatRole.Assistant], ds.Records[0].Messages!.Select(m => m.Role));
        Assert.Equal("f", ds.Records[0].Family);
        Assert.Equal([ChatRole.User, ChatRole.Tool, ChatRole.Assistant], ds.Records[1].Messages!.Select(m => m.Role));
    }

    [Fact]
    public void JsonArrayReportsTheLineOfABadRecord()
    {
        string path = Write("a.json", "[\n  {\"text\": \"one\"},\n  {\"text\": \"two\"},\n  {\"text\": 3}\n]\n");
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(4, e.Line);
        Assert.Contains(path, e.Message);
        Assert.Contains("'text' must be a string", e.Message);
    }

    [Fact]
    public void BadRecordsFailWithFileAndLineOrAreSkippedAndCounted()
    {
        string path = Write("bad.jsonl",
            "{\"instruction\": \"x\", \"output\": \"y\"}\n" +
            "{\"instruction\": \"x\"}\n" +
            "not json\n" +
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"z\"}]}\n" +
            "{\"instruction\": \"x2\", \"output\": \"y2\"}\n");
        var e = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(path));
        Assert.Equal(2, e.Line);
        Assert.Contains("missing 'output'", e.Message);
        Assert.StartsWith($"{path}:2:", e.Message);

        var ds = DatasetReader.Load(path, skipBad: true);
        Assert.Equal(2, ds.Records.Count);
        Assert.Equal(3, ds.Skipped.Count);
        Assert.Contains(":3:", ds.Skipped[1]);
        Assert.Contains("missing 'instruction'", ds.Skipped[2]); // the file is alpaca (its first record): a chat record does not fit

        string chat = Write("role.jsonl", "{\"messages\": [{\"role\": \"wizard\", \"content\": \"z\"}]}\n");
        var roleError = Assert.Throws<DatasetFileException>(() => DatasetReader.Load(chat));
        Assert.Contains("unknown role 'wizard'", roleError.Message);
        Assert.Contains("system, user, assistant, tool, data", roleError.Message);
    }

    [Fact]
    public void AFileWithNothingUsableFails()
    {
        Assert.Throws<DatasetFileException>(() => DatasetReader.Load(Write("empty.jsonl", "\n\n")));
        Assert.Throws<DatasetFileException>(() => DatasetReader.Load(Write("allbad.jsonl", "{}\n"), skipBad: true));
        Assert.Throws<DatasetFileException>(() => DatasetReader.Load(Path.Combine(_dir, "missing.jsonl")));
        Assert.Throws<DatasetFileException>(() => DatasetReader.Load(Write("obj.json", "{\"text\": \"x\"}")));
    }

    [Fact]
    public void TextFilesSplitOnBlankLines()
    {
        var ds = DatasetReader.Load(Write("t.txt", "first line\nsecond line\n\n\nthird\n"));
        Assert.Equal(DatasetFormat.Text, ds.Format);
        Assert.Equal(["first line\nsecond line", "third"], ds.Records.Select(r => r.Text));
        Assert.Equal([1, 5], ds.Records.Select(r => r.Line));
    }

    [Fact]
    public void SplitIsDeterministicDisjointAndComplete()
    {
        var items = Enumerable.Range(0, 100).ToList();
        var (train, val) = DatasetReader.Split(items, 0.1, seed: 3);
        var (train2, val2) = DatasetReader.Split(items, 0.1, seed: 3);
        Assert.Equal(10, val.Count);
        Assert.Equal(val, val2);
        Assert.Equal(train, train2);
        Assert.Empty(train.Intersect(val));
        Assert.Equal(items, train.Concat(val).Order());
        Assert.NotEqual(val, DatasetReader.Split(items, 0.1, seed: 4).Validation);
        Assert.Throws<ArgumentOutOfRangeException>(() => DatasetReader.Split(items, 1.0, 0));
    }

    [Fact]
    public void TaskWorldExamplesRoundTripThroughTheChatFormat()
    {
        var examples = TaskWorld.Generate(["reverse_words", "sort_words"], 6, seed: 1);
        string path = Path.Combine(_dir, "tw.jsonl");
        TaskWorld.WriteChatJsonl(path, examples);
        var ds = DatasetReader.Load(path);
        Assert.Equal(6, ds.Records.Count);
        for (int i = 0; i < examples.Count; i++)
        {
            var direct = TaskWorldRecords.ToRecord(examples[i]);
            Assert.Equal(examples[i].Family, ds.Records[i].Family);
            Assert.Equal(examples[i].Answer, ds.Records[i].ExpectedAnswer);
            Assert.Equal(direct.Messages!, ds.Records[i].Messages!);
            Assert.Contains(ds.Records[i].Messages!, m => m.Role == ChatRole.Data);
        }
    }
}
