using System.Text;
using LoraMix.Tokenization;
using Xunit.Abstractions;

namespace LoraMix.Tests.Tokenization;

/// <summary>
/// Exact-id tests against the JavaScript reference encoders: the committed goldens (tokenizer-golden/*.json, made by
/// scripts/make-tokenizer-golden) and a seeded random cross-check that calls node at test time.
/// </summary>
public sealed class TokenizerGoldenTests(ITestOutputHelper output)
{
    public static TheoryData<string> Families => new(TokenizerFixtures.Families);

    private static string GoldenPath(string file) =>
        SharedAssets.FindTestFile(Path.Combine("Tokenization", "tokenizer-golden", file))
        ?? throw new FileNotFoundException($"tokenizer-golden/{file} not found");

    [TokenizerTheory]
    [MemberData(nameof(Families))]
    public void Golden_ids_match_the_reference_exactly(string family)
    {
        TextTokenizer tok = TokenizerFixtures.Load(family);
        var rows = TokenizerFixtures.ReadReferences(File.ReadAllText(GoldenPath(family + ".json")));
        var strings = System.Text.Json.JsonSerializer.Deserialize<string[]>(File.ReadAllText(GoldenPath("strings.json")))!;
        Assert.True(rows.Count >= 60, $"{family}: only {rows.Count} golden strings");
        Assert.Equal(strings, rows.Select(r => r.Text).ToArray());
        var failures = Compare(tok, rows);
        Assert.True(failures.Count == 0, $"{family}: {failures.Count}/{rows.Count} mismatches:\n{string.Join("\n", failures.Take(20))}");
        output.WriteLine($"{family}: {rows.Count}/{rows.Count} golden strings identical");
    }

    [TokenizerTheory]
    [MemberData(nameof(Families))]
    public void Decode_of_encode_round_trips(string family)
    {
        TextTokenizer tok = TokenizerFixtures.Load(family);
        var strings = System.Text.Json.JsonSerializer.Deserialize<string[]>(File.ReadAllText(GoldenPath("strings.json")))!;
        var failures = new List<string>();
        foreach (string s in strings.Concat(RandomStrings(7, 200)))
        {
            // Qwen normalizes to NFC, so the round trip gives the NFC form, as in Hugging Face.
            string expected = family == "qwen" ? s.Normalize(NormalizationForm.FormC) : s;
            foreach (bool parse in new[] { true, false })
            {
                // SentencePiece (legacy Llama-2/Mistral): each text segment after a parsed special token gets its own
                // dummy-prefix ▁, so "a</s>b" decodes as "a</s> b" -- Hugging Face behaves the same way.
                if (parse && tok.Kind == TokenizerKind.SentencePiece && tok.SpecialTokens.Keys.Any(s.Contains)) continue;
                string back = tok.Decode(tok.Encode(s, parse));
                if (back != expected) failures.Add($"parse={parse} {Show(s)} -> {Show(back)}");
            }
        }
        Assert.True(failures.Count == 0, $"{family}: {failures.Count} round-trip failures:\n{string.Join("\n", failures.Take(20))}");
    }

    [TokenizerTheory(needsNode: true)]
    [MemberData(nameof(Families))]
    public void Random_strings_match_the_reference_exactly(string family)
    {
        int count = int.TryParse(Environment.GetEnvironmentVariable("LORAMIX_TOKENIZER_RANDOM"), out int n) ? n : 400;
        int seed = int.TryParse(Environment.GetEnvironmentVariable("LORAMIX_TOKENIZER_SEED"), out int sd) ? sd : 20240611;
        TextTokenizer tok = TokenizerFixtures.Load(family);
        var strings = RandomStrings(seed, count);
        strings.AddRange(HardStrings(seed + 1, Math.Max(count / 4, 10)));
        var rows = TokenizerFixtures.RunReference(family, strings);
        var failures = Compare(tok, rows);
        Assert.True(failures.Count == 0, $"{family} (seed {seed}): {failures.Count}/{rows.Count} mismatches:\n{string.Join("\n", failures.Take(10))}");
        output.WriteLine($"{family}: {rows.Count}/{rows.Count} random strings identical (seed {seed})");
    }

    internal static List<string> Compare(TextTokenizer tok, List<TokenizerFixtures.Reference> rows)
    {
        var failures = new List<string>();
        foreach (var r in rows)
        {
            int[] ids = tok.Encode(r.Text, parseSpecialTokens: r.ParseSpecial);
            if (!ids.AsSpan().SequenceEqual(r.Ids))
                failures.Add($"{Show(r.Text)}\n  expected [{string.Join(",", r.Ids)}] {Pieces(tok, r.Ids)}\n  actual   [{string.Join(",", ids)}] {Pieces(tok, ids)}");
        }
        return failures;
    }

    private static string Pieces(TextTokenizer tok, int[] ids) =>
        string.Join(" ", ids.Select(i => i >= 0 && i < tok.VocabSize ? tok.TokenPiece(i) : "?"));

    internal static string Show(string s)
    {
        var sb = new StringBuilder("\"");
        foreach (char c in s)
            sb.Append(c < 0x20 || c == '"' || char.IsSurrogate(c) ? $"\\u{(int)c:X4}" : c.ToString());
        return sb.Append('"').ToString();
    }

    // ---------------------------------------------------------------- random strings

    private static readonly string[] Words =
    [
        "the", "The", "THE", "hello", "World", "tokenizer", "encoding", "Llama", "qwen", "mistral", "a", "I", "x",
        "don't", "it's", "We're", "they've", "I'm", "you'll", "he'd", "IT'S", "YOU'LL", "'s", "'t", "'re", "'ve", "'m",
        "'ll", "'d", "'S", "'T", "'LL", "'Re", "'x", "''", "o'clock", "rock'n'roll",
        "café", "naïve", "über", "façade", "Ångström", "résumé", "e\u0301", "a\u0308", "n\u0303o", "Å", "ﬁ", "Ⅻ",
        "你好", "世界", "日本語", "テスト", "한국어", "中文字符", "漢字", "ひらがな", "カタカナ",
        "مرحبا", "العالم", "नमस्ते", "हिन्दी", "Привет", "мир", "Γειά", "שלום", "ไทย", "ሰላም", "ქართული",
        "😀", "👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏾‍💻", "❤️", "🇺🇸", "🇯🇵", "✨", "🎉🎉", "👩🏻‍🔬", "☺", "⭐",
        "𝐀𝐁𝐂", "𝟘𝟙𝟚", "𠀀", "𝔘𝔫𝔦", "\U0001D11E", "ℝ", "∑", "√2", "½", "²", "①", "٣", "३", "๓",
        "def", "return", "x[i]", "a+b", "f(x)", "{}", "[]", "()", "=>", "->", "::", "&&", "||", "!=", "==", "+=",
        "<div>", "</div>", "http://", "https://example.com/a?b=c&d=e", "user@mail.org", "C:\\path\\file",
        "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>",
        "<|endoftext|>", "<think>", "</think>", "<s>", "</s>", "<unk>", "<|reserved_special_token_5|>", "<|", "|>",
        "...", "!!!", "?!", "--", "__", "**", "##", "$$", "%", "@", "#", "~", "`", "^", "\\", "/", "|", "\"", "'", "¿", "¡",
        "«", "»", "—", "–", "…", "·", "•", "€", "£", "¥", "©", "®", "™", "°", "±", "×", "÷", "\u00ad", "\u200b", "\u200d",
        "\ufeff", "\u0085", "\u00a0", "\u3000", "\u2028", "\u202f", "\u2009", "\u0000", "\u0007", "\u001b", "\u007f",
    ];

    private static readonly string[] Dense =
    [
        "a", "b", "Z", " ", "  ", "\n", "1", "22", "333", "é", "中", "😀", "👍🏽", "𝐀", "𝐁", "𝟘", "𝟙", "𝟚", "𠀀", "𐐀", "𐐨",
        "'s", "'LL", "\t", ".", "!", "ﬁ", "\ufeff", "\u0085", "\u00a0", "\r\n",
    ];

    private static readonly string[] Spaces = [" ", " ", " ", " ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ", "\r", "\n\n\n", "        ", "\v", "\f"];

    internal static List<string> RandomStrings(int seed, int count)
    {
        var rng = new Random(seed);
        var list = new List<string>(count);
        for (int k = 0; k < count; k++)
        {
            var sb = new StringBuilder();
            int parts = rng.Next(1, 14);
            if (rng.Next(6) == 0) sb.Append(Spaces[rng.Next(Spaces.Length)]);
            for (int p = 0; p < parts; p++)
            {
                int kind = rng.Next(10);
                if (kind < 5) sb.Append(Words[rng.Next(Words.Length)]);
                else if (kind == 5) sb.Append(Digits(rng));
                else if (kind == 6) sb.Append(RandomChars(rng));
                else if (kind == 7) sb.Append(new string(" abz.!\n0"[rng.Next(8)], rng.Next(1, 12)));
                else sb.Append(Spaces[rng.Next(Spaces.Length)]);
                if (rng.Next(3) > 0) sb.Append(rng.Next(4) == 0 ? Spaces[rng.Next(Spaces.Length)] : " ");
            }
            if (rng.Next(5) == 0) sb.Append(Spaces[rng.Next(Spaces.Length)]);
            list.Add(sb.ToString());
        }
        return list;
    }

    /// <summary>
    /// Harder cases: arbitrary code points from all planes (unassigned, controls, combining marks, private use), long
    /// runs of one character, and long texts mixing scripts with byte-fallback characters.
    /// </summary>
    internal static List<string> HardStrings(int seed, int count)
    {
        var rng = new Random(seed);
        var list = new List<string>(count);
        for (int k = 0; k < count; k++)
        {
            var sb = new StringBuilder();
            switch (k % 4)
            {
                case 0:
                    for (int i = rng.Next(1, 40); i > 0; i--)
                    {
                        int cp = rng.Next(4) switch
                        {
                            0 => rng.Next(0, 0x80),
                            1 => rng.Next(0x80, 0x3000),
                            2 => rng.Next(0x3000, 0x10000),
                            _ => rng.Next(0x10000, 0x110000),
                        };
                        if (cp >= 0xD800 && cp <= 0xDFFF) cp = ' ';
                        sb.Append(char.ConvertFromUtf32(cp));
                    }
                    break;
                case 1:
                    string unit = new[] { "a", " ", "ab", "0", "1", "\n", "😀", "é", "中", "'s", "!", "\t ", " a", "▁", "Ġ" }[rng.Next(15)];
                    for (int i = rng.Next(2, 300); i > 0; i--) sb.Append(unit);
                    break;
                case 2:
                    sb.Append(string.Join("", RandomStrings(rng.Next(), rng.Next(5, 40))));
                    break;
                default:
                    // Dense mixes of astral letters/digits, emoji, ligatures and odd whitespace: where a UTF-16 regex
                    // (e.g. Microsoft.ML.Tokenizers' RegexPreTokenizer) splits differently from the references.
                    for (int i = rng.Next(1, 24); i > 0; i--) sb.Append(Dense[rng.Next(Dense.Length)]);
                    break;
            }
            list.Add(sb.ToString());
        }
        return list;
    }

    private static string Digits(Random rng)
    {
        var sb = new StringBuilder();
        int n = rng.Next(1, 12);
        for (int i = 0; i < n; i++) sb.Append((char)('0' + rng.Next(10)));
        if (rng.Next(4) == 0) sb.Append(rng.Next(2) == 0 ? "." : ",").Append(rng.Next(1000));
        return sb.ToString();
    }

    /// <summary>Random code points from assorted blocks, astral planes included.</summary>
    private static string RandomChars(Random rng)
    {
        (int Lo, int Hi)[] ranges =
        [
            (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
            (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2100, 0x22FF), (0x2460, 0x24FF), (0x3000, 0x30FF),
            (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF),
            (0x10000, 0x1007F), (0xE000, 0xE0FF),
        ];
        var sb = new StringBuilder();
        int n = rng.Next(1, 8);
        for (int i = 0; i < n; i++)
        {
            var (lo, hi) = ranges[rng.Next(ranges.Length)];
            int cp = rng.Next(lo, hi + 1);
            if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
            sb.Append(char.ConvertFromUtf32(cp));
        }
        return sb.ToString();
    }
}
