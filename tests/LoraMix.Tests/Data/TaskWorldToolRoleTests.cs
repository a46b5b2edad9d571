using LoraMix.Data;
using LoraMix.Tokenization;

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
}
