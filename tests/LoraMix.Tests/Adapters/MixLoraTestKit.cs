using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

/// <summary>Shared setup of the MixLoRA tests: random tiny models with a MixLoRA whose every tensor is non-trivial.</summary>
internal static class MixLoraTestKit
{
    public static MixLoraConfig Config(string strategy = MixLoraConfig.TopKStrategy, int experts = 4, int topK = 2) => new()
    {
        R = 4, LoraAlpha = 8, LoraDropout = 0.05, NumExperts = experts, TopK = topK, RoutingStrategy = strategy,
        TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
    };

    /// <summary>Gives every B a random value and the routers a wide N(0, σ) so that routing is far from ties.</summary>
    public static void Randomize(LlamaForCausalLM model, string adapter, int seed, double routerStd = 0.5)
    {
        using var gen = new TorchSharp.torch.Generator((ulong)seed, CPU);
        using var noGrad = no_grad();
        foreach (var (key, t) in MixLoraAdapters.StateDict(model, adapter))
        {
            // drawn in fp32 and copied, so fp32 and fp64 models get the same values
            if (key.EndsWith("moe_gate.weight", StringComparison.Ordinal)) t.copy_(empty(t.shape).normal_(0, routerStd, gen));
            else if (key.EndsWith("lora_B.weight", StringComparison.Ordinal)) t.copy_(empty(t.shape).normal_(0, 0.1, gen));
        }
    }

    public static LlamaForCausalLM Model(MixLoraConfig config, long seed, ScalarType dtype = ScalarType.Float32, string adapter = "default")
    {
        var model = TestModels.Random(TestModels.Llama, seed, dtype);
        MixLoraAdapters.Attach(model, config, adapter, seed);
        Randomize(model, adapter, (int)seed + 100);
        return model;
    }

    /// <summary>A forward context for calling a feed-forward block directly (it reads no rotary table) whose every row
    /// runs <paramref name="adapter"/>.</summary>
    public static ForwardContext Context(LoraMix.Routing.RoutingContext? routing = null, Tensor? tokenMask = null, string adapter = "default") => new()
    {
        Cos = empty(0), Sin = empty(0), Routing = routing, TokenMask = tokenMask,
        Adapters = AdapterBatch.Resolve(AdapterSelection.Of(adapter), 1, CPU),   // one choice for all rows: any batch size runs it whole
    };

    /// <summary>Every row runs adapter <c>default</c>.</summary>
    public static readonly AdapterSelection Default = AdapterSelection.Of("default");
}
