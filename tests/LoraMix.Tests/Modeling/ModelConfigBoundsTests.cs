using System.Text.Json.Nodes;
using LoraMix.Modeling;

namespace LoraMix.Tests.Modeling;

/// <summary>
/// config.json sizes are bounded, and compared with the checkpoint header before any model is built: a config that does
/// not describe the weights is a <see cref="ModelConfigException"/> naming the key, never an allocator crash.
/// </summary>
public sealed class ModelConfigBoundsTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-bounds-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static JsonObject TinyJson() => ModelPresets.Get("tiny").ToJson();

    private static LlamaConfig Parse(JsonObject o) => LlamaConfig.Parse(o, "config.json");

    [Fact]
    public void EveryPreset_IsWithinTheBounds()
    {
        foreach (var name in ModelPresets.Names)
        {
            var c = ModelPresets.Get(name);
            c.Validate(name);
            var parsed = Parse(c.ToJson());
            Assert.Equal((c.VocabSize, c.HiddenSize, c.IntermediateSize, c.NumHiddenLayers, c.NumAttentionHeads, c.HeadDim, c.MaxPositionEmbeddings),
                (parsed.VocabSize, parsed.HiddenSize, parsed.IntermediateSize, parsed.NumHiddenLayers, parsed.NumAttentionHeads, parsed.HeadDim, parsed.MaxPositionEmbeddings));
        }
    }

    [Theory]
    [InlineData("vocab_size", 1_000_000_000L)]
    [InlineData("vocab_size", 4_194_305L)]
    [InlineData("hidden_size", 1_000_000_000L)]
    [InlineData("hidden_size", 65_537L)]
    [InlineData("intermediate_size", 1_000_000_000L)]
    [InlineData("intermediate_size", 262_145L)]
    [InlineData("num_hidden_layers", 1_000_000L)]
    [InlineData("num_hidden_layers", 1_025L)]
    [InlineData("num_attention_heads", 2_048L)]
    [InlineData("num_attention_heads", 0L)]
    [InlineData("num_key_value_heads", 12L)]          // more than num_attention_heads (6)
    [InlineData("head_dim", 2_048L)]
    [InlineData("head_dim", 0L)]
    [InlineData("max_position_embeddings", 1_000_000_000L)]
    [InlineData("max_position_embeddings", 0L)]
    [InlineData("vocab_size", 2_147_483_647L)]
    [InlineData("hidden_size", -96L)]
    public void SizesOutOfBounds_AreRefusedNamingTheKey(string key, long value)
    {
        var o = TinyJson();
        o[key] = value;
        var e = Assert.Throws<ModelConfigException>(() => Parse(o));
        Assert.Equal(key, e.Key);
        Assert.Contains(value.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
        Assert.Contains("expected", e.Message);
    }

    [Theory]
    [InlineData("vocab_size", "1e300")]
    [InlineData("hidden_size", "9223372036854775808")]
    [InlineData("num_hidden_layers", "\"3\"")]
    [InlineData("rope_theta", "1e400")]
    [InlineData("rms_norm_eps", "-1")]
    [InlineData("initializer_range", "1e999")]
    public void NumbersThatOverflowOrAreNotNumbers_AreRefused(string key, string raw)
    {
        string json = TinyJson().ToJsonString();
        var o = JsonNode.Parse(json)!.AsObject();
        o.Remove(key);
        string text = o.ToJsonString().TrimEnd('}') + $", \"{key}\": {raw}}}";
        var e = Assert.Throws<ModelConfigException>(() => Parse(JsonNode.Parse(text)!.AsObject()));
        Assert.Equal(key, e.Key);
    }

    [Fact]
    public void ProductsAreBounded_AndRopeScalingIsChecked()
    {
        var o = TinyJson();
        o["num_attention_heads"] = 1024;
        o["num_key_value_heads"] = 1024;
        o["head_dim"] = 512;   // 1024 × 512 > 2^18
        Assert.Equal("num_attention_heads", Assert.Throws<ModelConfigException>(() => Parse(o)).Key);

        var r = TinyJson();
        r["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3", ["factor"] = 8, ["low_freq_factor"] = 1, ["high_freq_factor"] = 4,
            ["original_max_position_embeddings"] = 0,
        };
        Assert.Equal("rope_scaling.original_max_position_embeddings", Assert.Throws<ModelConfigException>(() => Parse(r)).Key);
        r["rope_scaling"]!["original_max_position_embeddings"] = 8192;
        r["rope_scaling"]!["low_freq_factor"] = -1;
        Assert.ThrowsAny<ModelConfigException>(() => Parse(r));
    }

    [Fact]
    public void ConfigConstructedInCode_IsBoundedToo()
    {
        var huge = ModelPresets.Get("tiny") with { HiddenSize = 1_000_000_000 };
        Assert.Equal("hidden_size", Assert.Throws<ModelConfigException>(() => new LlamaForCausalLM(huge)).Key);
    }

    private string WriteTinyModel()
    {
        string dir = Path.Combine(_dir, "model");
        if (Directory.Exists(dir)) return dir;
        using var model = TestModels.Random(TestModels.Llama, 3);
        model.SavePretrained(dir);
        return dir;
    }

    private string WithConfig(string modelDir, Action<JsonObject> edit)
    {
        string dir = Path.Combine(_dir, Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(modelDir)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        var o = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        edit(o);
        File.WriteAllText(Path.Combine(dir, "config.json"), o.ToJsonString());
        return dir;
    }

    /// <summary>Config values within the bounds but not those of the weights: refused from the header, before the model
    /// is built (were it built first, the error would be the strict loader's StateDictMismatchException).</summary>
    [Theory]
    [InlineData("vocab_size", 4_000_000, "vocab_size", "expected 512")]
    [InlineData("vocab_size", 513, "vocab_size", "expected 512")]
    [InlineData("hidden_size", 192, "hidden_size", "expected 96")]
    [InlineData("intermediate_size", 262_144, "intermediate_size", "expected 256")]
    [InlineData("num_hidden_layers", 1000, "num_hidden_layers", "expected 3")]
    [InlineData("num_hidden_layers", 2, "num_hidden_layers", "expected 3")]
    [InlineData("num_attention_heads", 12, "num_attention_heads", "expected num_attention_heads × head_dim = 96")]
    [InlineData("num_key_value_heads", 3, "num_key_value_heads", "expected num_key_value_heads × head_dim = 32")]
    public void FromPretrained_ConfigThatDisagreesWithTheCheckpoint_IsRefusedBeforeBuilding(string key, int value, string errorKey, string fragment)
    {
        string dir = WithConfig(WriteTinyModel(), o => o[key] = value);
        var e = Assert.Throws<ModelConfigException>(() => LlamaForCausalLM.FromPretrained(dir));
        Assert.Equal(errorKey, e.Key);
        Assert.Equal(Path.Combine(dir, "config.json"), e.FilePath);
        Assert.Contains(fragment, e.Message);
        Assert.Contains("model.safetensors", e.Message);
    }

    [Fact]
    public void FromPretrained_MatchingConfig_Loads_AndLayoutMismatchIsListedBeforeBuilding()
    {
        string ok = WriteTinyModel();
        using (var model = LlamaForCausalLM.FromPretrained(ok)) Assert.Equal(3, model.Config.NumHiddenLayers);

        // attention_bias adds tensors the checkpoint lacks: every missing name is listed (no model was built).
        string bias = WithConfig(ok, o => o["attention_bias"] = true);
        var e = Assert.Throws<StateDictMismatchException>(() => LlamaForCausalLM.FromPretrained(bias));
        Assert.Equal(3 * 4, e.Missing.Count);
        Assert.Contains("model.layers.0.self_attn.q_proj.bias", e.Missing);
    }
}
