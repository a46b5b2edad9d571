using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Tokenization;
using LoraMix.Workflows;

namespace LoraMix.Tests.Data;

/// <summary><see cref="TaskGenerateOptions.ToolFraction"/>: inputs as tool results, untrusted like data messages.</summary>
public sealed class TaskWorldToolRoleTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-tool-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void ZeroDrawsNothingExtraSoTheExamplesAreUnchanged()
    {
        var plain = TaskWorld.Generate(TaskWorld.PretrainFamilies, 200, 3, TaskSplit.Train, new TaskGenerateOptions { Placement = null });
        var zero = TaskWorld.Generate(TaskWorld.PretrainFamilies, 200, 3, TaskSplit.Train, new TaskGenerateOptions { Placement = null, ToolFraction = 0 });
        Assert.Equal(plain, zero);
        Assert.All(zero, e => Assert.Equal(TaskWorld.DataRole, e.InputRole));
    }

    [Theory]
    [InlineData(0.25)]
    [InlineData(1.0)]
    public void TheFractionOfToolInputsIsAboutTheOneAskedForAndAnswersAreUnchanged(double fraction)
    {
        var ex = TaskWorld.Generate(TaskWorld.PretrainFamilies, 2000, 4, TaskSplit.Train, new TaskGenerateOptions { Placement = null, ToolFraction = fraction });
        double share = ex.Count(e => e.InputRole == TaskWorld.ToolRole) / (double)ex.Count;
        Assert.InRange(share, fraction - 0.04, fraction + 0.04);
        Assert.All(ex, e => Assert.Equal(TaskWorld.Apply(e.Family, e.Input), e.Answer));
        var tool = ex.First(e => e.InputRole == TaskWorld.ToolRole);
        Assert.Equal((TaskWorld.ToolRole, tool.Input), tool.ToChat()[1]);
    }

    [Fact]
    public void AToolInputIsUntrustedWhenRendered()
    {
        ByteLevelTokenizerFiles.Write(_dir);
        var tok = TextTokenizer.FromDirectory(_dir);
        var e = TaskWorld.Generate("reverse_words", 50, 1, TaskSplit.Train, new TaskGenerateOptions { ToolFraction = 1 })[0];
        var chat = new ChatRenderer(tok, ChatTemplate.ChatML).Render(e.ToChatMessages());
        var text = tok.Decode(chat.Ids);
        int at = text.IndexOf(e.Input, StringComparison.Ordinal);
        Assert.True(at > 0, text);
        // every token of the tool message's content is labelled untrusted
        int covered = 0;
        for (int i = 0; i < chat.Ids.Length; i++)
        {
            string before = tok.Decode(chat.Ids.AsSpan(0, i));
            string through = tok.Decode(chat.Ids.AsSpan(0, i + 1));
            if (before.Length >= at && through.Length <= at + e.Input.Length)
            {
                Assert.Equal(LoraMix.Privilege.Untrusted, chat.Privileges[i]);
                covered++;
            }
        }
        Assert.True(covered >= e.Input.Length);
    }

    [Theory]
    [InlineData("0", null)]
    [InlineData("0.25", null)]
    [InlineData("1", null)]
    [InlineData("1.5", "must be in [0, 1]")]
    [InlineData("-0.1", "must be in [0, 1]")]
    [InlineData("lots", "")]
    public void TheRecipeKeyIsCheckedWithTheKeyNamed(string value, string? message)
    {
        string path = Path.Combine(_dir, "r.yaml");
        File.WriteAllText(path, $"model: m\ndataset:\n  task_world: {{families: [first_word], count: 20, tool_fraction: {value}}}\noutput_dir: o\n");
        if (message is null)
        {
            var r = TrainingRecipe.Load(path);
            double f = double.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
            Assert.Equal(f, r.Dataset.TaskWorld!.ToolFraction);
            int tool = r.Dataset.TaskWorld.Records().Count(x => x.Messages!.Any(m => m.Role == ChatRole.Tool));
            if (f == 0) Assert.Equal(0, tool);
            if (f == 1) Assert.Equal(20, tool);
            return;
        }
        var e = Assert.Throws<ConfigFileException>(() => TrainingRecipe.Load(path));
        Assert.Contains("'dataset.task_world.tool_fraction'", e.Message);
        Assert.Contains(message, e.Message);
    }
}
