using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Modeling;

internal static class TestModels
{
    public static LlamaConfig Llama => ModelPresets.Get("tiny");

    public static LlamaConfig Llama3Scaled => new()
    {
        ModelType = "llama", VocabSize = 300, HiddenSize = 64, IntermediateSize = 128, NumHiddenLayers = 2,
        NumAttentionHeads = 4, NumKeyValueHeads = 1, HeadDim = 16, RmsNormEps = 1e-5, RopeTheta = 500000,
        RopeScaling = new RopeScaling("llama3", 8, 1, 4, 16), MaxPositionEmbeddings = 256, TieWordEmbeddings = true,
        AttentionBias = true, BosTokenId = 1, EosTokenIds = [2],
    };

    public static LlamaConfig LinearScaled => Llama3Scaled with { RopeScaling = new RopeScaling("linear", 4), AttentionBias = false, NumKeyValueHeads = 2 };

    public static LlamaConfig Mistral => new()
    {
        ModelType = "mistral", VocabSize = 256, HiddenSize = 48, IntermediateSize = 96, NumHiddenLayers = 2,
        NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 12, RmsNormEps = 1e-5, RopeTheta = 10000,
        MaxPositionEmbeddings = 256, SlidingWindow = 5, BosTokenId = 1, EosTokenIds = [2],
    };

    public static LlamaConfig Qwen2 => new()
    {
        ModelType = "qwen2", VocabSize = 320, HiddenSize = 56, IntermediateSize = 112, NumHiddenLayers = 2,
        NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 20, RmsNormEps = 1e-6, RopeTheta = 1000000,
        MaxPositionEmbeddings = 256, TieWordEmbeddings = true, QkvBias = true, BosTokenId = 1, EosTokenIds = [2],
    };

    public static IEnumerable<object[]> Families() =>
    [
        ["llama"], ["llama3-scaled"], ["linear-scaled"], ["mistral"], ["qwen2"],
    ];

    public static LlamaConfig ByName(string name) => name switch
    {
        "llama" => Llama,
        "llama3-scaled" => Llama3Scaled,
        "linear-scaled" => LinearScaled,
        "mistral" => Mistral,
        "qwen2" => Qwen2,
        _ => throw new ArgumentException(name),
    };

    /// <summary>A model whose every parameter (norms and biases included) is random, so each term is exercised.</summary>
    public static LlamaForCausalLM Random(LlamaConfig c, long seed, ScalarType dtype = ScalarType.Float32)
    {
        var model = new LlamaForCausalLM(c, CPU, dtype);
        using var gen = new TorchSharp.torch.Generator((ulong)seed, CPU);
        using var noGrad = no_grad();
        foreach (var (name, p) in model.state_dict())
        {
            using var scope = NewDisposeScope();
            var r = empty(p.shape, dtype: ScalarType.Float32).normal_(0, 1, gen);
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) p.copy_(1 + 0.1 * r);
            else p.copy_(0.08 * r);
        }
        return model;
    }

    public static long[] RandomIds(int count, int vocab, int seed)
    {
        var rnd = new System.Random(seed);
        return Enumerable.Range(0, count).Select(_ => (long)rnd.Next(vocab)).ToArray();
    }

    /// <summary>Max |a - b| relative to max |b| (magnitude-scaled comparison).</summary>
    public static double RelativeError(Tensor actual, Tensor expected)
    {
        var a = actual.to(ScalarType.Float64);
        var e = expected.to(ScalarType.Float64);
        double scale = Math.Max(e.abs().max().item<double>(), 1e-12);
        return (a - e).abs().max().item<double>() / scale;
    }
}
