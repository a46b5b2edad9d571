using System.Diagnostics;
using System.Text;
using LoraMix.Tokenization;
using Xunit.Abstractions;

namespace LoraMix.Tests.Tokenization;

/// <summary>Metadata, special-token handling, streaming decode and error cases of <see cref="TextTokenizer"/>.</summary>
public sealed class TextTokenizerTests(ITestOutputHelper output)
{
    [TokenizerFact]
    public void Llama3_metadata()
    {
        TextTokenizer t = TokenizerFixtures.Load("llama3");
        Assert.Equal(TokenizerKind.ByteLevelBpe, t.Kind);
        Assert.Equal(128256, t.VocabSize);
        Assert.Equal(128000, t.BosId);
        Assert.Equal(128001, t.EosId);
        Assert.Equal("<|begin_of_text|>", t.BosToken);
        Assert.Equal("<|end_of_text|>", t.EosToken);
        Assert.Null(t.PadId);
        Assert.Null(t.UnkId);
        Assert.False(t.AddBosToken);   // this tokenizer.json's post-processor is ByteLevel only; the config says nothing
        Assert.False(t.AddEosToken);
        Assert.NotNull(t.ChatTemplate);
        Assert.Contains("<|start_header_id|>", t.ChatTemplate);
        Assert.Equal(256, t.SpecialTokens.Count);
        Assert.Equal(128009, t.SpecialTokens["<|eot_id|>"]);
        Assert.True(t.IsSpecial(128009));
        Assert.False(t.IsSpecial(9906));
        Assert.Equal(128009, t.TokenToId("<|eot_id|>"));
        Assert.Null(t.TokenToId("no such token"));
        Assert.Equal("Hello", t.TokenPiece(9906));
        Assert.Equal("Ġworld", t.TokenPiece(1917));
        Assert.Equal(" world"u8.ToArray(), t.TokenBytes(1917));
        Assert.Equal("<|eot_id|>"u8.ToArray(), t.TokenBytes(128009));
        Assert.Equal([9906, 1917], t.Encode("Hello world"));
    }

    [TokenizerFact]
    public void Qwen_metadata()
    {
        TextTokenizer t = TokenizerFixtures.Load("qwen");
        Assert.Equal(TokenizerKind.ByteLevelBpe, t.Kind);
        Assert.Equal(151669, t.VocabSize);
        Assert.Null(t.BosId);
        Assert.Null(t.BosToken);
        Assert.Equal(151645, t.EosId);
        Assert.Equal(151643, t.PadId);
        Assert.False(t.AddBosToken);
        Assert.Contains("<|im_start|>", t.ChatTemplate);
        Assert.Equal(26, t.SpecialTokens.Count);
        int think = t.SpecialTokens["<think>"];
        Assert.False(t.IsSpecial(think));       // an added token, but not a special one
        Assert.True(t.IsSpecial(151644));
        Assert.Equal([think], t.Encode("<think>"));
        Assert.Equal("<think>", t.Decode([think], skipSpecialTokens: true));
        // NFC: a decomposed é encodes like the composed one
        Assert.Equal(t.Encode("caf\u00e9"), t.Encode("cafe\u0301"));
    }

    [TokenizerFact]
    public void Llama2_metadata_from_tokenizer_model()
    {
        TextTokenizer t = TokenizerFixtures.Load("llama2");
        Assert.Equal(TokenizerKind.SentencePiece, t.Kind);
        Assert.Equal(32000, t.VocabSize);
        Assert.Equal((1, 2, 0), (t.BosId, t.EosId, t.UnkId));
        Assert.Null(t.PadId);
        Assert.True(t.AddBosToken);
        Assert.False(t.AddEosToken);
        Assert.Null(t.ChatTemplate);
        Assert.Equal(new Dictionary<string, int> { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 }, t.SpecialTokens);
        Assert.Equal([15043], t.Encode("Hello"));
        Assert.Equal("▁Hello", t.TokenPiece(15043));
        Assert.Equal(" Hello"u8.ToArray(), t.TokenBytes(15043));
        Assert.Equal("<0x0A>", t.TokenPiece(13));
        Assert.Equal([(byte)'\n'], t.TokenBytes(13));
        Assert.Equal("Hello", t.Decode(t.Encode("Hello")));
        Assert.Equal(" Hello", t.Decode(t.Encode(" Hello")));
    }

    [TokenizerFact]
    public void Mistral_metadata_from_sentencepiece_style_tokenizer_json()
    {
        TextTokenizer t = TokenizerFixtures.Load("mistral");
        Assert.Equal(TokenizerKind.SentencePiece, t.Kind);
        Assert.Equal(32000, t.VocabSize);
        Assert.Equal((1, 2, 0), (t.BosId, t.EosId, t.UnkId));
        Assert.True(t.AddBosToken);
        Assert.Equal([22557], t.Encode("Hello"));
        Assert.Equal([1, 22557], t.EncodeWithSpecial("Hello"));
        Assert.Equal("Hello world", t.Decode(t.Encode("Hello world")));
        Assert.Equal("<s> Hello", t.Decode([1, 22557]));          // as Hugging Face: the strip applies to the whole text
        Assert.Equal("Hello", t.Decode([1, 22557], skipSpecialTokens: true));
    }

    [TokenizerTheory]
    [InlineData("llama2")]
    [InlineData("mistral")]
    public void SentencePiece_special_token_parsing(string family)
    {
        TextTokenizer t = TokenizerFixtures.Load(family);
        int a = t.Encode("a")[0], b = t.Encode("b")[0];
        // parsed: each text segment gets its own dummy prefix (Hugging Face legacy behaviour)
        Assert.Equal([a, 2, b], t.Encode("a</s>b"));
        Assert.Equal([a, 2, b], t.Encode("a</s>b", parseSpecialTokens: true));
        int[] plain = t.Encode("a</s>b", parseSpecialTokens: false);
        Assert.DoesNotContain(2, plain);
        Assert.Equal("a</s>b", t.Decode(plain));
        Assert.Equal([1, a], t.Encode("<s>a"));
        Assert.Equal([0], t.Encode("<unk>"));
    }

    [TokenizerTheory]
    [InlineData("llama2")]
    [InlineData("mistral")]
    [InlineData("llama3")]
    [InlineData("qwen")]
    public void EncodeWithSpecial_adds_bos_once(string family)
    {
        TextTokenizer t = TokenizerFixtures.Load(family);
        int[] plain = t.Encode("Hello there");
        int[] with = t.EncodeWithSpecial("Hello there");
        if (t.AddBosToken && t.BosId is int bos)
        {
            Assert.Equal([bos, .. plain], with);
            int[] already = t.EncodeWithSpecial(t.BosToken + "Hello there");
            Assert.Equal(bos, already[0]);
            Assert.Single(already, x => x == bos);
            // not parsed: the BOS text is plain text, so a real BOS is still added in front of it
            int[] unparsed = t.EncodeWithSpecial(t.BosToken + "Hello there", parseSpecialTokens: false);
            Assert.Equal(bos, unparsed[0]);
            Assert.Single(unparsed, x => x == bos);
        }
        else Assert.Equal(plain, with);
        Assert.Equal([], t.Encode(""));
    }

    [TokenizerFact]
    public void Byte_level_special_token_parsing()
    {
        TextTokenizer t = TokenizerFixtures.Load("llama3");
        Assert.Equal([13347, 128009, 19041], t.Encode("Hi<|eot_id|>there"));
        int[] plain = t.Encode("Hi<|eot_id|>there", parseSpecialTokens: false);
        Assert.DoesNotContain(128009, plain);
        Assert.True(plain.Length > 3);
        Assert.Equal("Hi<|eot_id|>there", t.Decode(plain));
        Assert.Equal("Hi<|eot_id|>there", t.Decode([13347, 128009, 19041]));
        Assert.Equal("Hithere", t.Decode([13347, 128009, 19041], skipSpecialTokens: true));
        Assert.Equal([128000, 128000], t.Encode("<|begin_of_text|><|begin_of_text|>"));
        // the longest added token wins at a position; unknown look-alikes are text
        Assert.DoesNotContain(t.Encode("<|not_a_token|>"), id => t.IsSpecial(id));
    }

    public static TheoryData<string, string> StreamCases()
    {
        var data = new TheoryData<string, string>();
        string[] texts =
        [
            "👍🏽 thumbs 👨‍👩‍👧‍👦 family 🏳️‍🌈", "你好，世界！日本語のテキスト 한국어", "𝐀𝐁𝐂 𠀀𠀁 mixed ascii é ü",
            "Hello<|eot_id|>😀 world</s> ok", "\n\t  leading space and emoji 🧑🏾‍💻\n",
        ];
        foreach (string f in TokenizerFixtures.Families)
            foreach (string s in texts) data.Add(f, s);
        return data;
    }

    [TokenizerTheory]
    [MemberData(nameof(StreamCases))]
    public void Stream_decoder_never_splits_a_character(string family, string text)
    {
        TextTokenizer t = TokenizerFixtures.Load(family);
        int[] ids = t.Encode(text);
        foreach (bool skip in new[] { false, true })
        {
            Utf8StreamDecoder d = t.CreateStreamDecoder(skip);
            var sb = new StringBuilder();
            foreach (int id in ids)
            {
                string piece = d.Push(id);
                Assert.DoesNotContain('\uFFFD', piece);
                sb.Append(piece);
            }
            sb.Append(d.Flush());
            Assert.Equal(t.Decode(ids, skip), sb.ToString());
        }
    }

    [TokenizerTheory]
    [InlineData("llama3", "👍🏽")]
    [InlineData("qwen", "𠀀")]
    [InlineData("mistral", "𠀀")]
    [InlineData("llama2", "🫶")]
    public void Single_tokens_of_a_character_can_be_partial(string family, string text)
    {
        // Guards the stream test: decoding these tokens one by one really does give U+FFFD.
        TextTokenizer t = TokenizerFixtures.Load(family);
        int[] ids = t.Encode(text);
        Assert.True(ids.Length > 1);
        Assert.Contains(ids, id => t.Decode([id]).Contains('\uFFFD'));
    }

    [TokenizerFact]
    public void Stream_decoder_flush_emits_replacement_for_leftovers()
    {
        TextTokenizer t = TokenizerFixtures.Load("llama2");
        Utf8StreamDecoder d = t.CreateStreamDecoder();
        Assert.Equal("", d.Push(t.TokenToId("<0xF0>")!.Value));
        Assert.Equal("", d.Push(t.TokenToId("<0x9F>")!.Value));
        Assert.Equal("\uFFFD", d.Flush());
        // after a flush the decoder starts afresh
        Assert.Equal("Hi", d.Push(t.Encode("Hi")[0]) + d.Flush());
        // unknown ids are skipped, as in Decode
        Assert.Equal("", d.Push(-5) + d.Push(1_000_000));
        Assert.Equal("", t.Decode([-5, 1_000_000]));
    }

    [TokenizerFact]
    public void Token_accessors_reject_unknown_ids()
    {
        TextTokenizer t = TokenizerFixtures.Load("qwen");
        Assert.Throws<ArgumentOutOfRangeException>(() => t.TokenPiece(t.VocabSize));
        Assert.Throws<ArgumentOutOfRangeException>(() => t.TokenBytes(-1));
        Assert.False(t.IsSpecial(-1));
    }

    [TokenizerFact]
    public void Encode_throughput()
    {
        // Reports chars/s on a long mixed text (no timed assert).
        var sb = new StringBuilder();
        var strings = TokenizerGoldenTests.RandomStrings(99, 400);
        while (sb.Length < 400_000) foreach (string s in strings) sb.Append(s).Append(' ');
        string text = sb.ToString();
        foreach (string f in TokenizerFixtures.Families)
        {
            TextTokenizer t = TokenizerFixtures.Load(f);
            t.Encode(text[..20_000]);
            var sw = Stopwatch.StartNew();
            int[] ids = t.Encode(text);
            sw.Stop();
            var sw2 = Stopwatch.StartNew();
            string back = t.Decode(ids);
            sw2.Stop();
            output.WriteLine($"{f}: {text.Length:N0} chars -> {ids.Length:N0} tokens in {sw.Elapsed.TotalMilliseconds:F0} ms " +
                $"({text.Length / sw.Elapsed.TotalSeconds / 1e6:F2} M chars/s); decode {sw2.Elapsed.TotalMilliseconds:F0} ms");
            Assert.NotEmpty(back);
        }
    }
}
