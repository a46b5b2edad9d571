using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>
/// Loading errors and small synthetic tokenizers; these need no fixture cache.
/// </summary>
public sealed class TokenizerFileTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-tok-" + Guid.NewGuid().ToString("N"));

    public TokenizerFileTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }

    private string Write(string name, string text)
    {
        string p = Path.Combine(_dir, name);
        File.WriteAllText(p, text);
        return p;
    }

    private const string Llama3Pattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>A tiny byte-level tokenizer.json: the 256 byte symbols plus a few merges.</summary>
    private static JsonObject ByteLevelJson(bool ignoreMerges = false)
    {
        var vocab = new JsonObject();
        int id = 0;
        var byteChars = new List<string>();
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            byteChars.Add(printable ? ((char)b).ToString() : "");
        }
        int extra = 0;
        for (int b = 0; b < 256; b++)
            if (byteChars[b] == "") byteChars[b] = ((char)(256 + extra++)).ToString();
        foreach (string c in byteChars) vocab[c] = id++;
        string[] merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"];
        foreach (string m in merges) vocab[m.Replace(" ", "")] = id++;
        vocab["hel"] = id++;   // in the vocabulary but unreachable by merges
        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = id, ["content"] = "<|end|>", ["special"] = true }),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = Llama3Pattern }, ["behavior"] = "Isolated", ["invert"] = false },
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false }),
            },
            ["post_processor"] = null,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["ignore_merges"] = ignoreMerges,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)JsonValue.Create(m)!).ToArray()),
            },
        };
    }

    [Fact]
    public void Missing_directory_is_a_typed_error_naming_it()
    {
        string missing = Path.Combine(_dir, "nope");
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(missing));
        Assert.Equal(missing, e.FilePath);
        Assert.Contains(missing, e.Message);
        Assert.Contains("does not exist", e.Message);
    }

    [Fact]
    public void Directory_without_tokenizer_files_says_what_is_needed()
    {
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Contains(_dir, e.Message);
        Assert.Contains("tokenizer.json", e.Message);
        Assert.Contains("tokenizer.model", e.Message);
    }

    [Fact]
    public void Malformed_tokenizer_json_names_the_file()
    {
        string p = Write("tokenizer.json", "{ \"model\": { \"type\": \"BPE\", ");
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Equal(p, e.FilePath);
        Assert.Contains(p, e.Message);
        Assert.Contains("malformed JSON", e.Message);
    }

    [Theory]
    [InlineData("WordPiece")]
    [InlineData("Unigram")]
    [InlineData("WordLevel")]
    public void Unsupported_model_types_are_rejected(string type)
    {
        string p = Write("tokenizer.json", "{\"model\": {\"type\": \"" + type + "\", \"vocab\": {}}}");
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Equal(p, e.FilePath);
        Assert.Equal("model.type", e.Key);
        Assert.Contains(type, e.Message);
        Assert.Contains("supported", e.Message);
    }

    [Fact]
    public void Unsupported_split_regex_is_rejected()
    {
        JsonObject j = ByteLevelJson();
        j["pre_tokenizer"]!["pretokenizers"]![0]!["pattern"]!["Regex"] = @"\w+|\s+";
        Write("tokenizer.json", j.ToJsonString());
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Contains("split regex", e.Message);
    }

    [Fact]
    public void Unigram_sentencepiece_model_is_rejected()
    {
        // ModelProto { pieces: [{piece: "a", score: 0}], trainer_spec: {model_type: UNIGRAM} }
        byte[] piece = [0x0A, 0x01, (byte)'a', 0x15, 0, 0, 0, 0];
        byte[] model = [0x0A, (byte)piece.Length, .. piece, 0x12, 0x02, 0x18, 0x01];
        string p = Path.Combine(_dir, "tokenizer.model");
        File.WriteAllBytes(p, model);
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Equal(p, e.FilePath);
        Assert.Contains("Unigram", e.Message);
    }

    [Fact]
    public void Garbage_sentencepiece_model_is_rejected()
    {
        string p = Path.Combine(_dir, "tokenizer.model");
        File.WriteAllBytes(p, [0x0A, 0xFF, 0xFF, 0x01, 0x02]);
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Equal(p, e.FilePath);
    }

    [Fact]
    public void Malformed_tokenizer_config_names_the_config()
    {
        Write("tokenizer.json", ByteLevelJson().ToJsonString());
        string p = Write("tokenizer_config.json", "{\"bos_token\": 12}");
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Equal(p, e.FilePath);
        Assert.Equal("bos_token", e.Key);
        Write("tokenizer_config.json", "not json");
        e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(_dir));
        Assert.Contains("malformed JSON", e.Message);
    }

    [Fact]
    public void Synthetic_byte_level_tokenizer_encodes_and_decodes()
    {
        Write("tokenizer.json", ByteLevelJson().ToJsonString());
        Write("tokenizer_config.json", """
            {"bos_token": {"content": "<|end|>"}, "add_bos_token": true, "eos_token": "<|end|>",
             "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
            """);
        TextTokenizer t = TextTokenizer.FromDirectory(_dir);
        Assert.Equal(TokenizerKind.ByteLevelBpe, t.Kind);
        int hello = t.TokenToId("hello")!.Value, world = t.TokenToId("Ġworld")!.Value, end = t.TokenToId("<|end|>")!.Value;
        Assert.Equal(end + 1, t.VocabSize);
        Assert.Equal([hello, world], t.Encode("hello world"));
        Assert.Equal([hello, end, world], t.Encode("hello<|end|> world"));
        Assert.Equal("hello<|end|> world", t.Decode(t.Encode("hello<|end|> world", parseSpecialTokens: false)));
        Assert.Equal([end, hello], t.EncodeWithSpecial("hello"));
        Assert.Equal([end, hello], t.EncodeWithSpecial("<|end|>hello"));
        Assert.Equal("D", t.ChatTemplate);
        // "hel" is in the vocabulary but merges do not reach it; ignore_merges=false must not emit it whole
        Assert.Equal(["he", "l"], t.Encode("hel").Select(t.TokenPiece));
        string s = "héllo 😀\n\n  wörld";
        Assert.Equal(s, t.Decode(t.Encode(s)));
    }

    [Fact]
    public void Ignore_merges_emits_a_pre_token_that_is_a_vocabulary_entry_whole()
    {
        Write("tokenizer.json", ByteLevelJson(ignoreMerges: true).ToJsonString());
        TextTokenizer t = TextTokenizer.FromDirectory(_dir);
        Assert.Equal(["hel"], t.Encode("hel").Select(t.TokenPiece));
    }

    [Fact]
    public void Synthetic_sentencepiece_tokenizer_json_with_byte_fallback()
    {
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        for (int b = 0; b < 256; b++) vocab[$"<0x{b:X2}>"] = 3 + b;
        int id = 259;
        string[] merges = ["▁ a", "a b", "▁a b"];
        foreach (string c in new[] { "▁", "a", "b" }) vocab[c] = id++;
        foreach (string m in merges) vocab[m.Replace(" ", "")] = id++;
        var j = new JsonObject
        {
            ["added_tokens"] = new JsonArray(
                new JsonObject { ["id"] = 0, ["content"] = "<unk>", ["special"] = true },
                new JsonObject { ["id"] = 1, ["content"] = "<s>", ["special"] = true },
                new JsonObject { ["id"] = 2, ["content"] = "</s>", ["special"] = true }),
            ["normalizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["normalizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" },
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = "▁" }),
            },
            ["pre_tokenizer"] = null,
            ["post_processor"] = JsonNode.Parse("""{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}]}"""),
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["byte_fallback"] = true, ["fuse_unk"] = true, ["unk_token"] = "<unk>", ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)JsonValue.Create(m)!).ToArray()),
            },
        };
        Write("tokenizer.json", j.ToJsonString());
        TextTokenizer t = TextTokenizer.FromDirectory(_dir);
        Assert.Equal(TokenizerKind.SentencePiece, t.Kind);
        Assert.True(t.AddBosToken);
        Assert.Equal(1, t.BosId);
        Assert.Equal(0, t.UnkId);
        Assert.Equal(["▁ab", "▁a"], t.Encode("ab a").Select(t.TokenPiece));
        // "é" is not in the vocabulary: UTF-8 byte fallback
        Assert.Equal(["▁a", "<0xC3>", "<0xA9>"], t.Encode("aé").Select(t.TokenPiece));
        Assert.Equal("aé", t.Decode(t.Encode("aé")));
        Assert.Equal([1, t.TokenToId("▁ab")!.Value], t.EncodeWithSpecial("ab"));
        Assert.Equal([1, t.TokenToId("▁ab")!.Value], t.EncodeWithSpecial("<s>ab"));
    }
}
