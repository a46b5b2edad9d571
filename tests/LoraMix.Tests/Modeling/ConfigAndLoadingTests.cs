using System.Text.Json.Nodes;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Modeling;

public sealed class ConfigAndLoadingTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-cfg-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    // Abridged from the config.json files published with each model (all keys LoraMix reads are present).
    private const string Llama32 = """
        {"architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000,
         "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
         "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
         "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
         "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
         "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": true,
         "vocab_size": 128256}
        """;

    private const string Mistral = """
        {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
         "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
         "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
         "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000}
        """;

    private const string Qwen2 = """
        {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
         "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
         "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
         "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
         "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
         "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}
        """;

    private static LlamaConfig Parse(string json) => LlamaConfig.Parse(JsonNode.Parse(json)!.AsObject(), "config.json");

    [Fact]
    public void RealConfigsParse()
    {
        var l = Parse(Llama32);
        Assert.Equal(64, l.HeadDim);
        Assert.Equal(new RopeScaling("llama3", 32, 1, 4, 8192), l.RopeScaling);
        Assert.Equal([128001, 128008, 128009], l.EosTokenIds);
        Assert.True(l.TieWordEmbeddings);
        Assert.Equal(ModelPresets.Get("llama-3.2-1b").ParameterCount(), l.ParameterCount());

        var m = Parse(Mistral);
        Assert.Equal(4096, m.SlidingWindow);
        Assert.Equal(128, m.HeadDim);
        Assert.Equal([2], m.EosTokenIds);

        var q = Parse(Qwen2);
        Assert.True(q.QkvBias);
        Assert.Null(q.SlidingWindow);   // qwen2's sliding_window is inert unless use_sliding_window
        Assert.Equal(494_032_768, q.ParameterCount());   // Qwen2-0.5B's published parameter count
    }

    [Theory]
    [InlineData("model_type", "\"gemma\"", "supported: llama, mistral, qwen2")]
    [InlineData("hidden_act", "\"gelu\"", "supported: silu")]
    [InlineData("rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0}", "supported: default, linear, llama3")]
    [InlineData("quantization_config", "{\"bits\": 4}", "unknown key")]
    [InlineData("num_key_value_heads", "5", "expected a positive divisor of num_attention_heads")]
    [InlineData("hidden_size", "\"big\"", "expected an integer")]
    [InlineData("mlp_bias", "true", "supported: false")]
    public void UnsupportedOrInvalidConfigsAreRejectedWithTheKey(string key, string value, string expected)
    {
        var obj = JsonNode.Parse(Llama32)!.AsObject();
        obj[key] = JsonNode.Parse(value);
        var e = Assert.Throws<ModelConfigException>(() => LlamaConfig.Parse(obj, "config.json"));
        Assert.Equal(key, e.Key.Split('.')[0]);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void MissingRequiredKeyIsNamed()
    {
        var obj = JsonNode.Parse(Mistral)!.AsObject();
        obj.Remove("vocab_size");
        var e = Assert.Throws<ModelConfigException>(() => LlamaConfig.Parse(obj, "config.json"));
        Assert.Equal("vocab_size", e.Key);
    }

    [Fact]
    public void ConfigRoundTripsThroughJson()
    {
        foreach (var name in ModelPresets.Names)
        {
            var c = ModelPresets.Get(name);
            var back = LlamaConfig.Parse(c.ToJson(), name);
            Assert.Equal(c with { TorchDtype = back.TorchDtype, EosTokenIds = back.EosTokenIds }, back);
            Assert.Equal(c.EosTokenIds, back.EosTokenIds);
        }
    }

    [Fact]
    public void SaveThenLoadGivesIdenticalLogits()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Qwen2, seed: 9);
        model.SavePretrained(_dir);
        using var loaded = LlamaForCausalLM.FromPretrained(_dir);
        var ids = tensor(TestModels.RandomIds(7, TestModels.Qwen2.VocabSize, 2)).unsqueeze(0);
        Assert.True(model.Forward(ids).equal(loaded.Forward(ids)).all().item<bool>());
        using var bf16 = LlamaForCausalLM.FromPretrained(_dir, CPU, ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, bf16.Model.EmbedTokens.Weight.dtype);
    }

    [Fact]
    public void StrictLoadingListsMissingUnexpectedAndMisshapedKeys()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, seed: 1);
        var sd = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        sd.Remove("model.layers.1.mlp.up_proj.weight");
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = ones(8);
        sd["model.norm.weight"] = ones(95);
        Directory.CreateDirectory(_dir);
        TestModels.Llama.Save(Path.Combine(_dir, "config.json"));
        SafetensorsWriter.Write(Path.Combine(_dir, "model.safetensors"), sd);
        var e = Assert.Throws<StateDictMismatchException>(() => LlamaForCausalLM.FromPretrained(_dir));
        Assert.Equal(["model.layers.1.mlp.up_proj.weight"], e.Missing);
        Assert.Equal(["model.layers.0.self_attn.rotary_emb.inv_freq"], e.Unexpected);
        Assert.Single(e.Misshaped);
        Assert.Contains("model.norm.weight: checkpoint [95] vs model [96]", e.Message);
    }

    [Fact]
    public void ShardedCheckpointsLoad()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, seed: 2);
        var sd = model.state_dict();
        var layout = sd.Select(kv => new SafetensorsTensorSpec(kv.Key, SafetensorsDType.F32, kv.Value.shape)).ToList();
        Directory.CreateDirectory(_dir);
        TestModels.Llama.Save(Path.Combine(_dir, "config.json"));
        SafetensorsCheckpoint.WriteDirectory(_dir, layout, s => sd[s.Name], maxShardBytes: 300_000);
        Assert.True(File.Exists(Path.Combine(_dir, "model.safetensors.index.json")));
        Assert.True(Directory.GetFiles(_dir, "model-*-of-*.safetensors").Length >= 3);
        using var loaded = LlamaForCausalLM.FromPretrained(_dir);
        var ids = tensor(new long[] { 1, 5, 9 }).unsqueeze(0);
        Assert.True(model.Forward(ids).equal(loaded.Forward(ids)).all().item<bool>());
    }

    [Fact]
    public void RandomPresetLayoutStreamsWithoutBuildingTheModel()
    {
        // The layout of an 8B preset is computed, not materialised: 291 tensors, 8.03 B parameters.
        var cfg = ModelPresets.Get("llama-3-8b");
        var layout = ModelPresets.Layout(cfg);
        Assert.Equal(2 + 9 * 32 + 1, layout.Count);
        Assert.Equal(cfg.ParameterCount(), layout.Sum(e => e.Shape.Aggregate(1L, (a, b) => a * b)));
        Assert.InRange(cfg.ParameterCount(), 8_000_000_000, 8_100_000_000);
        // The same (seed, name) gives the same tensor, different names differ.
        using var a = ModelPresets.RandomTensor(cfg, "model.layers.0.mlp.up_proj.weight", [4, 4], 1, ScalarType.Float32);
        using var b = ModelPresets.RandomTensor(cfg, "model.layers.0.mlp.up_proj.weight", [4, 4], 1, ScalarType.Float32);
        using var c = ModelPresets.RandomTensor(cfg, "model.layers.1.mlp.up_proj.weight", [4, 4], 1, ScalarType.Float32);
        Assert.True(a.equal(b).all().item<bool>());
        Assert.False(a.equal(c).all().item<bool>());
    }
}
