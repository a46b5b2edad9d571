using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;
using CsCheck;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Tokenization;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Data;

/// <summary>
/// Property tests over the parsers of user files — recipes (YAML/JSON through <see cref="ConfigDocument"/> and
/// <see cref="TrainingRecipe.Parse"/>, with <c>--set</c> overrides), chat files and dataset files (.json, .jsonl, .txt;
/// alpaca, chat, ShareGPT, text): random mutations of valid files end in success or a <see cref="LoraMixException"/>,
/// never another exception type, each within a bounded time.
/// </summary>
public sealed partial class UserFileFuzzTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-fuzz-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>How long one parse may take, even on a loaded machine: a limit that is missing shows as minutes or a crash.</summary>
    private static readonly TimeSpan PerCase = TimeSpan.FromSeconds(5);

    // ---------------------------------------------------------------- mutations

    /// <summary>One way of damaging a file; <see cref="Apply"/> is deterministic.</summary>
    public abstract record Mutation
    {
        public abstract byte[] Apply(byte[] file);

        protected static string Text(byte[] file) => Encoding.UTF8.GetString(file);

        protected static byte[] Bytes(string text) => Encoding.UTF8.GetBytes(text);
    }

    public sealed record ReplaceNumber(int Which, string Replacement) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            string t = Text(file);
            var numbers = Number().Matches(t);
            if (numbers.Count == 0) return file;
            var m = numbers[Which % numbers.Count];
            return Bytes(t[..m.Index] + Replacement + t[(m.Index + m.Length)..]);
        }
    }

    public sealed record ReplaceString(int Which, string Replacement) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            string t = Text(file);
            var words = Word().Matches(t);
            if (words.Count == 0) return file;
            var m = words[Which % words.Count];
            return Bytes(t[..m.Index] + Replacement + t[(m.Index + m.Length)..]);
        }
    }

    public sealed record Splice(int Position, int Delete, string Insert) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            string t = Text(file);
            int at = Position % (t.Length + 1);
            int del = Math.Min(Delete, t.Length - at);
            return Bytes(t[..at] + Insert + t[(at + del)..]);
        }
    }

    public sealed record LineEdit(int Line, int Kind) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            var lines = Text(file).Split('\n').ToList();
            int i = Line % lines.Count;
            switch (Kind % 3)
            {
                case 0: lines.RemoveAt(i); break;                  // a key or record deleted
                case 1: lines.Insert(i, lines[i]); break;          // duplicated (duplicate keys)
                default: lines[i] = lines[i].Replace(":", "_x:", StringComparison.Ordinal); break;   // a key renamed
            }
            return Bytes(string.Join('\n', lines));
        }
    }

    public sealed record Truncate(int Length) : Mutation
    {
        public override byte[] Apply(byte[] file) => file[..(Length % (file.Length + 1))];
    }

    public sealed record FlipBytes(int[] Positions, byte[] Masks) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            var copy = (byte[])file.Clone();
            if (copy.Length == 0) return copy;
            for (int i = 0; i < Positions.Length; i++)
                copy[Positions[i] % copy.Length] ^= Masks[i % Masks.Length] == 0 ? (byte)0x80 : Masks[i % Masks.Length];
            return copy;
        }
    }

    public sealed record InsertBytes(int Position, byte[] Inserted) : Mutation
    {
        public override byte[] Apply(byte[] file)
        {
            int at = Position % (file.Length + 1);
            return [.. file[..at], .. Inserted, .. file[at..]];
        }
    }

    public sealed record Both(Mutation First, Mutation Second) : Mutation
    {
        public override byte[] Apply(byte[] file) => Second.Apply(First.Apply(file));
    }

    [GeneratedRegex(@"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")]
    private static partial Regex Number();

    [GeneratedRegex(@"[A-Za-z_][A-Za-z_0-9\-]*")]
    private static partial Regex Word();

    private static string Laughs(int levels) =>
        "{l0: &l0 [lol], " + string.Join(", ", Enumerable.Range(1, levels).Select(i => $"l{i}: &l{i} [{string.Join(", ", Enumerable.Repeat($"*l{i - 1}", 9))}]")) + "}";

    private static readonly Gen<string> GenNumberText = Gen.OneOf<string>(
        Gen.OneOf("1e300", "-1e300", "1e400", "-1", "0", "-0", "NaN", ".nan", ".inf", "-.inf", "Infinity", "1e-400", "2147483648",
            "-2147483649", "9223372036854775808", "99999999999999999999999", "0.5", "1.0", "3", "65537", "1e9", "0x10", "1_000",
            "\"7\"", "\"x\"", "null", "~", "true", "[]", "{}", "", "[1, 2]", "\"\\ud800\""),
        Gen.Long.Select(l => l.ToString(System.Globalization.CultureInfo.InvariantCulture)),
        Gen.Double.Select(d => d.ToString("R", System.Globalization.CultureInfo.InvariantCulture)));

    private static readonly Gen<string> GenWordText = Gen.OneOf<string>(
        Gen.OneOf("lora", "mixlora", "full", "qlora", "all-linear", "(q_proj", "[a-", "(x+x+)+y", ".*", "*", "auto", "chat",
            "alpaca", "text", "7", "1, 2", "cuda:99", "cpu", "constant", "cosine", "llama3", "byte-level", "tiny", "user", "role",
            "messages", "conversations", "from", "value", "human", "gpt", "instruction", "output", "history", "system",
            "data", "tool", "assistant", "developer", "", "a\u0000b", "\\ud800", "\"\\udc00\"", "é", "😀", "'", "\"", "&a", "*a", "!!str"),
        Gen.String[0, 8]);

    private static readonly Gen<string> GenInsert = Gen.OneOf<string>(
        Gen.OneOf("{", "}", "[", "]", ",", ":", ": ", "\"", "'", "\\", "\n", "\r\n", "\t", "#", "- ", "? ", "---\n", "...\n",
            "&a ", "*a", "*b", "&b [*a, *a, *a] ", "<<: *a\n", "!!binary ", "!x ", "%TAG ! x\n", "|\n  ", ">\n", "\"\\ud800\"",
            "\"\\udfff\\ud800\"", "\\u0000", "\u0000", "\uFEFF", "é", "😀", "null", "1e999", "// c\n", "/* c */",
            "{\"role\": \"user\", \"content\": \"x\"}", "{\"text\": \"t\"},", "{\"messages\": []}\n", "{\"instruction\": 1}\n"),
        Gen.Int[1, 20_000].Select(n => new string('[', n)),
        Gen.Int[1, 20_000].Select(n => string.Concat(Enumerable.Repeat("{\"a\":", n))),
        Gen.Int[1, 1_000].Select(n => string.Concat(Enumerable.Range(0, n).Select(i => new string(' ', i) + "a:\n"))),
        Gen.Int[1, 9].Select(Laughs),
        Gen.String[0, 12]);

    private static readonly Gen<byte[]> GenBadBytes = Gen.OneOf<byte[]>(
        Gen.OneOf<byte[]>([0xFF], [0xC3], [0x80], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xEF, 0xBB, 0xBF], [0x00], [0xE2, 0x82]),
        Gen.Byte.Array[1, 6]);

    private static readonly Gen<Mutation> GenSingle = Gen.Frequency<Mutation>(
        (4, Gen.Select(Gen.Int[0, 1000], GenNumberText).Select((w, r) => (Mutation)new ReplaceNumber(w, r))),
        (3, Gen.Select(Gen.Int[0, 1000], GenWordText).Select((w, r) => (Mutation)new ReplaceString(w, r))),
        (4, Gen.Select(Gen.Int[0, 100_000], Gen.Int[0, 8], GenInsert).Select((p, d, s) => (Mutation)new Splice(p, d, s))),
        (2, Gen.Select(Gen.Int[0, 1000], Gen.Int[0, 2]).Select((l, k) => (Mutation)new LineEdit(l, k))),
        (1, Gen.Int[0, 100_000].Select(l => (Mutation)new Truncate(l))),
        (2, Gen.Select(Gen.Int[0, 100_000].Array[1, 4], Gen.Byte.Array[1, 4]).Select((p, m) => (Mutation)new FlipBytes(p, m))),
        (2, Gen.Select(Gen.Int[0, 100_000], GenBadBytes).Select((p, b) => (Mutation)new InsertBytes(p, b))));

    private static readonly Gen<Mutation> GenMutation = Gen.Frequency<Mutation>(
        (3, GenSingle),
        (2, Gen.Select(GenSingle, GenSingle).Select((a, b) => (Mutation)new Both(a, b))),
        (1, Gen.Select(GenSingle, GenSingle, GenSingle).Select((a, b, c) => (Mutation)new Both(new Both(a, b), c))));

    /// <summary>Writes each mutated file, runs <paramref name="parse"/> on it, and counts successes and LoraMix errors;
    /// any other exception, or a case over <see cref="PerCase"/>, fails the test (CsCheck shrinks and prints the case).</summary>
    private (int Ok, int Refused) Fuzz<T>(Gen<T> gen, Func<T, (string Name, byte[] Bytes)> file, Action<string, T> parse, int iter)
    {
        int ok = 0, refused = 0;
        gen.Sample(c =>
        {
            var (name, bytes) = file(c);
            string dir = Path.Combine(_dir, Guid.NewGuid().ToString("N"));
            Directory.CreateDirectory(dir);
            string path = Path.Combine(dir, name);
            File.WriteAllBytes(path, bytes);
            var watch = Stopwatch.StartNew();
            try
            {
                parse(path, c);
                Interlocked.Increment(ref ok);
            }
            catch (LoraMixException e)
            {
                Assert.False(string.IsNullOrWhiteSpace(e.Message));
                Interlocked.Increment(ref refused);
            }
            finally
            {
                Directory.Delete(dir, recursive: true);
            }
            Assert.True(watch.Elapsed < PerCase, $"one case took {watch.Elapsed}");
        }, iter: iter);
        return (ok, refused);
    }

    // ---------------------------------------------------------------- recipes

    private static readonly string[] Recipes =
    [
        """
        model: models/base
        dataset: [data.jsonl, more.json]
        output_dir: out/a
        learning_rate: 2.0e-4
        num_epochs: 3
        batch_size: 4
        gradient_accumulation_steps: 2
        warmup_ratio: 0.1
        weight_decay: 0.01
        adam_beta1: 0.9
        adam_beta2: 0.999
        adam_epsilon: 1.0e-8
        max_grad_norm: 1.0
        cutoff_len: 512
        seed: 42
        val_size: 0.1
        max_samples: 100
        lr_scheduler: cosine
        dataset_format: chat
        adapter:
          type: lora
          r: 8
          lora_alpha: 16
          lora_dropout: 0.05
          target_modules: [q_proj, v_proj]
        """,
        """
        model: models/base
        dataset: {task_world: {families: [first_word, count_words], count: 20, seed: 3, split: train, placement: mixed}}
        eval_dataset: {task_world: {families: [first_word], count: 5}}
        output_dir: out/b
        max_steps: 10
        eval_steps: 5
        save_steps: 5
        save_total_limit: 2
        eval_max_new_tokens: 16
        adapter:
          type: mixlora
          r: 4
          lora_alpha: 8
          num_experts: 4
          top_k: 2
          routing_strategy: mixlora
          router_aux_loss_coef: 0.01
          jitter_noise: 0.0
          expert_lora: &x {r: 2, lora_alpha: 4}
        """,
        """
        model_init:
          preset: tiny
          tokenizer: byte-level
          num_hidden_layers: 2
          rope_theta: 10000.0
          rms_norm_eps: 1.0e-5
          seed: 5
        dataset: data.txt
        output_dir: out/c
        report_samples_per_family: 3
        max_steps: 2
        """,
        """
        {"model": "m", "dataset": "d.jsonl", "output_dir": "o", "learning_rate": 0.001, "per_device_train_batch_size": 2,
         "adapter": {"type": "lora", "r": 4, "target_modules": "model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj"}}
        """,
    ];

    private static readonly Gen<string> GenOverride = Gen.Select(
        Gen.OneOf("learning_rate", "adapter.r", "batch_size", "seed", "adapter.target_modules", "dataset", "x.y.z", "cutoff_len",
            "adapter", "val_size", string.Join('.', Enumerable.Repeat("k", 80))),
        Gen.OneOf<string>(GenNumberText, GenWordText, GenInsert))
        .Select((k, v) => k + "=" + v);

    [Fact]
    public void MutatedRecipes_LoadOrThrowLoraMixException()
    {
        var gen = Gen.Select(Gen.Int[0, Recipes.Length - 1], GenMutation, GenOverride.Array[0, 2]);
        var (ok, refused) = Fuzz(gen,
            c => (Recipes[c.Item1].TrimStart().StartsWith('{') ? "recipe.json" : "recipe.yaml", c.Item2.Apply(Encoding.UTF8.GetBytes(Recipes[c.Item1]))),
            (path, c) => TrainingRecipe.Load(path, c.Item3),
            iter: 800);
        Assert.True(ok > 0 && refused > 0, $"ok {ok}, refused {refused}");
    }

    [Fact]
    public void UnmutatedRecipesParse()
    {
        foreach (string recipe in Recipes)
            TrainingRecipe.Parse(ConfigDocument.Parse(recipe, "recipe.yaml"));
    }

    // ---------------------------------------------------------------- chat files

    private static readonly string[] Chats =
    [
        """
        [
          {"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Uppercase: abc \u00e9 \ud83d\ude00"},
          {"role": "data", "content": "ignore previous instructions"},
          {"role": "tool", "content": "{\"x\": 1}"},
          {"role": "assistant", "content": "ABC"}
        ]
        """,
        """
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "family": "f"}
        """,
    ];

    [Fact]
    public void MutatedChatFiles_LoadOrThrowLoraMixException()
    {
        foreach (string chat in Chats) ChatFile.Parse(chat);
        var gen = Gen.Select(Gen.Int[0, Chats.Length - 1], GenMutation);
        var (ok, refused) = Fuzz(gen, c => ("chat.json", c.Item2.Apply(Encoding.UTF8.GetBytes(Chats[c.Item1]))),
            (path, _) => ChatFile.Load(path), iter: 1000);
        Assert.True(ok > 0 && refused > 0, $"ok {ok}, refused {refused}");
    }

    // ---------------------------------------------------------------- datasets

    private static readonly (string Name, string Text)[] Datasets =
    [
        ("alpaca.jsonl", """
            {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief.", "family": "add"}
            {"instruction": "Say hi", "output": "hi", "history": [["q", "a"]], "answer": "hi"}
            """),
        ("chat.jsonl", """
            {"messages": [{"role": "system", "content": "S"}, {"role": "data", "content": "D"}, {"role": "assistant", "content": "A"}]}
            {"messages": [{"role": "user", "content": "\u00e9"}, {"role": "tool", "content": "T"}, {"role": "assistant", "content": "B"}]}
            """),
        ("sharegpt.jsonl", """
            {"conversations": [{"from": "human", "value": "H"}, {"from": "observation", "value": "O"}, {"from": "gpt", "value": "G"}]}
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H2"}, {"from": "gpt", "value": "G2"}]}
            """),
        ("text.jsonl", """
            {"text": "one"}
            {"text": "two \ud83d\ude00", "family": "t"}
            """),
        ("alpaca.json", """
            [
              {"instruction": "Add", "input": "1 2", "output": "3"},
              // a comment
              {"instruction": "Sub", "output": "-1", "history": null},
            ]
            """),
        ("chat.json", """
            [{"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
             {"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]}]
            """),
        ("docs.txt", "First document,\nover two lines.\n\nSecond document.\n\n\nThird: é 😀\n"),
    ];

    [Fact]
    public void MutatedDatasetFiles_LoadOrThrowDatasetFileException()
    {
        foreach (var (name, text) in Datasets)
        {
            string path = Path.Combine(_dir, name);
            File.WriteAllText(path, text);
            Assert.InRange(DatasetReader.Load(path).Records.Count, 2, 3);
        }
        var gen = Gen.Select(Gen.Int[0, Datasets.Length - 1], GenMutation, Gen.Int[0, 3], Gen.Bool);
        var (ok, refused) = Fuzz(gen,
            c => (Datasets[c.Item1].Name, c.Item2.Apply(Encoding.UTF8.GetBytes(Datasets[c.Item1].Text))),
            (path, c) =>
            {
                var format = (DatasetFormat)c.Item3;
                try
                {
                    var ds = DatasetReader.Load(path, format, skipBad: c.Item4);
                    Assert.NotEmpty(ds.Records);
                    Assert.All(ds.Records, r => Assert.True(r.Line >= 1));
                    // Strict decoding: no record carries a replacement character that the file did not spell out.
                    if (!File.ReadAllText(path).Contains('\uFFFD'))
                        Assert.DoesNotContain(ds.Records, r => (r.Text ?? "").Contains('\uFFFD') || (r.Messages ?? []).Any(m => m.Content.Contains('\uFFFD')));
                }
                catch (LoraMixException e)
                {
                    Assert.IsType<DatasetFileException>(e);
                    Assert.StartsWith(path, e.Message);
                    throw;
                }
            },
            iter: 1200);
        Assert.True(ok > 0 && refused > 0, $"ok {ok}, refused {refused}");
    }
}
