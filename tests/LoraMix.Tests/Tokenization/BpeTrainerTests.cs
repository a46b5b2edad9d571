using System.Text;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Tokenization;
using LoraMix.Workflows;
using Xunit.Abstractions;

namespace LoraMix.Tests.Tokenization;

/// <summary>
/// The byte-level BPE trainer (<c>model_init.tokenizer: {train: bpe, vocab_size: N}</c>): what it writes loads in the project
/// and in transformers.js with identical ids, round-trips any text, is the same file on every run, and its recipe keys fail
/// with the key named.
/// </summary>
public sealed class BpeTrainerTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-bpe-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A task-world corpus: the text runs between specials of rendered chats, as pre-training feeds the trainer.</summary>
    private static List<string> Corpus(int count, int seed = 0)
    {
        var texts = new List<string>();
        foreach (var e in TaskWorld.Generate(TaskWorld.PretrainFamilies, count, seed, TaskSplit.Train,
                     new TaskGenerateOptions { Placement = null, ToolFraction = 0.25 }))
            foreach (var (role, content) in e.ToChat())
            {
                texts.Add(role + "\n" + content);
                texts.Add("\n");
            }
        return texts;
    }

    private string Train(string name, IEnumerable<string> texts, int vocab, int minFrequency = 2)
    {
        string dir = Path.Combine(_dir, name);
        var merges = BpeTrainer.Train(texts, new BpeTrainerOptions(vocab, minFrequency));
        ByteLevelTokenizerFiles.Write(dir, merges);
        return dir;
    }

    [Fact]
    public void TheVocabularyReachesTheAskedSizeAndTaskWorldWordsAreOneToken()
    {
        string dir = Train("tw", Corpus(4000), 768);
        var tok = TextTokenizer.FromDirectory(dir);
        Assert.Equal(768, tok.VocabSize);
        // every built-in word after a space is one token; the rarer uppercase forms (lowercase's inputs) get merges too
        foreach (string w in TaskWorld.Words) Assert.Single(tok.Encode(" " + w));
        int merged = TaskWorld.Words.Count(w => tok.Encode(" " + w.ToUpperInvariant()).Length < w.Length + 1);
        Assert.True(merged >= TaskWorld.Words.Count / 2, $"only {merged} uppercase words use a merge");
        // the ChatML specials come after the learnt pieces
        Assert.Equal(765, tok.SpecialTokens["<|endoftext|>"]);
        Assert.Equal(767, tok.SpecialTokens["<|im_end|>"]);
    }

    [Fact]
    public void EncodeThenDecodeIsExactOnArbitraryUnicode()
    {
        var tok = TextTokenizer.FromDirectory(Train("rt", Corpus(2000), 600));
        var failures = new List<string>();
        var strings = TokenizerGoldenTests.RandomStrings(11, 300);
        strings.AddRange(TokenizerGoldenTests.HardStrings(12, 100));
        strings.AddRange(["", " ", "\n\n", "\u0000", "\uFEFF", "😀👍🏽𠀀", "CAT dog Fish 12 34", "<|im_start|>user\nhi<|im_end|>"]);
        foreach (string s in strings)
            foreach (bool parse in new[] { true, false })
            {
                string back = tok.Decode(tok.Encode(s, parse));
                if (back != s) failures.Add($"parse={parse} {TokenizerGoldenTests.Show(s)} -> {TokenizerGoldenTests.Show(back)}");
            }
        Assert.True(failures.Count == 0, $"{failures.Count} round-trip failures:\n{string.Join("\n", failures.Take(10))}");
    }

    [Fact]
    public void TheSameCorpusGivesTheSameFileAndIdsOnEveryRun()
    {
        string a = Train("a", Corpus(1500), 700), b = Train("b", Corpus(1500), 700);
        Assert.Equal(File.ReadAllBytes(Path.Combine(a, "tokenizer.json")), File.ReadAllBytes(Path.Combine(b, "tokenizer.json")));
        // the corpus order does not matter either: counts are what the trainer sees
        var shuffled = Corpus(1500);
        new Random(3).Shuffle(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(shuffled));
        string c = Train("c", shuffled, 700);
        Assert.Equal(File.ReadAllBytes(Path.Combine(a, "tokenizer.json")), File.ReadAllBytes(Path.Combine(c, "tokenizer.json")));
        // and a different corpus gives different merges (the test can fail)
        string d = Train("d", Corpus(1500, seed: 5).Select(t => t.ToUpperInvariant()), 700);
        Assert.NotEqual(File.ReadAllBytes(Path.Combine(a, "tokenizer.json")), File.ReadAllBytes(Path.Combine(d, "tokenizer.json")));
    }

    [Fact]
    public void MergesFollowFrequencyStayInsidePreTokensAndStopAtMinFrequency()
    {
        // "ab" x3 + " ab" x2 + "cd" x1: one pre-token each; the first merge is (a, b), the most frequent pair
        var merges = BpeTrainer.Train(["ab ab ab", "cd"], new BpeTrainerOptions(400, MinFrequency: 2));
        Assert.Equal(("a", "b"), merges[0]);
        // "ab ab ab" splits into "ab", " ab", " ab": (Ġ, ab) is seen twice, (b, Ġ) never (it would cross pre-tokens)
        Assert.Contains(("Ġ", "ab"), merges);
        Assert.DoesNotContain(merges, m => m.Left.EndsWith('b') && m.Right.StartsWith('Ġ'));
        // (c, d) is seen once: below min_frequency, so training stops short of the asked size
        Assert.DoesNotContain(("c", "d"), merges);
        Assert.Equal(2, merges.Count);
        Assert.Equal(3, BpeTrainer.Train(["ab ab ab", "cd"], new BpeTrainerOptions(400, MinFrequency: 1)).Count);
        // empty corpus: no merges, still a valid byte-level tokenizer
        Assert.Empty(BpeTrainer.Train([], new BpeTrainerOptions(300)));
        Assert.Empty(BpeTrainer.Train(["", ""], new BpeTrainerOptions(300)));
        // ties go to the ordinally smallest pair: "xy" and "ab" each once with min 1 -> (a, b) first
        Assert.Equal(("a", "b"), BpeTrainer.Train(["xy", "ab"], new BpeTrainerOptions(262, MinFrequency: 1))[0]);
        // the smallest vocabulary is the bytes plus the specials: no merges
        Assert.Empty(BpeTrainer.Train(["ab ab"], new BpeTrainerOptions(ByteLevelTokenizerFiles.VocabSize(0))));
        Assert.Throws<ArgumentOutOfRangeException>(() => BpeTrainer.Train(["ab"], new BpeTrainerOptions(258)));
        Assert.Throws<ArgumentOutOfRangeException>(() => BpeTrainer.Train(["ab"], new BpeTrainerOptions(300, MinFrequency: 0)));
    }

    [Fact]
    public void SpaceApartKeepsAWordTheSameTokenAtTheStartAndAfterASpace()
    {
        var corpus = Corpus(3000);
        string dir = Path.Combine(_dir, "apart");
        ByteLevelTokenizerFiles.Write(dir, BpeTrainer.Train(corpus, new BpeTrainerOptions(1024, SpaceApart: true)));
        var tok = TextTokenizer.FromDirectory(dir);
        int space = tok.Encode(" ")[0];
        foreach (string w in TaskWorld.Words)
        {
            int[] bare = tok.Encode(w), spaced = tok.Encode(" " + w);
            Assert.Single(bare);
            Assert.Equal([space, bare[0]], spaced);
        }
        // no learnt piece has a space followed by anything but spaces
        var merges = BpeTrainer.Train(corpus, new BpeTrainerOptions(1024, SpaceApart: true));
        Assert.DoesNotContain(merges, m => m.Left.EndsWith('Ġ') && !m.Right.StartsWith('Ġ'));
        // without the option the same corpus does glue spaces to words (the option is what changes it)
        Assert.Contains(BpeTrainer.Train(corpus, new BpeTrainerOptions(1024)), m => m.Left == "Ġ" && char.IsAsciiLetter(m.Right[0]));
        // round trip still exact
        foreach (string s in TokenizerGoldenTests.RandomStrings(5, 100)) Assert.Equal(s, tok.Decode(tok.Encode(s)));
    }

    [Fact]
    public void AHugeSinglePreTokenTrainsAndRoundTrips()
    {
        // one 200,000-letter pre-token (a pathological corpus) plus a line of digits that can never merge (split one by one)
        string huge = new('a', 200_000), digits = string.Concat(Enumerable.Repeat("0123456789", 1000));
        var merges = BpeTrainer.Train([huge, digits], new BpeTrainerOptions(300));
        Assert.All(merges, m => Assert.Matches("^a+$", m.Left + m.Right));   // digits are single pre-tokens: no digit merges
        string dir = Path.Combine(_dir, "huge");
        ByteLevelTokenizerFiles.Write(dir, merges);
        var tok = TextTokenizer.FromDirectory(dir);
        int[] ids = tok.Encode(huge);
        Assert.True(ids.Length < huge.Length / 100, $"{ids.Length} tokens");
        Assert.Equal(huge, tok.Decode(ids));
        Assert.Equal(digits.Length, tok.Encode(digits).Length);
    }

    [Fact]
    public void TextRunsAreTheBytesBetweenSpecials()
    {
        byte[] hello = Encoding.UTF8.GetBytes("héllo");
        int[] ids = [300, .. hello.Select(b => (int)b), 301, 302, 10, 300];
        Assert.Equal(["héllo", "\n"], BpeTrainer.TextRuns([ids]).ToArray());
        Assert.Equal(["ab", "cd"], BpeTrainer.TextRuns([[97, 98], [99, 100]]).ToArray());   // runs never join across examples
        Assert.Empty(BpeTrainer.TextRuns([[], [300]]));
    }

    [TokenizerFact(needsNode: true)]
    public void TransformersJsGivesTheSameIdsOnRandomStrings()
    {
        string dir = Train("js", Corpus(3000), 1024);
        AssertMatchesReference(dir, seed: 424242);
    }

    /// <summary>The committed embedded model's tokenizer (learnt by <c>loramix pretrain</c>) matches transformers.js too.</summary>
    [TokenizerFact(needsNode: true)]
    public void TheEmbeddedModelsTokenizerMatchesTransformersJs() => AssertMatchesReference(LoraMix.Modeling.EmbeddedModel.Locate(), seed: 77);

    private void AssertMatchesReference(string dir, int seed)
    {
        var tok = TextTokenizer.FromDirectory(dir);
        var strings = TokenizerGoldenTests.RandomStrings(seed, 300);
        strings.AddRange(TokenizerGoldenTests.HardStrings(seed + 1, 75));
        strings.AddRange(Corpus(50, seed).Select(t => t + "<|im_end|>\n<|im_start|>assistant\n"));
        var rows = TokenizerFixtures.RunReference("dir", strings, dir);
        var failures = TokenizerGoldenTests.Compare(tok, rows);
        Assert.True(failures.Count == 0, $"{failures.Count}/{rows.Count} mismatches:\n{string.Join("\n", failures.Take(10))}");
        output.WriteLine($"{rows.Count}/{rows.Count} strings identical to transformers.js ({dir})");
    }

    private static string Recipe(string tokenizer) => $"""
        model_init:
          hidden_size: 32
          intermediate_size: 64
          num_hidden_layers: 1
          num_attention_heads: 2
          num_key_value_heads: 1
          tokenizer: {tokenizer}
        dataset:
          task_world: {"{"}families: pretrain, count: 10{"}"}
        output_dir: out/x
        """;

    [Theory]
    [InlineData("{train: bpe, vocab_size: 512}", null, null)]
    [InlineData("{train: bpe, vocab_size: 512, min_frequency: 3}", null, null)]
    [InlineData("{train: bpe, vocab_size: 512, space_apart: true}", null, null)]
    [InlineData("{train: bpe, vocab_size: 512, space_apart: maybe}", "model_init.tokenizer.space_apart", "")]
    [InlineData("{train: unigram, vocab_size: 512}", "model_init.tokenizer.train", "supported: bpe")]
    [InlineData("{train: bpe}", "model_init.tokenizer.vocab_size", "missing")]
    [InlineData("{train: bpe, vocab_size: 100}", "model_init.tokenizer.vocab_size", "259")]
    [InlineData("{train: bpe, vocab_size: 512, min_frequency: 0}", "model_init.tokenizer.min_frequency", "at least 1")]
    [InlineData("{vocab_size: 512}", "model_init.tokenizer.train", "train: bpe")]
    [InlineData("{train: bpe, vocab_size: 512, vocab_sise: 3}", "model_init.tokenizer.vocab_sise", "unknown key")]
    public void RecipeKeysAreCheckedWithTheKeyNamed(string tokenizer, string? key, string? message)
    {
        string path = Path.Combine(_dir, "r.yaml");
        File.WriteAllText(path, Recipe(tokenizer));
        if (key is null)
        {
            var r = TrainingRecipe.Load(path);
            Assert.Equal("bpe", r.ModelInit!.Tokenizer);
            Assert.Equal(512, r.ModelInit.TrainTokenizer!.VocabSize);
            return;
        }
        var e = Assert.Throws<ConfigFileException>(() => TrainingRecipe.Load(path));
        Assert.Contains($"'{key}'", e.Message);
        Assert.Contains(message!, e.Message);
    }
}
