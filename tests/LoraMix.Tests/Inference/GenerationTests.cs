using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Inference;

public sealed class GenerationTests
{
    private static List<int> GreedyWithoutCache(LlamaForCausalLM model, IReadOnlyList<int> prompt, int steps)
    {
        var seq = prompt.Select(x => (long)x).ToList();
        var output = new List<int>();
        using var noGrad = no_grad();
        for (int i = 0; i < steps; i++)
        {
            using var scope = NewDisposeScope();
            var logits = model.Forward(tensor(seq.ToArray()).unsqueeze(0))[0, -1];
            int next = (int)logits.argmax().item<long>();
            output.Add(next);
            seq.Add(next);
        }
        return output;
    }

    [Fact]
    public void GreedyEqualsArgmaxOfFullForwards()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 2);
        int[] prompt = [1, 17, 300, 42];
        var expected = GreedyWithoutCache(model, prompt, 20);
        var got = new TokenGenerator(model).Generate(prompt, new GenerationOptions { MaxNewTokens = 20, Temperature = 0, StopAtEos = false });
        Assert.Equal(expected, got.Tokens);
        Assert.Equal(FinishReason.Length, got.FinishReason);
    }

    [Fact]
    public void BatchedPromptsOfDifferentLengthsEqualOneByOne()
    {
        using var model = TestModels.Random(TestModels.Mistral, seed: 3);   // sliding window exercised too
        int[][] prompts = [[1, 5, 9, 200, 3, 4, 5, 6], [1, 8], [1, 77, 12, 19]];
        var options = new GenerationOptions { MaxNewTokens = 12, Temperature = 0, StopAtEos = false };
        var gen = new TokenGenerator(model);
        var batched = gen.Generate(prompts, options);
        for (int i = 0; i < prompts.Length; i++)
            Assert.Equal(gen.Generate(prompts[i], options).Tokens, batched[i].Tokens);
    }

    [Fact]
    public void SameSeedSameOutputDifferentSeedDifferentOutput()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 4);
        var gen = new TokenGenerator(model);
        int[] prompt = [1, 2, 3];
        GenerationOptions Opts(long seed) => new() { MaxNewTokens = 24, Temperature = 1.5, TopK = 50, TopP = 0.95, Seed = seed, StopAtEos = false };
        var a = gen.Generate(prompt, Opts(123)).Tokens;
        var b = gen.Generate(prompt, Opts(123)).Tokens;
        var c = gen.Generate(prompt, Opts(124)).Tokens;
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
    }

    [Fact]
    public void TopKOneIsGreedy()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 5);
        var gen = new TokenGenerator(model);
        int[] prompt = [1, 9, 10];
        var greedy = gen.Generate(prompt, new GenerationOptions { MaxNewTokens = 10, Temperature = 0, StopAtEos = false }).Tokens;
        var topk = gen.Generate(prompt, new GenerationOptions { MaxNewTokens = 10, Temperature = 0.7, TopK = 1, Seed = 1, StopAtEos = false }).Tokens;
        Assert.Equal(greedy, topk);
    }

    [Fact]
    public void StopTokensEndTheSequenceAndAreNotEmitted()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 6);
        var gen = new TokenGenerator(model);
        int[] prompt = [1, 4];
        var free = gen.Generate(prompt, new GenerationOptions { MaxNewTokens = 10, Temperature = 0, StopAtEos = false }).Tokens;
        int stopAt = free[3];
        int firstIndex = free.ToList().IndexOf(stopAt);
        var stopped = gen.Generate(prompt, new GenerationOptions { MaxNewTokens = 10, Temperature = 0, StopAtEos = false, StopTokenIds = [stopAt] });
        Assert.Equal(FinishReason.Stop, stopped.FinishReason);
        Assert.Equal(stopAt, stopped.StopTokenId);
        Assert.Equal(free.Take(firstIndex), stopped.Tokens);
    }

    [Fact]
    public void SamplingFiltersFollowTheirDefinitions()
    {
        using var scope = NewDisposeScope();
        var logits = tensor(new float[] { 2f, 1f, 0.5f, -1f, 3f }).unsqueeze(0);
        using var rng = new TorchSharp.torch.Generator(0, CPU);
        // top-k 2 only ever picks indices 4 and 0
        var picks = Enumerable.Range(0, 200).Select(_ => TokenGenerator.Sample(logits, new GenerationOptions { TopK = 2 }, null, rng).item<long>()).ToHashSet();
        Assert.Subset(new HashSet<long> { 0, 4 }, picks);
        Assert.Equal(2, picks.Count);
        // top-p: probabilities (sorted) ≈ .61,.22,.08,.05,.01 → p=0.7 keeps the first two
        var pPicks = Enumerable.Range(0, 200).Select(_ => TokenGenerator.Sample(logits, new GenerationOptions { TopP = 0.7 }, null, rng).item<long>()).ToHashSet();
        Assert.Subset(new HashSet<long> { 0, 4 }, pPicks);
        // repetition penalty 100 on index 4 makes index 0 the arg-max
        var seen = tensor(new[] { false, false, false, false, true }).unsqueeze(0);
        Assert.Equal(0L, TokenGenerator.Sample(logits, new GenerationOptions { Temperature = 0, RepetitionPenalty = 100 }, seen, null).item<long>());
    }

    [Fact]
    public void InvalidOptionsAreRejected()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 1);
        var gen = new TokenGenerator(model);
        Assert.Throws<ArgumentException>(() => _ = gen.Generate([1], new GenerationOptions { TopP = 0 }));
        Assert.Throws<ArgumentException>(() => _ = gen.Generate([1], new GenerationOptions { Temperature = -1 }));
        Assert.Throws<ArgumentException>(() => _ = gen.Generate([9999], new GenerationOptions()));
        Assert.Throws<ArgumentException>(() => _ = gen.Generate(Array.Empty<int>(), new GenerationOptions()));
    }

    [Fact]
    public void LiveTensorCountStaysFlatOver100GenerationSteps()
    {
        using var model = TestModels.Random(TestModels.Llama, seed: 8);
        var gen = new TokenGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 100, Temperature = 0.8, TopP = 0.9, TopK = 40, RepetitionPenalty = 1.1, Seed = 3, StopAtEos = false };
        gen.Generate([1, 2, 3], new GenerationOptions { MaxNewTokens = 3, Seed = 1 });   // warm-up
        var stats = DisposeScopeManager.Statistics;
        long before = stats.ThreadTotalLiveCount;
        var counts = new List<long>();
        var result = gen.Generate([[1, 2, 3], [1, 5]], options, (row, _) => { if (row == 0) counts.Add(stats.ThreadTotalLiveCount); });
        long after = stats.ThreadTotalLiveCount;
        Assert.Equal(100, result[0].Tokens.Count);
        Assert.Equal(before, after);
        // during the loop the count is bounded: the same at step 10 and step 100
        Assert.Equal(counts[9], counts[^1]);
    }
}
