using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Inference;

/// <summary>Generation is bounded by the model's context and a KV-cache memory limit, and stops on non-finite logits.</summary>
public sealed class GenerationLimitsTests
{
    /// <summary>The tiny preset with a short context.</summary>
    private static LlamaConfig Short(int context) => TestModels.Llama with { MaxPositionEmbeddings = context };

    private static int[] Prompt(int length, int seed = 0) =>
        [1, .. TestModels.RandomIds(length - 1, 500, seed).Select(x => (int)x + 3)];

    [Fact]
    public void APromptThatFillsTheContextIsRefusedBeforeAnyForwardPass()
    {
        using var model = TestModels.Random(Short(16), seed: 1);
        var gen = new TokenGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 4, Temperature = 0 };

        var e = Assert.Throws<ContextLengthException>(() => gen.Generate(Prompt(16), options));
        Assert.Equal(16, e.PromptTokens);
        Assert.Equal(16, e.ContextLength);
        Assert.Contains("the prompt has 16 tokens", e.Message);
        Assert.Contains("context is 16 tokens", e.Message);
        Assert.Contains("at most 15 tokens", e.Message);
        Assert.IsAssignableFrom<LoraMixException>(e);

        // Five million tokens: a forward pass (or a cache) of that length could not even be allocated, so the refusal
        // comes first; in a batch the message names the prompt.
        var huge = Enumerable.Repeat(5, 5_000_000).ToArray();
        var batched = Assert.Throws<ContextLengthException>(() => gen.Generate([Prompt(3), huge], options));
        Assert.Contains("prompt 1 has 5000000 tokens", batched.Message);

        // One token shorter fits and gets the one position left.
        var last = gen.Generate(Prompt(15), options with { StopAtEos = false });
        Assert.Single(last.Tokens);
        Assert.Equal(FinishReason.Length, last.FinishReason);
    }

    [Fact]
    public void AHugeMaxNewTokensIsClampedToTheContextPerRow()
    {
        using var model = TestModels.Random(Short(24), seed: 2);
        var gen = new TokenGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = int.MaxValue, Temperature = 0, StopAtEos = false };
        int[] shortPrompt = Prompt(4, 1), longPrompt = Prompt(10, 2);

        var alone = gen.Generate(shortPrompt, options);
        Assert.Equal(24 - 4, alone.Tokens.Count);   // prompt + output = the context, not 2^31 tokens
        Assert.Equal(FinishReason.Length, alone.FinishReason);

        // Batched, each row stops at its own context end, with the tokens it gets alone.
        var both = gen.Generate([shortPrompt, longPrompt], options);
        Assert.Equal(alone.Tokens, both[0].Tokens);
        Assert.Equal(24 - 10, both[1].Tokens.Count);
        Assert.Equal(gen.Generate(longPrompt, options).Tokens, both[1].Tokens);
        Assert.All(both, s => Assert.Equal(FinishReason.Length, s.FinishReason));
        // A budget inside the context is unchanged.
        Assert.Equal(7, gen.Generate(shortPrompt, options with { MaxNewTokens = 7 }).Tokens.Count);
    }

    [Fact]
    public void TheCacheIsSizedByTheClampedBudgetAndRefusedOverTheLimit()
    {
        var cfg = Short(24);
        using var model = TestModels.Random(cfg, seed: 3);
        var gen = new TokenGenerator(model);
        // bytes = layers x 2 x batch x kv heads x head dim x capacity x element size
        Assert.Equal((long)cfg.NumHiddenLayers * 2 * 3 * cfg.NumKeyValueHeads * cfg.HeadDim * 24 * 4,
            TokenGenerator.KvCacheBytes(cfg, 3, 24, ScalarType.Float32));
        Assert.Equal(TokenGenerator.KvCacheBytes(cfg, 3, 24, ScalarType.Float32) / 2, TokenGenerator.KvCacheBytes(cfg, 3, 24, ScalarType.BFloat16));
        Assert.Equal(long.MaxValue, TokenGenerator.KvCacheBytes(cfg with { NumHiddenLayers = int.MaxValue }, long.MaxValue / 2, 1 << 30, ScalarType.Float32));

        // With an unbounded request, a limit of exactly 24 positions' worth suffices: the cache holds prompt + clamped budget.
        long exact = TokenGenerator.KvCacheBytes(cfg, 1, 24, ScalarType.Float32);
        var options = new GenerationOptions { MaxNewTokens = 2_000_000_000, Temperature = 0, StopAtEos = false, MaxKvCacheBytes = exact };
        Assert.Equal(20, gen.Generate(Prompt(4), options).Tokens.Count);

        var e = Assert.Throws<KvCacheLimitException>(() => gen.Generate(Prompt(4), options with { MaxKvCacheBytes = exact - 1 }));
        Assert.Equal(exact, e.RequiredBytes);
        Assert.Equal(exact - 1, e.LimitBytes);
        Assert.Contains("24 positions", e.Message);
        Assert.Contains("--max-kv-cache-gib", e.Message);
        Assert.Throws<ArgumentException>(() => gen.Generate(Prompt(4), options with { MaxKvCacheBytes = 0 }));
    }

    /// <summary>Sets one row of the input embedding to NaN: only a step that feeds that token sees it.</summary>
    private static void PoisonEmbedding(LlamaForCausalLM model, int token)
    {
        using var noGrad = no_grad();
        model.Model.EmbedTokens.Weight[token].fill_(double.NaN);
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(0.8)]
    public void NonFiniteLogitsStopGenerationWithATypedError(double temperature)
    {
        using var model = TestModels.Random(Short(64), seed: 4);
        var gen = new TokenGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 8, Temperature = temperature, Seed = 5, StopAtEos = false };
        int[] prompt = Prompt(5, 3);
        var clean = gen.Generate(prompt, options).Tokens;
        Assert.Equal(8, clean.Count);

        // The first generated token's embedding is NaN: the prefill is finite, the step that feeds it back is not.
        PoisonEmbedding(model, clean[0]);
        Assert.DoesNotContain(clean[0], prompt);
        var streamed = new List<int>();
        var e = Assert.Throws<NonFiniteLogitsException>(() => gen.Generate(prompt, options, streamed.Add));
        Assert.Equal(1, e.Step);
        Assert.Equal(0, e.Row);
        Assert.Equal(new[] { clean[0] }, streamed);   // nothing was emitted from the broken step
        Assert.Contains("non-finite logits", e.Message);
        Assert.Contains("adapter weights", e.Message);
        Assert.Contains("Float32", e.Message);

        // In a batch, the broken row is named; a prompt holding the token fails at the prefill.
        var inBatch = Assert.Throws<NonFiniteLogitsException>(() => gen.Generate([Prompt(4, 9), [1, clean[0], 7]], options));
        Assert.Equal(0, inBatch.Step);
        Assert.Equal(1, inBatch.Row);
        Assert.Contains("prompt 1", inBatch.Message);
    }

    [Fact]
    public void ANaNWeightInTheOutputProjectionIsCaughtAtTheFirstStep()
    {
        using var model = TestModels.Random(Short(64), seed: 6);
        using (no_grad()) model.OutputWeight[3][0].fill_(double.NaN);
        var gen = new TokenGenerator(model);
        foreach (double t in new[] { 0.0, 1.0 })
        {
            var e = Assert.Throws<NonFiniteLogitsException>(() => gen.Generate(Prompt(4), new GenerationOptions { Temperature = t, Seed = 1 }));
            Assert.Equal(0, e.Step);
            Assert.Contains("on the prompt (prefill)", e.Message);
        }
    }

    [Fact]
    public void ATinyTemperatureSamplesTheArgMaxInsteadOfFailing()
    {
        using var scope = NewDisposeScope();
        using var rng = new TorchSharp.torch.Generator(0, CPU);
        // Unshifted, 1e20 / 1e-20 overflows to inf and the softmax to NaN (libtorch: "probability tensor contains inf/nan").
        var logits = tensor(new float[] { 1e20f, 0f, -1e20f, 3f }).unsqueeze(0);
        foreach (double t in new[] { 1e-20, 1e-45, double.Epsilon })
            Assert.Equal(0L, TokenGenerator.Sample(logits, new GenerationOptions { Temperature = t }, null, rng).item<long>());

        using var model = TestModels.Random(Short(64), seed: 7);
        var gen = new TokenGenerator(model);
        var greedy = gen.Generate(Prompt(4), new GenerationOptions { MaxNewTokens = 6, Temperature = 0, StopAtEos = false });
        var tiny = gen.Generate(Prompt(4), new GenerationOptions { MaxNewTokens = 6, Temperature = 1e-40, Seed = 2, StopAtEos = false });
        Assert.Equal(greedy.Tokens, tiny.Tokens);
    }
}
