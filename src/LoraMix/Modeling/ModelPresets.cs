using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>Named architectures for random models: <c>tiny</c> for tests, <c>small</c> for benchmarks, and the shapes of real models.</summary>
public static class ModelPresets
{
    private static readonly Dictionary<string, LlamaConfig> Presets = new(StringComparer.Ordinal)
    {
        // ~0.39 M parameters, untied head: fast enough for every test.
        ["tiny"] = new LlamaConfig
        {
            ModelType = "llama", VocabSize = 512, HiddenSize = 96, IntermediateSize = 256, NumHiddenLayers = 3,
            NumAttentionHeads = 6, NumKeyValueHeads = 2, HeadDim = 16, RmsNormEps = 1e-5, RopeTheta = 10000,
            MaxPositionEmbeddings = 1024, TieWordEmbeddings = false, BosTokenId = 1, EosTokenIds = [2],
        },
        // ~110 M parameters (dim 768, 12 layers, tied 32k vocabulary).
        ["small"] = new LlamaConfig
        {
            ModelType = "llama", VocabSize = 32000, HiddenSize = 768, IntermediateSize = 2048, NumHiddenLayers = 12,
            NumAttentionHeads = 12, NumKeyValueHeads = 12, HeadDim = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
            MaxPositionEmbeddings = 2048, TieWordEmbeddings = true, BosTokenId = 1, EosTokenIds = [2],
        },
        ["llama-2-7b"] = new LlamaConfig
        {
            ModelType = "llama", VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32,
            NumAttentionHeads = 32, NumKeyValueHeads = 32, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000,
            MaxPositionEmbeddings = 4096, BosTokenId = 1, EosTokenIds = [2],
        },
        ["llama-3-8b"] = new LlamaConfig
        {
            ModelType = "llama", VocabSize = 128256, HiddenSize = 4096, IntermediateSize = 14336, NumHiddenLayers = 32,
            NumAttentionHeads = 32, NumKeyValueHeads = 8, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 500000,
            MaxPositionEmbeddings = 8192, BosTokenId = 128000, EosTokenIds = [128001],
        },
        ["llama-3.2-1b"] = new LlamaConfig
        {
            ModelType = "llama", VocabSize = 128256, HiddenSize = 2048, IntermediateSize = 8192, NumHiddenLayers = 16,
            NumAttentionHeads = 32, NumKeyValueHeads = 8, HeadDim = 64, RmsNormEps = 1e-5, RopeTheta = 500000,
            RopeScaling = new RopeScaling("llama3", 32, 1, 4, 8192), MaxPositionEmbeddings = 131072,
            TieWordEmbeddings = true, BosTokenId = 128000, EosTokenIds = [128001, 128008, 128009],
        },
        ["mistral-7b"] = new LlamaConfig
        {
            ModelType = "mistral", VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 14336, NumHiddenLayers = 32,
            NumAttentionHeads = 32, NumKeyValueHeads = 8, HeadDim = 128, RmsNormEps = 1e-5, RopeTheta = 10000,
            MaxPositionEmbeddings = 32768, SlidingWindow = 4096, BosTokenId = 1, EosTokenIds = [2],
        },
        ["qwen2-0.5b"] = new LlamaConfig
        {
            ModelType = "qwen2", VocabSize = 151936, HiddenSize = 896, IntermediateSize = 4864, NumHiddenLayers = 24,
            NumAttentionHeads = 14, NumKeyValueHeads = 2, HeadDim = 64, RmsNormEps = 1e-6, RopeTheta = 1000000,
            MaxPositionEmbeddings = 32768, TieWordEmbeddings = true, QkvBias = true, BosTokenId = 151643, EosTokenIds = [151643],
        },
    };

    /// <summary>The preset names.</summary>
    public static IReadOnlyCollection<string> Names => Presets.Keys;

    /// <summary>The configuration of a preset.</summary>
    public static LlamaConfig Get(string name) =>
        Presets.TryGetValue(name, out var c) ? c
            : throw new LoraMixException($"unknown preset '{name}'; available: {string.Join(", ", Presets.Keys)}");

    /// <summary>
    /// The state-dict layout (Hugging Face names and shapes, in module order) implied by a config, computed without
    /// building the model — so multi-GB presets can be written tensor by tensor.
    /// </summary>
    public static IReadOnlyList<(string Name, long[] Shape)> Layout(LlamaConfig c)
    {
        long h = c.HiddenSize, q = (long)c.NumAttentionHeads * c.HeadDim, kv = (long)c.NumKeyValueHeads * c.HeadDim;
        bool qkvBias = c.AttentionBias || c.QkvBias;
        var list = new List<(string, long[])> { ("model.embed_tokens.weight", [c.VocabSize, h]) };
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.";
            list.Add((p + "self_attn.q_proj.weight", [q, h]));
            if (qkvBias) list.Add((p + "self_attn.q_proj.bias", [q]));
            list.Add((p + "self_attn.k_proj.weight", [kv, h]));
            if (qkvBias) list.Add((p + "self_attn.k_proj.bias", [kv]));
            list.Add((p + "self_attn.v_proj.weight", [kv, h]));
            if (qkvBias) list.Add((p + "self_attn.v_proj.bias", [kv]));
            list.Add((p + "self_attn.o_proj.weight", [h, q]));
            if (c.AttentionBias) list.Add((p + "self_attn.o_proj.bias", [h]));
            list.Add((p + "mlp.gate_proj.weight", [c.IntermediateSize, h]));
            list.Add((p + "mlp.up_proj.weight", [c.IntermediateSize, h]));
            list.Add((p + "mlp.down_proj.weight", [h, c.IntermediateSize]));
            list.Add((p + "input_layernorm.weight", [h]));
            list.Add((p + "post_attention_layernorm.weight", [h]));
        }
        list.Add(("model.norm.weight", [h]));
        if (!c.TieWordEmbeddings) list.Add(("lm_head.weight", [c.VocabSize, h]));
        return list;
    }

    /// <summary>
    /// The random initial value of one tensor, a pure function of (seed, name, shape): normal(0, initializer_range)
    /// for matrices (as transformers initialises Llama), ones for norm weights, zeros for biases.
    /// </summary>
    public static Tensor RandomTensor(LlamaConfig c, string name, long[] shape, long seed, ScalarType dtype)
    {
        if (name.EndsWith("norm.weight", StringComparison.Ordinal)) return ones(shape, dtype: dtype);
        if (name.EndsWith(".bias", StringComparison.Ordinal)) return zeros(shape, dtype: dtype);
        ulong h = Fnv1a(name, seed);
        using var gen = new Generator(h, CPU);
        using var t = empty(shape, dtype: ScalarType.Float32);
        t.normal_(0, c.InitializerRange, gen);
        return t.to(dtype);
    }

    /// <summary>Fills every weight of <paramref name="model"/> with <see cref="RandomTensor"/> values.</summary>
    public static void InitializeRandom(LlamaForCausalLM model, long seed)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in model.state_dict())
        {
            using var scope = NewDisposeScope();
            p.copy_(RandomTensor(model.Config, name, p.shape, seed, ScalarType.Float32));
        }
    }

    /// <summary>Creates a random in-memory model from a preset.</summary>
    public static LlamaForCausalLM CreateRandom(string preset, long seed, Device? device = null, ScalarType dtype = ScalarType.Float32)
    {
        var model = new LlamaForCausalLM(Get(preset), device, dtype);
        InitializeRandom(model, seed);
        return model;
    }

    // FNV-1a over the name's UTF-16 code units, mixed with the seed: a stable per-tensor stream id.
    private static ulong Fnv1a(string text, long seed)
    {
        ulong h = 14695981039346656037UL ^ (ulong)seed;
        foreach (char ch in text)
        {
            h ^= ch;
            h *= 1099511628211UL;
        }
        return h;
    }
}
