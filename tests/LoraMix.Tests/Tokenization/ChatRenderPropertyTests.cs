using CsCheck;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>Random conversations (valid for every family; contents include empty strings, whitespace and strings made
/// only of markers): the labels line up with the ids, untrusted labels occur only on tool/data messages (content and
/// framing), every tool/data message yields an untrusted token and the freeze point precedes it, that content never
/// holds an added token, and rendering is deterministic.</summary>
public sealed class ChatRenderPropertyTests
{
    private static readonly string[] Fragments =
    [
        "hello", "Summarise", " ", "  ", "\n", "\n\n", "\t", ".", "?", "x", "42", "é", "世界", "👍🏽", "café",
        "<|eot_id|>", "<|start_header_id|>system<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
        "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<data>", "</data>", "<tool_response>", "<s>", "</s>", "[IN[INST]ST]",
    ];

    private static readonly Gen<string> GenContent =
        Gen.Int[0, Fragments.Length - 1].Select(i => Fragments[i]).Array[0, 6].Select(parts => string.Concat(parts));

    private static readonly Gen<ChatRole> GenUserSide = Gen.OneOf(ChatRole.User, ChatRole.Tool, ChatRole.Data);

    // One turn: 1-3 user/tool/data messages, then an assistant answer (optional for the last turn).
    private static readonly Gen<ChatMessage[]> GenTurn =
        Gen.Select(Gen.Select(GenUserSide, GenContent).Array[1, 3], GenContent, Gen.Bool)
            .Select((parts, answer, answered) =>
            {
                var turn = parts.Select(p => new ChatMessage(p.Item1, p.Item2)).ToList();
                if (answered) turn.Add(ChatMessage.Assistant(answer));
                return turn.ToArray();
            });

    private static readonly Gen<(ChatMessage[] Chat, ChatRenderOptions Options)> GenChat =
        Gen.Select(Gen.Bool, GenContent, GenTurn.Array[1, 3], Gen.Bool, Gen.Int[0, 2], Gen.Bool)
            .Select((hasSystem, system, turns, genPrompt, loss, neutralize) =>
            {
                var chat = new List<ChatMessage>();
                if (hasSystem) chat.Add(ChatMessage.System(system));
                for (int t = 0; t < turns.Length; t++)
                {
                    var turn = turns[t];
                    // Only the last turn may end without an answer ([INST] families alternate).
                    if (t < turns.Length - 1 && turn[^1].Role != ChatRole.Assistant) turn = [.. turn, ChatMessage.Assistant("ok")];
                    chat.AddRange(turn);
                }
                var options = new ChatRenderOptions
                {
                    AddGenerationPrompt = genPrompt,
                    Loss = (ChatLoss)loss,
                    NeutralizeUntrustedMarkers = neutralize,
                };
                return (chat.ToArray(), options);
            });

    [TokenizerFact]
    public void Llama3_random_conversations() => Check("llama3", ChatTemplate.Llama3);

    [TokenizerFact]
    public void ChatML_random_conversations() => Check("qwen", ChatTemplate.ChatML.WithDefaultSystemPrompt("Default."));

    [TokenizerFact]
    public void Mistral_random_conversations() => Check("mistral", ChatTemplate.Mistral);

    [TokenizerFact]
    public void Llama2_random_conversations() => Check("llama2", ChatTemplate.Llama2);

    [TokenizerFact]
    public void Plain_random_conversations()
    {
        Check("llama3", ChatTemplate.Plain);
        Check("llama2", ChatTemplate.Plain);
    }

    private static void Check(string fixture, ChatTemplate template)
    {
        var tok = TokenizerFixtures.Load(fixture);
        var renderer = new ChatRenderer(tok, template);
        var again = new ChatRenderer(tok, template);
        var added = ChatLabelChecks.AddedIds(tok);
        GenChat.Sample(x =>
        {
            var r = renderer.Render(x.Chat, x.Options);
            ChatLabelChecks.AssertWellFormed(r);
            for (int i = 0; i < r.Length; i++)
            {
                int m = r.MessageIndices[i];
                bool untrustedContent = r.IsContent[i] && x.Chat[m].IsUntrusted;
                // untrusted: all of a tool/data message's content and its framing, nothing else
                if (untrustedContent) Assert.Equal(Privilege.Untrusted, r.Privileges[i]);
                if (r.Privileges[i] == Privilege.Untrusted) Assert.True(m >= 0 && x.Chat[m].IsUntrusted);
                if (untrustedContent) Assert.DoesNotContain(r.Ids[i], added);
            }
            if (x.Options.Loss == ChatLoss.None) Assert.Equal(0, r.LossTokenCount);
            if (tok.Kind == TokenizerKind.ByteLevelBpe) Assert.Equal(r.Text, ChatLabelChecks.Spell(tok, r.Ids));

            var r2 = again.Render(x.Chat, x.Options);
            Assert.Equal(r.Ids, r2.Ids);
            Assert.Equal(r.Privileges, r2.Privileges);
            Assert.Equal(r.LossMask, r2.LossMask);
            Assert.Equal(r.MessageIndices, r2.MessageIndices);
            Assert.Equal(r.IsContent, r2.IsContent);
            Assert.Equal(r.Text, r2.Text);
        }, iter: 150, threads: 1);
    }
}
