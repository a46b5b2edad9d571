using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Modeling;

public sealed class ForwardEquivalenceTests
{
    // fp32 against a float64 reference through a few layers: error scales with fp32 epsilon (1.2e-7) times depth and width.
    private const double Fp32Tolerance = 2e-5;

    [Theory]
    [MemberData(nameof(TestModels.Families), MemberType = typeof(TestModels))]
    public void ForwardMatchesNaiveReference(string family)
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.ByName(family);
        using var model = TestModels.Random(cfg, seed: 11);
        var ids = TestModels.RandomIds(13, cfg.VocabSize, seed: 3);
        var logits = model.Forward(tensor(ids).unsqueeze(0))[0];
        var expected = NaiveLlama.Forward(cfg, model.state_dict(), ids);
        Assert.Equal([13L, cfg.VocabSize], logits.shape);
        double err = TestModels.RelativeError(logits, expected);
        Assert.True(err < Fp32Tolerance, $"{family}: relative error {err:E3} >= {Fp32Tolerance:E1}");
    }

    [Fact]
    public void NaiveReferenceDetectsAWrongWeight()
    {
        // The comparison must be able to fail: perturb one weight and the reference disagrees.
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama;
        using var model = TestModels.Random(cfg, seed: 5);
        var ids = TestModels.RandomIds(6, cfg.VocabSize, seed: 1);
        var sd = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"] * 1.01;
        double err = TestModels.RelativeError(model.Forward(tensor(ids).unsqueeze(0))[0], NaiveLlama.Forward(cfg, sd, ids));
        Assert.True(err > 1e-4, $"perturbation not detected: {err:E3}");
    }

    [Theory]
    [MemberData(nameof(TestModels.Families), MemberType = typeof(TestModels))]
    public void CachedDecodingEqualsFullForward(string family)
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.ByName(family);
        using var model = TestModels.Random(cfg, seed: 7);
        var ids = TestModels.RandomIds(12, cfg.VocabSize, seed: 9);
        var full = model.Forward(tensor(ids).unsqueeze(0));

        using var cache = model.CreateCache(1, 16);
        var parts = new List<Tensor>
        {
            model.Forward(tensor(ids[..4]).unsqueeze(0), cache),     // prefill
            model.Forward(tensor(ids[4..7]).unsqueeze(0), cache),    // a chunk on top of the cache
        };
        for (int i = 7; i < ids.Length; i++) parts.Add(model.Forward(tensor(new[] { ids[i] }).unsqueeze(0), cache));
        var incremental = cat(parts, 1);
        Assert.Equal(12, cache.Length);
        double err = TestModels.RelativeError(incremental, full);
        Assert.True(err < 1e-5, $"{family}: cached vs full relative error {err:E3}");
    }

    [Theory]
    [MemberData(nameof(TestModels.Families), MemberType = typeof(TestModels))]
    public void LeftPaddedBatchEqualsOneByOne(string family)
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.ByName(family);
        using var model = TestModels.Random(cfg, seed: 21);
        long[][] prompts = [TestModels.RandomIds(9, cfg.VocabSize, 1), TestModels.RandomIds(4, cfg.VocabSize, 2), TestModels.RandomIds(7, cfg.VocabSize, 3)];
        int max = prompts.Max(p => p.Length);
        var ids = zeros(prompts.Length, max, dtype: ScalarType.Int64);
        var mask = zeros(prompts.Length, max, dtype: ScalarType.Int64);
        for (int b = 0; b < prompts.Length; b++)
        {
            int pad = max - prompts[b].Length;
            ids[b].narrow(0, pad, prompts[b].Length).copy_(tensor(prompts[b]));
            mask[b].narrow(0, pad, prompts[b].Length).fill_(1);
        }
        using var cache = model.CreateCache(prompts.Length, max + 3);
        var batched = model.Forward(ids, cache, mask);
        var nextTokens = new long[] { 5, 6, 7 };
        var step1 = model.Forward(tensor(nextTokens).unsqueeze(1), cache);
        var step2 = model.Forward(tensor(nextTokens).unsqueeze(1), cache);

        for (int b = 0; b < prompts.Length; b++)
        {
            int pad = max - prompts[b].Length;
            var seq = prompts[b].Concat([nextTokens[b], nextTokens[b]]).ToArray();
            var single = model.Forward(tensor(seq).unsqueeze(0))[0];
            var got = cat([batched[b].narrow(0, pad, prompts[b].Length), step1[b], step2[b]], 0);
            double err = TestModels.RelativeError(got, single);
            Assert.True(err < 1e-5, $"{family}: row {b} batched vs single relative error {err:E3}");
        }
    }

    [Fact]
    public void Bf16ForwardTracksFp32()
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama;
        using var model32 = TestModels.Random(cfg, seed: 4);
        using var model16 = new LlamaForCausalLM(cfg, CPU, ScalarType.BFloat16);
        using (no_grad())
            foreach (var (name, p) in model16.state_dict()) p.copy_(model32.state_dict()[name]);
        var ids = tensor(TestModels.RandomIds(10, cfg.VocabSize, 8)).unsqueeze(0);
        var a = model32.Forward(ids);
        var b = model16.Forward(ids);
        Assert.Equal(ScalarType.BFloat16, b.dtype);
        // bf16 keeps 8 mantissa bits (eps 7.8e-3); through 3 layers the logits stay within a few eps of fp32.
        double err = TestModels.RelativeError(b, a);
        Assert.True(err < 0.05, $"bf16 vs fp32 relative error {err:E3}");
    }

    [Fact]
    public void StateDictKeysEqualHuggingFaceLayout()
    {
        foreach (var cfg in new[] { TestModels.Llama, TestModels.Llama3Scaled, TestModels.Qwen2, TestModels.Mistral })
        {
            using var model = new LlamaForCausalLM(cfg);
            var actual = model.state_dict().Select(kv => (kv.Key, string.Join("x", kv.Value.shape))).OrderBy(x => x.Key).ToList();
            var expected = ModelPresets.Layout(cfg).Select(e => (e.Name, string.Join("x", e.Shape))).OrderBy(x => x.Name).ToList();
            Assert.Equal(expected, actual);
        }
        using var tiny = new LlamaForCausalLM(TestModels.Llama);
        var keys = tiny.state_dict().Keys.ToList();
        Assert.Contains("model.layers.0.self_attn.q_proj.weight", keys);
        Assert.Contains("model.layers.2.mlp.down_proj.weight", keys);
        Assert.Contains("model.layers.1.post_attention_layernorm.weight", keys);
        Assert.Contains("lm_head.weight", keys);
        Assert.Equal(TestModels.Llama.ParameterCount(), tiny.parameters().Sum(p => p.NumberOfElements));
    }
}
