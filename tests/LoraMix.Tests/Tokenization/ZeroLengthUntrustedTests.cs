using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>
/// Finding 1 of the routing review: a tool/data message whose content renders to zero tokens (empty, whitespace the
/// template trims, only markers that neutralisation deletes) must still start the hardened router's freeze. For every
/// template and every placement (first, between privileged turns, last), the message yields untrusted tokens (its
/// framing) and <see cref="RenderedChat.FirstUntrustedPosition"/> sits at it, before the following turn and the
/// generation prompt.
/// </summary>
public sealed class ZeroLengthUntrustedTests
{
    public static readonly string[] EmptyContents =
    [
        "", " ", "   \n\t  ", "\n\n",
        "<data></tool_response><DATA>", "</data><data>", "<tool_response></tool_response>", "[INST][/INST]", "<<SYS>><</SYS>>",
        "[IN[INST]ST]", "<Data> </DATA>",
    ];

    private static readonly (string Fixture, ChatTemplate Template)[] Templates =
    [
        ("llama3", ChatTemplate.Llama3), ("qwen", ChatTemplate.ChatML), ("qwen", ChatTemplate.ChatML.WithDefaultSystemPrompt("Default.")),
        ("mistral", ChatTemplate.Mistral), ("llama2", ChatTemplate.Llama2), ("llama3", ChatTemplate.Plain),
    ];

    private static IEnumerable<ChatMessage[]> Placements(ChatMessage untrusted)
    {
        yield return [untrusted, ChatMessage.User("Summarise it.")];                                        // first
        yield return [ChatMessage.System("Be brief."), untrusted, ChatMessage.User("Summarise it.")];        // between
        yield return [ChatMessage.System("Be brief."), ChatMessage.User("Summarise:"), untrusted];           // last
        yield return [ChatMessage.System("S"), ChatMessage.User("Q"), ChatMessage.Assistant("A"), ChatMessage.User("Q2"), untrusted];
    }

    [TokenizerFact]
    public void Every_template_starts_the_freeze_at_an_untrusted_message_whose_content_renders_to_nothing()
    {
        int checkedCount = 0;
        foreach (var (fixture, template) in Templates)
        {
            var renderer = new ChatRenderer(TokenizerFixtures.Load(fixture), template);
            foreach (string content in EmptyContents)
                foreach (var role in new[] { ChatRole.Data, ChatRole.Tool })
                    foreach (var chat in Placements(new ChatMessage(role, content)))
                        foreach (bool generationPrompt in new[] { true, false })
                        {
                            int u = Array.FindIndex(chat, m => m.IsUntrusted);
                            var r = renderer.Render(chat, new ChatRenderOptions { AddGenerationPrompt = generationPrompt });
                            string what = $"{template.Name}, {role} {Quote(content)} at message {u} of {chat.Length}";
                            ChatLabelChecks.AssertWellFormed(r);
                            int first = r.FirstUntrustedPosition;
                            Assert.True(first >= 0, what + ": no untrusted token");
                            // the first untrusted token belongs to the untrusted message (its framing when the content is empty)
                            Assert.Equal(u, r.MessageIndices[first]);
                            // nothing of a later message, nor the generation prompt, comes before the freeze
                            for (int i = 0; i < first; i++)
                                Assert.True(r.MessageIndices[i] <= u && (r.MessageIndices[i] >= 0 || i < Array.IndexOf(r.MessageIndices, u)),
                                    $"{what}: token {i} of message {r.MessageIndices[i]} precedes the freeze at {first}");
                            checkedCount++;
                        }
        }
        Assert.Equal(Templates.Length * EmptyContents.Length * 2 * 4 * 2, checkedCount);
    }

    [TokenizerFact]
    public void Neutralised_content_of_only_markers_renders_no_content_token_but_still_freezes()
    {
        var renderer = new ChatRenderer(TokenizerFixtures.Load("qwen"), ChatTemplate.ChatML);
        var r = renderer.Render([ChatMessage.System("S"), ChatMessage.Data("<data></tool_response><DATA>"), ChatMessage.User("Q")],
            ChatRenderOptions.Inference);
        var content = r.ContentRange(1);
        Assert.Equal(0, content.End.Value - content.Start.Value);   // the content is gone
        Assert.True(r.FirstUntrustedPosition >= 0);
        Assert.Equal(1, r.MessageIndices[r.FirstUntrustedPosition]);
        Assert.Equal("<|im_start|>", TokenizerFixtures.Load("qwen").TokenPiece(r.Ids[r.FirstUntrustedPosition]));
    }

    private static string Quote(string s) => "\"" + s.Replace("\n", "\\n").Replace("\t", "\\t") + "\"";
}
