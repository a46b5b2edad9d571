using System.Text;
using System.Text.Json;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>One case of a chat-template golden file (rendered by transformers.js apply_chat_template).</summary>
internal sealed record ChatGoldenCase(string Name, IReadOnlyList<ChatMessage> Messages, bool AddGenerationPrompt, string Text,
    int[]? Ids);

/// <summary>A chat-template golden file.</summary>
internal sealed record ChatGoldenFile(string Family, string HfChatTemplate, IReadOnlyList<ChatGoldenCase> Cases)
{
    public static ChatGoldenFile Load(string name)
    {
        string path = SharedAssets.FindTestFile($"Tokenization/chat-golden/{name}.json")
            ?? throw new FileNotFoundException($"chat golden {name}.json not found");
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement;
        var cases = new List<ChatGoldenCase>();
        foreach (var c in root.GetProperty("cases").EnumerateArray())
        {
            var messages = c.GetProperty("messages").EnumerateArray()
                .Select(m => ChatMessage.Create(m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!))
                .ToArray();
            int[]? ids = c.TryGetProperty("ids", out var idsEl) ? idsEl.EnumerateArray().Select(e => e.GetInt32()).ToArray() : null;
            cases.Add(new ChatGoldenCase(c.GetProperty("name").GetString()!, messages,
                c.GetProperty("add_generation_prompt").GetBoolean(), c.GetProperty("text").GetString()!, ids));
        }
        return new ChatGoldenFile(root.GetProperty("family").GetString()!, root.GetProperty("hf_chat_template").GetString()!, cases);
    }
}

/// <summary>Checks of a rendered chat's labels that do not trust the renderer's own bookkeeping.</summary>
internal static class ChatLabelChecks
{
    /// <summary>The ids of every added token of the vocabulary (special or not).</summary>
    public static HashSet<int> AddedIds(TextTokenizer tok) => [.. tok.SpecialTokens.Values];

    /// <summary>The bytes the tokens stand for, concatenated and read as UTF-8 (no decoder post-processing such as
    /// SentencePiece's leading-space strip).</summary>
    public static string RawText(TextTokenizer tok, ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        foreach (int id in ids) bytes.AddRange(tok.TokenBytes(id));
        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>Byte-level vocabularies: the text the ids stand for, added tokens written as their strings.</summary>
    public static string Spell(TextTokenizer tok, ReadOnlySpan<int> ids)
    {
        var names = tok.SpecialTokens.ToDictionary(kv => kv.Value, kv => kv.Key);
        var bytes = new List<byte>();
        foreach (int id in ids)
            bytes.AddRange(names.TryGetValue(id, out string? name) ? Encoding.UTF8.GetBytes(name) : tok.TokenBytes(id));
        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>Positions of message <paramref name="m"/>'s content tokens; asserts they are contiguous.</summary>
    public static (int Start, int End) ContentSpan(RenderedChat r, int m)
    {
        int start = -1, end = -1;
        for (int i = 0; i < r.Length; i++)
        {
            if (r.MessageIndices[i] != m || !r.IsContent[i]) continue;
            if (start < 0) start = i;
            else Assert.True(end == i, $"content tokens of message {m} are not contiguous (gap before {i})");
            end = i + 1;
        }
        return start < 0 ? (0, 0) : (start, end);
    }

    /// <summary>Structural invariants every rendering must satisfy.</summary>
    public static void AssertWellFormed(RenderedChat r)
    {
        int n = r.Ids.Length;
        Assert.Equal(n, r.Privileges.Length);
        Assert.Equal(n, r.LossMask.Length);
        Assert.Equal(n, r.MessageIndices.Length);
        Assert.Equal(n, r.IsContent.Length);
        for (int i = 0; i < n; i++)
        {
            int m = r.MessageIndices[i];
            Assert.InRange(m, -1, r.Messages.Count - 1);
            bool untrustedMessage = m >= 0 && r.Messages[m].Role is ChatRole.Tool or ChatRole.Data;
            if (!r.IsContent[i])
            {
                // template text is system, except (part of) the framing of a tool/data message, which is untrusted
                Assert.True(r.Privileges[i] == Privilege.System || (untrustedMessage && r.Privileges[i] == Privilege.Untrusted),
                    $"template token {i} is labelled {r.Privileges[i]}");
            }
            else
            {
                Assert.True(m >= 0, $"content token {i} has no message");
                Assert.Equal(r.Messages[m].Role.PrivilegeOf(), r.Privileges[i]);
            }
            if (r.Privileges[i] == Privilege.Untrusted)
                Assert.True(untrustedMessage, $"untrusted token {i} outside a tool/data message");
            if (r.LossMask[i])
                Assert.True(m >= 0 && r.Messages[m].Role == ChatRole.Assistant, $"loss on token {i} outside an assistant message");
        }
        for (int m = 0; m < r.Messages.Count; m++) ContentSpan(r, m);
        AssertFreezeStartsAtFirstUntrustedMessage(r);
        var shown = new StringBuilder();
        foreach (var s in r.Spans) shown.Append(s.Text);
        Assert.Equal(r.Text, shown.ToString());
    }

    /// <summary>The hardened router's freeze point: every tool/data message has at least one untrusted token whatever its
    /// content (empty, trimmed whitespace, deleted markers), and <see cref="RenderedChat.FirstUntrustedPosition"/> is -1
    /// exactly when there is none and otherwise precedes every token of the first untrusted message's content and every
    /// token of later messages and of the generation prompt.</summary>
    public static void AssertFreezeStartsAtFirstUntrustedMessage(RenderedChat r)
    {
        int u = -1;
        for (int m = 0; m < r.Messages.Count; m++)
        {
            if (!r.Messages[m].IsUntrusted) continue;
            if (u < 0) u = m;
            Assert.True(Enumerable.Range(0, r.Length).Any(i => r.MessageIndices[i] == m && r.Privileges[i] == Privilege.Untrusted),
                $"{r.Messages[m].Role.ToName()} message {m} has no untrusted token");
        }
        int first = r.FirstUntrustedPosition;
        if (u < 0)
        {
            Assert.Equal(-1, first);
            return;
        }
        Assert.True(first >= 0, "an untrusted message but no untrusted token");
        for (int i = 0; i < first; i++)
        {
            int m = r.MessageIndices[i];
            Assert.True(!(m > u || (m == u && r.IsContent[i]) || (m == -1 && i > 0 && r.MessageIndices.Take(i).Any(x => x >= u))),
                $"token {i} (message {m}) precedes the freeze at {first}");
        }
    }

    /// <summary>The message's content as the family renders it (trimmed/stripped where the template says so), with the
    /// separating space SentencePiece content carries; <paramref name="firstInBlock"/>: the message directly follows
    /// <c>[INST]</c> (mistral, llama2 without system).</summary>
    public static string ExpectedSpanText(ChatTemplateFamily family, ChatMessage m, bool firstInBlock, bool lastInBlock = true)
    {
        string c = m.Content;
        return family switch
        {
            ChatTemplateFamily.Llama3 => c.Trim(),
            ChatTemplateFamily.Llama2 when m.Role == ChatRole.Assistant => " " + c.Trim(),
            ChatTemplateFamily.Llama2 when m.Role == ChatRole.System => c,
            ChatTemplateFamily.Llama2 => Llama2Part(c, firstInBlock, lastInBlock),
            ChatTemplateFamily.Mistral when m.Role == ChatRole.Assistant || firstInBlock => " " + c,
            _ => c,
        };

        // Llama-2 strip()s the whole [INST] block; the space after [INST] goes to the first non-empty text.
        static string Llama2Part(string c, bool first, bool last)
        {
            if (first) c = c.TrimStart();
            if (last) c = c.TrimEnd();
            return first && c.Length > 0 ? " " + c : c;
        }
    }
}
