using LoraMix.Adapters.MixLora;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

public sealed class MixLoraLossTests
{
    /// <summary>
    /// The Mixtral load-balancing loss computed independently in plain C# doubles (research/mixlora.md §4): over all
    /// layers' real tokens, f[k,i] = share of tokens whose k-th choice is i, P̄_i = mean probability of i;
    /// L = E · Σ_k Σ_i f[k,i]·P̄_i.
    /// </summary>
    private static double ReferenceLoadBalancing(double[][,] layers, bool[] real, int topK)
    {
        int e = layers[0].GetLength(1);
        var f = new double[topK, e];
        var pBar = new double[e];
        double count = 0;
        foreach (var logits in layers)
            for (int t = 0; t < real.Length; t++)
            {
                if (!real[t]) continue;
                count++;
                double max = Enumerable.Range(0, e).Max(i => logits[t, i]);
                var p = Enumerable.Range(0, e).Select(i => Math.Exp(logits[t, i] - max)).ToArray();
                double z = p.Sum();
                for (int i = 0; i < e; i++) pBar[i] += p[i] / z;
                var order = Enumerable.Range(0, e).OrderByDescending(i => p[i]).ToArray();
                for (int k = 0; k < topK; k++) f[k, order[k]] += 1;
            }
        double loss = 0;
        for (int k = 0; k < topK; k++)
            for (int i = 0; i < e; i++) loss += f[k, i] / count * (pBar[i] / count);
        return e * loss;
    }

    private static (double[][,] Arrays, List<Tensor> Tensors) RandomLogits(int layers, int b, int t, int e, int seed)
    {
        var rnd = new Random(seed);
        var arrays = new double[layers][,];
        var tensors = new List<Tensor>();
        for (int l = 0; l < layers; l++)
        {
            arrays[l] = new double[b * t, e];
            var flat = new double[b * t * e];
            for (int n = 0; n < b * t; n++)
                for (int i = 0; i < e; i++) flat[n * e + i] = arrays[l][n, i] = 2 * (rnd.NextDouble() - 0.5) * 3;
            tensors.Add(tensor(flat, [b, t, e], ScalarType.Float64));
        }
        return (arrays, tensors);
    }

    [Fact]
    public void TheLoadBalancingLossMatchesAnIndependentComputationWithPaddingMasked()
    {
        using var scope = NewDisposeScope();
        var (arrays, tensors) = RandomLogits(3, 2, 6, 5, 1);
        var real = new[] { false, false, true, true, true, true, true, true, true, true, true, true };
        var mask = tensor(real.Select(r => r ? 1L : 0L).ToArray(), [2, 6]);
        foreach (int k in new[] { 1, 2, 3 })
        {
            double expected = ReferenceLoadBalancing(arrays, real, k);
            Assert.Equal(expected, RouterLosses.LoadBalancing(tensors, k, mask).item<double>(), 12);
        }
        // without a mask every token counts, and the padded tokens change the value
        var all = Enumerable.Repeat(true, 12).ToArray();
        Assert.Equal(ReferenceLoadBalancing(arrays, all, 2), RouterLosses.LoadBalancing(tensors, 2).item<double>(), 12);
        Assert.NotEqual(ReferenceLoadBalancing(arrays, all, 2), ReferenceLoadBalancing(arrays, real, 2), 6);
    }

    [Fact]
    public void ABalancedRouterGivesTopK()
    {
        using var scope = NewDisposeScope();
        var uniform = new List<Tensor> { zeros(4, 10, 8), zeros(4, 10, 8) };
        Assert.Equal(2.0, RouterLosses.LoadBalancing(uniform, 2).item<float>(), 5);
        Assert.Equal(1.0, RouterLosses.SwitchLoadBalancing(uniform).item<float>(), 5);
    }

    [Fact]
    public void TheZLossAndEntropyMatchIndependentComputations()
    {
        using var scope = NewDisposeScope();
        var (arrays, tensors) = RandomLogits(2, 1, 4, 3, 2);
        var real = new[] { true, true, false, true };
        double z = 0, h = 0;
        int count = 0;
        foreach (var a in arrays)
            for (int t = 0; t < 4; t++)
            {
                if (!real[t]) continue;
                count++;
                var row = Enumerable.Range(0, 3).Select(i => a[t, i]).ToArray();
                double lse = Math.Log(row.Sum(Math.Exp));
                z += lse * lse;
                h -= row.Sum(x => Math.Exp(x - lse) * (x - lse));
            }
        var mask = tensor(new[] { 1L, 1, 0, 1 }, [1, 4]);
        Assert.Equal(z / count, RouterLosses.ZLoss(tensors, mask).item<double>(), 12);
        Assert.Equal(h / count, RouterLosses.Entropy(tensors, mask).item<double>(), 12);
    }

    [Fact]
    public void TheTopPLossCountsTheKeptExperts()
    {
        using var scope = NewDisposeScope();
        // one token, probabilities 0.5 / 0.3 / 0.2: top_p = 0.6 keeps the first two
        var logits = new List<Tensor> { log(tensor(new[] { 0.5, 0.3, 0.2 })).view(1, 1, 3) };
        double expected = 3 * (1 * 0.5 + 1 * 0.3);
        Assert.Equal(expected, RouterLosses.TopPLoadBalancing(logits, 0.6, 0).item<double>(), 12);
    }

    [Fact]
    public void MixLoraLossesUseTheConfigsCoefficientsAndTheCollectedPaddingMask()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config() with { RouterAuxLossCoef = 0.01 };
        using var model = MixLoraTestKit.Model(config, 20);
        using var routing = new RoutingContext { Collector = new RouterLogitsCollector() };
        var ids = tensor(new long[] { 0, 0, 4, 5, 6, 7, 8, 9 }).view(2, 4);
        var mask = tensor(new long[] { 0, 0, 1, 1, 1, 1, 1, 1 }).view(2, 4);
        model.Forward(ids, attentionMask: mask, routing: routing, adapters: MixLoraTestKit.Default);
        var logits = routing.Collector!.Logits;
        Assert.Equal(3, logits.Count);
        Assert.All(logits, l => Assert.Equal([2L, 4, 4], l.shape));
        Assert.All(logits, l => Assert.Equal(ScalarType.Float32, l.dtype));

        var terms = MixLoraLosses.Compute(config, routing.Collector);
        double expected = 0.01 * RouterLosses.LoadBalancing(logits, 2, mask).item<float>();
        Assert.Equal(expected, terms.LoadBalancing.item<float>(), 6);
        Assert.Equal(0.0, terms.ZLoss.item<float>());
        Assert.Equal(expected, terms.Total.item<float>(), 6);

        var withZ = MixLoraLosses.Compute(config with { RouterZLossCoef = 0.5 }, routing.Collector);
        Assert.Equal(0.5 * RouterLosses.ZLoss(logits, mask).item<float>(), withZ.ZLoss.item<float>(), 5);
        Assert.Equal(0.0, MixLoraLosses.Compute(config with { RouterLoss = false }, routing.Collector).Total.item<float>());

        var sw = config with { RoutingStrategy = MixLoraConfig.SwitchStrategy };
        var swTerms = MixLoraLosses.Compute(sw, logits, mask);
        Assert.Equal(0.001 * RouterLosses.ZLoss(logits, mask).item<float>(), swTerms.ZLoss.item<float>(), 6);
        Assert.Equal(0.01 * RouterLosses.LoadBalancing(logits, 1, mask).item<float>(), swTerms.LoadBalancing.item<float>(), 6);
    }

    [Fact]
    public void RoutingStatisticsReportLoadAndEntropyPerLayer()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config(experts: 4, topK: 2);
        using var model = MixLoraTestKit.Model(config, 21);
        model.eval();
        using var routing = new RoutingContext { Collector = new RouterLogitsCollector(), Trace = new RoutingTrace() };
        var stats = new RoutingStatistics();
        model.Forward(tensor(new long[] { 3, 4, 5, 6, 7, 8 }).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        stats.Add(routing.Collector!);
        model.Forward(tensor(new long[] { 0, 9, 10 }).unsqueeze(0), attentionMask: tensor(new long[] { 0, 1, 1 }).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        stats.Add(routing.Collector!);
        var result = stats.Result();
        Assert.Equal([0, 1, 2], result.Select(r => r.Layer));
        foreach (var layer in result)
        {
            Assert.Equal(8, layer.Tokens);
            Assert.Equal(1.0, layer.ExpertLoad.Sum(), 9);
            Assert.Equal(1.0, layer.MeanProbability.Sum(), 6);
            Assert.InRange(layer.Entropy, 0, Math.Log(4) + 1e-9);
        }
        // the load equals the trace's counts of chosen experts
        var counts = new double[4];
        foreach (var token in routing.Trace!.Row(0))
            foreach (var e in token.Layers[1].Experts) counts[e]++;
        Assert.Equal(8, routing.Trace.Row(0).Count);
        for (int e = 0; e < 4; e++) Assert.Equal(counts[e] / 16, result[1].ExpertLoad[e], 9);
    }
}
