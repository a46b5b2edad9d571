using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using CsCheck;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Checkpoints;

/// <summary>
/// Fuzz tests of the JSON loaders of model, tokenizer and adapter directories: random mutations of valid files (numbers
/// replaced by huge, negative or non-numbers; keys deleted, duplicated or renamed; truncation; random bytes; deep
/// nesting) either load or raise a <see cref="LoraMixException"/> — never another exception type — each within a bounded
/// time.
/// </summary>
public sealed class ConfigFilesFuzzTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Per case: far above what a load takes (milliseconds), far below a hang or a multi-GB allocation.</summary>
    private static readonly TimeSpan CaseBound = TimeSpan.FromSeconds(3);

    // ---------------------------------------------------------------- mutations

    /// <summary>One way of damaging a JSON file; <see cref="Apply"/> is deterministic.</summary>
    public abstract record Mutation
    {
        public abstract string Apply(string json);

        /// <summary>Every value location (object member or array element) in document order.</summary>
        protected static List<(JsonNode Parent, string? Key, int Index)> Locations(JsonNode root)
        {
            var list = new List<(JsonNode, string?, int)>();
            void Walk(JsonNode? n)
            {
                switch (n)
                {
                    case JsonObject o:
                        foreach (var (k, v) in o.ToList())
                        {
                            list.Add((o, k, -1));
                            Walk(v);
                        }
                        break;
                    case JsonArray a:
                        for (int i = 0; i < a.Count; i++)
                        {
                            list.Add((a, null, i));
                            Walk(a[i]);
                        }
                        break;
                }
            }
            Walk(root);
            return list;
        }

        protected const string Placeholder = "\u0001RAW\u0001";

        /// <summary>Replaces the value at location <paramref name="which"/> by raw JSON text (possibly invalid).</summary>
        protected static string WithRaw(string json, int which, string raw)
        {
            var root = JsonNode.Parse(json)!;
            var locations = Locations(root);
            if (locations.Count == 0) return json;
            var (parent, key, index) = locations[which % locations.Count];
            if (parent is JsonObject o) o[key!] = Placeholder;
            else ((JsonArray)parent)[index] = Placeholder;
            return root.ToJsonString().Replace(JsonSerializer.Serialize(Placeholder), raw, StringComparison.Ordinal);
        }
    }

    public sealed record ReplaceValue(int Which, string Raw) : Mutation
    {
        public override string Apply(string json) => WithRaw(json, Which, Raw);
    }

    public sealed record DeleteKey(int Which) : Mutation
    {
        public override string Apply(string json)
        {
            var root = JsonNode.Parse(json)!;
            var keys = Locations(root).Where(l => l.Key is not null).ToList();
            if (keys.Count == 0) return json;
            var (parent, key, _) = keys[Which % keys.Count];
            ((JsonObject)parent).Remove(key!);
            return root.ToJsonString();
        }
    }

    public sealed record RenameKey(int Which, string NewName) : Mutation
    {
        public override string Apply(string json)
        {
            var root = JsonNode.Parse(json)!;
            var keys = Locations(root).Where(l => l.Key is not null).ToList();
            if (keys.Count == 0) return json;
            var (parent, key, _) = keys[Which % keys.Count];
            var o = (JsonObject)parent;
            var value = o[key!];
            o.Remove(key!);
            if (!o.ContainsKey(NewName)) o[NewName] = value?.DeepClone();
            return root.ToJsonString();
        }
    }

    /// <summary>Repeats a key of some object, with its value or another one (duplicate keys).</summary>
    public sealed record DuplicateKey(int Which, string? OtherRaw) : Mutation
    {
        public override string Apply(string json)
        {
            var root = JsonNode.Parse(json)!;
            var keys = Locations(root).Where(l => l.Key is not null).ToList();
            if (keys.Count == 0) return json;
            var (parent, key, _) = keys[Which % keys.Count];
            var o = (JsonObject)parent;
            const string marker = "\u0002DUP\u0002";
            o[marker] = OtherRaw is null ? o[key!]?.DeepClone() : Placeholder;
            return root.ToJsonString()
                .Replace(JsonSerializer.Serialize(marker), JsonSerializer.Serialize(key), StringComparison.Ordinal)
                .Replace(JsonSerializer.Serialize(Placeholder), OtherRaw ?? "", StringComparison.Ordinal);
        }
    }

    public sealed record Truncate(int Length) : Mutation
    {
        public override string Apply(string json) => json[..(Length % Math.Max(1, json.Length))];
    }

    public sealed record FlipBytes(int[] Positions, byte[] Values) : Mutation
    {
        public override string Apply(string json)
        {
            var bytes = Encoding.UTF8.GetBytes(json);
            for (int i = 0; i < Positions.Length; i++)
                bytes[Positions[i] % bytes.Length] = Values[i % Values.Length];
            return Encoding.UTF8.GetString(bytes);   // invalid UTF-8 becomes U+FFFD; RawBytes covers raw bytes
        }
    }

    /// <summary>Wraps a value in many arrays or objects (deep nesting, beyond the 64-level limit too).</summary>
    public sealed record Nest(int Which, int Depth, bool Objects) : Mutation
    {
        public override string Apply(string json)
        {
            var sb = new StringBuilder();
            for (int i = 0; i < Depth; i++) sb.Append(Objects ? "{\"k\":" : "[");
            sb.Append('1');
            for (int i = 0; i < Depth; i++) sb.Append(Objects ? '}' : ']');
            return WithRaw(json, Which, sb.ToString());
        }
    }

    public sealed record Both(Mutation First, Mutation Second) : Mutation
    {
        public override string Apply(string json)
        {
            string once = First.Apply(json);
            try
            {
                return Second.Apply(once);
            }
            catch (Exception e) when (e is JsonException or ArgumentException or InvalidOperationException)
            {
                return once;   // the second mutation needs JSON that JsonNode can walk (no duplicate keys, valid strings)
            }
        }
    }

    private static readonly string[] Raws =
    [
        "1e400", "-1e400", "1e-400", "-1", "0", "1", "2", "0.5", "-0.5", "1000000000", "100000000", "2147483647", "2147483648",
        "4294967296", "9223372036854775807", "9223372036854775808", "-9223372036854775809", "1e18", "65536", "65537", "1025",
        "4194304", "4194305", "\"x\"", "\"\"", "\"1\"", "\"\\ud800\"", "\"all-linear\"", "\"(a+)+$\"", "\"[\"", "null", "true",
        "false", "[]", "{}", "[1, 2]", "[\"q_proj\", null]", "{\"rope_type\": \"llama3\"}", "NaN", "Infinity", "-", "01", "1.",
    ];

    private static readonly Gen<string> GenRaw = Gen.OneOf(Gen.Int[0, Raws.Length - 1].Select(i => Raws[i]),
        Gen.Long.Select(l => l.ToString(System.Globalization.CultureInfo.InvariantCulture)),
        Gen.Double.Select(d => double.IsFinite(d) ? d.ToString("R", System.Globalization.CultureInfo.InvariantCulture) : "1e400"));

    private static readonly Gen<string> GenKey = Gen.OneOf(
        Gen.Int[0, 8].Select(i => new[] { "r", "num_experts", "vocab_size", "id", "content", "type", "x", "", "\u00e9" }[i]),
        Gen.String[Gen.Char['a', 'z'], 1, 6]);

    private static readonly Gen<Mutation> GenSingle = Gen.Frequency<Mutation>(
        (6, Gen.Select(Gen.Int[0, 100_000], GenRaw).Select((w, r) => (Mutation)new ReplaceValue(w, r))),
        (2, Gen.Int[0, 100_000].Select(w => (Mutation)new DeleteKey(w))),
        (2, Gen.Select(Gen.Int[0, 100_000], GenKey).Select((w, k) => (Mutation)new RenameKey(w, k))),
        (2, Gen.Select(Gen.Int[0, 100_000], Gen.Bool, GenRaw).Select((w, same, r) => (Mutation)new DuplicateKey(w, same ? null : r))),
        (1, Gen.Int[0, 1_000_000].Select(n => (Mutation)new Truncate(n))),
        (1, Gen.Select(Gen.Int[0, 1_000_000].Array[1, 4], Gen.Byte.Array[1, 4]).Select((p, v) => (Mutation)new FlipBytes(p, v))),
        (1, Gen.Select(Gen.Int[0, 100_000], Gen.Int[1, 200], Gen.Bool).Select((w, d, o) => (Mutation)new Nest(w, d, o))));

    private static readonly Gen<Mutation> GenMutation = Gen.Frequency<Mutation>(
        (4, GenSingle),
        (1, Gen.Select(GenSingle, GenSingle).Select((a, b) => (Mutation)new Both(a, b))));

    // ---------------------------------------------------------------- harness

    /// <summary>Applies mutations to <paramref name="valid"/>, writes the result to <paramref name="path"/> and runs
    /// <paramref name="load"/>: it must return or throw a LoraMixException, within <see cref="CaseBound"/>. Also runs the
    /// loader on raw random bytes. Returns (loaded, rejected).</summary>
    private static (int Loaded, int Rejected) Fuzz(string path, string valid, Action load, int iterations)
    {
        File.WriteAllText(path, valid);
        load();   // the base file is valid
        int loaded = 0, rejected = 0;
        void Case(byte[] bytes, object description)
        {
            File.WriteAllBytes(path, bytes);
            var clock = Stopwatch.StartNew();
            try
            {
                load();
                loaded++;
            }
            catch (LoraMixException)
            {
                rejected++;
            }
            catch (Exception e)
            {
                Assert.Fail($"{description}: {e.GetType().Name} escaped (not a LoraMixException): {e.Message}\n{e.StackTrace}");
            }
            Assert.True(clock.Elapsed < CaseBound, $"{description}: took {clock.Elapsed.TotalSeconds:0.00} s");
        }
        GenMutation.Sample(m => Case(Encoding.UTF8.GetBytes(m.Apply(valid)), m), iter: iterations, threads: 1);
        Gen.Byte.Array[0, 300].Sample(bytes => Case(bytes, $"random bytes {Convert.ToHexString(bytes)}"), iter: iterations / 10, threads: 1);
        return (loaded, rejected);
    }

    private static void AssertNotDegenerate((int Loaded, int Rejected) r, string what) =>
        Assert.True(r.Loaded > 0 && r.Rejected > 0, $"{what}: loaded {r.Loaded}, rejected {r.Rejected}");

    // ---------------------------------------------------------------- the loaders

    [Fact]
    public void ConfigJson_MutationsLoadOrThrowLoraMixException()
    {
        var cfg = ModelPresets.Get("llama-3.2-1b") with { VocabSize = 512, BosTokenId = 1, EosTokenIds = [2, 3] };
        string valid = cfg.ToJson().ToJsonString();
        string path = _dir.File("config.json");
        AssertNotDegenerate(Fuzz(path, valid, () => LlamaConfig.Load(path), 600), "config.json");
    }

    [Fact]
    public void LoraAdapterConfig_MutationsLoadOrThrowLoraMixException()
    {
        string valid = new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ["q_proj", "v_proj"] }.ToPeftJson();
        string dir = _dir.File("lora");
        Directory.CreateDirectory(dir);
        string path = Path.Combine(dir, "adapter_config.json");
        AssertNotDegenerate(Fuzz(path, valid, () =>
        {
            var c = LoraConfig.Load(path);
            AdapterDirectory.Detect(dir);
            foreach (var m in new[] { "model.layers.0.self_attn.q_proj", "model.layers.12.mlp.down_proj", "lm_head" }) c.Targets(m);
        }, 500), "LoRA adapter_config.json");
    }

    [Fact]
    public void MixLoraAdapterConfig_MutationsLoadOrThrowLoraMixException()
    {
        string dir = _dir.File("mixlora");
        Directory.CreateDirectory(dir);
        string path = Path.Combine(dir, "adapter_config.json");
        var basis = new MixLoraConfig
        {
            R = 8, LoraAlpha = 16, NumExperts = 8, TopK = 2,
            ExpertLora = new ExpertLoraConfig { R = 4, LoraAlpha = 8 }, RouterPolicy = MixLoraConfig.PrivilegedPolicy,
        };
        var total = (Loaded: 0, Rejected: 0);
        foreach (var config in new[] { basis, basis with { RoutingStrategy = MixLoraConfig.TopPStrategy }, basis with { RoutingStrategy = MixLoraConfig.SwitchStrategy } })
        {
            var r = Fuzz(path, config.ToJson(), () =>
            {
                MixLoraConfig.Load(path);
                AdapterDirectory.Detect(dir);
            }, 200);
            total = (total.Loaded + r.Loaded, total.Rejected + r.Rejected);
        }
        AssertNotDegenerate(total, "MixLoRA adapter_config.json");
    }

    private string TokenizerDir()
    {
        string dir = _dir.File("tokenizer");
        ByteLevelTokenizerFiles.Write(dir, [("\u0120", "t"), ("h", "e"), ("\u0120t", "he")]);
        return dir;
    }

    [Fact]
    public void TokenizerJson_MutationsLoadOrThrowLoraMixException()
    {
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer.json");
        string valid = JsonNode.Parse(File.ReadAllText(path))!.ToJsonString();
        AssertNotDegenerate(Fuzz(path, valid, () =>
        {
            var t = TextTokenizer.FromDirectory(dir);
            t.Decode(t.Encode("the <|im_start|> thé"));
        }, 400), "tokenizer.json");
    }

    [Fact]
    public void TokenizerConfigJson_MutationsLoadOrThrowLoraMixException()
    {
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer_config.json");
        string valid = JsonNode.Parse(File.ReadAllText(path))!.ToJsonString();
        AssertNotDegenerate(Fuzz(path, valid, () =>
        {
            var t = TextTokenizer.FromDirectory(dir);
            t.Decode(t.Encode("the <|im_end|>"));
        }, 400), "tokenizer_config.json");
    }

    // ---------------------------------------------------------------- targeted cases from the issue

    [Theory]
    [InlineData(1_000_000_000L)]
    [InlineData(2_147_483_647L)]
    [InlineData(4_194_304L)]
    [InlineData(262L)]          // the file defines 259 byte/merge tokens + 3 added: 262 ids
    public void AddedTokenIdBeyondTheVocabulary_IsRefusedBeforeSizingTables(long id)
    {
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer.json");
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        o["added_tokens"]![1]!["id"] = id;
        File.WriteAllText(path, o.ToJsonString());
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(dir));
        Assert.Equal(path, e.FilePath);
        Assert.Equal("added_tokens[1].id", e.Key);
    }

    [Fact]
    public void AddedTokensDecoderIdBeyondTheVocabulary_IsRefused()
    {
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer_config.json");
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        o["added_tokens_decoder"]!.AsObject()["1000000000"] = new JsonObject { ["content"] = "<big>", ["special"] = true };
        File.WriteAllText(path, o.ToJsonString());
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(dir));
        Assert.Equal(("added_tokens_decoder.1000000000", path), (e.Key, e.FilePath));
    }

    [Theory]
    [InlineData("")]
    [InlineData("a")]
    [InlineData(" ")]
    [InlineData("ab")]
    public void AMergeStringWithoutALeftRightSplit_IsRefused(string merge)
    {
        // found by the mutation fuzzer (an empty merge string once escaped as ArgumentOutOfRangeException)
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer.json");
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        o["model"]!["merges"]!.AsArray().Add(merge);
        File.WriteAllText(path, o.ToJsonString());
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(dir));
        Assert.Equal("model.merges", e.Key);
    }

    [Fact]
    public void VocabIdBeyondTheVocabulary_IsRefused()
    {
        string dir = TokenizerDir();
        string path = Path.Combine(dir, "tokenizer.json");
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        o["model"]!["vocab"]!["zz"] = 1_000_000_000;
        File.WriteAllText(path, o.ToJsonString());
        var e = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(dir));
        Assert.Equal("model.vocab", e.Key);
        Assert.Contains("'zz'", e.Message);
    }
}
