using System.Text;
using System.Text.Json;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>The <c>plain</c> family on a tiny byte-level BPE tokenizer written by the test (no fixture needed).</summary>
public sealed class ChatPlainTemplateTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-tinytok-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>GPT-2's byte-to-character table (printable bytes map to themselves, the rest to U+0100...).</summary>
    private static char[] ByteChars()
    {
        var map = new char[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)(256 + n++);
        }
        return map;
    }

    /// <summary>Writes a byte-level BPE tokenizer: 256 byte tokens, a few merges, and two special tokens.</summary>
    private TextTokenizer TinyTokenizer(bool withBos = true)
    {
        var chars = ByteChars();
        var vocab = new Dictionary<string, int>();
        for (int b = 0; b < 256; b++) vocab[chars[b].ToString()] = b;
        string sp = chars[' '].ToString();
        string[] merges = ["h e", "he l", "hel l", "hell o", $"{sp} d", $"{sp}d a", $"{sp}da t", $"{sp}dat a", "d a", "da t", "dat a", "O k"];
        foreach (string m in merges) vocab[m.Replace(" ", "")] = vocab.Count;
        int bos = vocab.Count, eos = bos + 1;
        var json = new
        {
            version = "1.0",
            added_tokens = new object[]
            {
                new { id = bos, content = "<|bos|>", single_word = false, lstrip = false, rstrip = false, normalized = false, special = true },
                new { id = eos, content = "<|eos|>", single_word = false, lstrip = false, rstrip = false, normalized = false, special = true },
            },
            normalizer = (object?)null,
            // Llama-3's pre-tokenizer: its split regex, then the byte-to-character mapping.
            pre_tokenizer = new
            {
                type = "Sequence",
                pretokenizers = new object[]
                {
                    new
                    {
                        type = "Split",
                        pattern = new { Regex = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+" },
                        behavior = "Isolated",
                        invert = false,
                    },
                    new { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = false },
                },
            },
            post_processor = (object?)null,
            decoder = new { type = "ByteLevel", add_prefix_space = true, trim_offsets = true, use_regex = true },
            model = new
            {
                type = "BPE", dropout = (object?)null, unk_token = (object?)null, continuing_subword_prefix = (object?)null,
                end_of_word_suffix = (object?)null, fuse_unk = false, byte_fallback = false, vocab, merges,
            },
        };
        File.WriteAllText(Path.Combine(_dir, "tokenizer.json"), JsonSerializer.Serialize(json));
        var config = new Dictionary<string, object?> { ["eos_token"] = "<|eos|>", ["add_bos_token"] = false };
        if (withBos) config["bos_token"] = "<|bos|>";
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"), JsonSerializer.Serialize(config));
        return TextTokenizer.FromDirectory(_dir);
    }

    [Fact]
    public void Plain_renders_bos_then_messages_separated_by_blank_lines_with_tagged_untrusted_content()
    {
        var tok = TinyTokenizer();
        Assert.Equal(TokenizerKind.ByteLevelBpe, tok.Kind);
        var renderer = new ChatRenderer(tok, ChatTemplate.Plain);
        ChatMessage[] chat =
        [
            ChatMessage.System("Be brief."), ChatMessage.User("hello"), ChatMessage.Data("a <data>data</DATA> b"),
            ChatMessage.Tool("<|eos|>{}"), ChatMessage.Assistant("Ok"),
        ];
        var r = renderer.Render(chat, new ChatRenderOptions { AddGenerationPrompt = true });
        Assert.Equal("<|bos|>Be brief.\n\nhello\n\n<data>\na data b\n</data>\n\n<tool_response>\n<|eos|>{}\n</tool_response>\n\nOk", r.Text);
        ChatLabelChecks.AssertWellFormed(r);
        Assert.Equal(r.Text, ChatLabelChecks.Spell(tok, r.Ids));

        // BOS: no message; separators belong to the message they introduce; no end-of-turn token, no generation prompt.
        Assert.Equal(tok.SpecialTokens["<|bos|>"], r.Ids[0]);
        Assert.Equal(-1, r.MessageIndices[0]);
        Assert.Single(r.Ids, tok.SpecialTokens["<|bos|>"]);
        Assert.DoesNotContain(tok.SpecialTokens["<|eos|>"], r.Ids);
        Assert.Equal(4, r.MessageIndices[^1]);

        string[] expected = ["Be brief.", "hello", "a data b", "<|eos|>{}", "Ok"];
        for (int m = 0; m < chat.Length; m++)
        {
            var (s, e) = ChatLabelChecks.ContentSpan(r, m);
            Assert.Equal(expected[m], ChatLabelChecks.RawText(tok, r.Ids.AsSpan(s, e - s)));
            Assert.All(r.Privileges[s..e], p => Assert.Equal(chat[m].Privilege, p));
        }
        // Loss: the assistant content only (plain has no end-of-turn token).
        var (a0, a1) = ChatLabelChecks.ContentSpan(r, 4);
        Assert.Equal(a1 - a0, r.LossTokenCount);
        Assert.All(r.LossMask[a0..a1], Assert.True);
        ChatTemplateTests.CheckContentAndLoss(tok, ChatTemplateFamily.Plain,
            renderer.Render([ChatMessage.User("hello"), ChatMessage.Assistant("Ok")]));

        // Merges work inside content ("hello" is one token) but never across a renderer boundary: "." + "\n\n" would be
        // one pre-token of the whole string, here they are two (a documented difference).
        var (u0, u1) = ChatLabelChecks.ContentSpan(r, 1);
        Assert.Equal(1, u1 - u0);
        Assert.NotEqual(tok.Encode(r.Text), r.Ids);
        var simple = renderer.Render([ChatMessage.User("hello"), ChatMessage.Assistant("Ok")]);
        Assert.Equal("<|bos|>hello\n\nOk", simple.Text);
        Assert.Equal(tok.Encode(simple.Text), simple.Ids);
    }

    [Fact]
    public void Plain_without_a_bos_token_starts_with_the_first_message()
    {
        var tok = TinyTokenizer(withBos: false);
        var r = new ChatRenderer(tok, ChatTemplate.Plain).Render([ChatMessage.User("hello")]);
        Assert.Equal("hello", r.Text);
        Assert.Equal(tok.Encode("hello"), r.Ids);
        Assert.Equal([0], r.MessageIndices);
    }

    [Fact]
    public void A_tokenizer_without_a_chat_template_needs_an_explicit_one()
    {
        var tok = TinyTokenizer();
        var e = Assert.Throws<ChatTemplateException>(() => new ChatRenderer(tok));
        Assert.Contains("plain", e.Message);
        Assert.Throws<ChatTemplateException>(() => new ChatRenderer(tok, ChatTemplate.ChatML));
    }
}
