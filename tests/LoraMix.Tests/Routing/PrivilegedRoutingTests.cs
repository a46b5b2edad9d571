using LoraMix.Adapters.MixLora;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Adapters;
using LoraMix.Tokenization;
using static LoraMix.Tests.Routing.RoutingTestKit;
using static TorchSharp.torch;

namespace LoraMix.Tests.Routing;

public sealed class PrivilegedRoutingTests
{
    private static readonly Privilege S = Privilege.System, U = Privilege.User, A = Privilege.Assistant, X = Privilege.Untrusted;

    private static (long[] Ids, Privilege[] Labels) Chat(int seed, int untrusted = 6)
    {
        var rnd = new Random(seed);
        var conv = new Conversation(
            [new Segment(S, RoutingTestKit.Ids(rnd, 4)), new Segment(U, RoutingTestKit.Ids(rnd, 5))],
            RoutingTestKit.Ids(rnd, untrusted),
            [new Segment(U, RoutingTestKit.Ids(rnd, 3)), new Segment(A, RoutingTestKit.Ids(rnd, 2))]);
        return conv.Build();
    }

    /// <summary>The selection of each strategy in plain C# on one probability vector (a token alone: switch capacity
    /// never binds).</summary>
    private static (int[] Experts, double[] Weights) Select(double[] p, int strategy)
    {
        var order = Enumerable.Range(0, p.Length).OrderByDescending(i => p[i]).ToArray();
        switch (Strategies[strategy].Strategy)
        {
            case MixLoraConfig.TopKStrategy:
                var top = order.Take(Strategies[strategy].TopK).ToArray();
                double sum = top.Sum(i => p[i]);
                return (top, top.Select(i => p[i] / sum).ToArray());
            case MixLoraConfig.TopPStrategy:
                var kept = new List<int>();
                double cum = 0;
                foreach (var i in order)
                {
                    if (cum > 0.6) break;
                    kept.Add(i);
                    cum += p[i];
                }
                return (kept.ToArray(), kept.Select(i => p[i]).ToArray());
            default:
                return ([order[0]], [p[order[0]]]);
        }
    }

    public static IEnumerable<object[]> StrategiesAndSnapshots() =>
        from s in Enumerable.Range(0, Strategies.Length) from snap in new[] { "last", "pooled" } select new object[] { s, snap };

    [Theory]
    [MemberData(nameof(StrategiesAndSnapshots))]
    public void FrozenTokensGetTheSnapshotOfAnIndependentComputationOverThePrivilegedPrefix(int strategy, string snapshot)
    {
        using var scope = NewDisposeScope();
        using var model = Model(strategy, 21 + strategy, ScalarType.Float64);
        var (ids, labels) = Chat(5);
        int first = Array.IndexOf(labels, X);

        // independent: the free path's router logits over the privileged prefix alone, softmax and selection in C#
        using var free = new RoutingContext { Collector = new RouterLogitsCollector() };
        using (no_grad()) model.Forward(tensor(ids[..first]).unsqueeze(0), routing: free, adapters: MixLoraTestKit.Default);
        var routes = Prefill(model, Policy(snapshot), (ids, labels))[0];
        Assert.Equal(ids.Length, routes.Count);
        for (int l = 0; l < 3; l++)
        {
            var p = nn.functional.softmax(free.Collector!.Records[l].Logits[0], -1);   // [first, E]
            var dist = snapshot == "last" ? p[first - 1] : p.mean([0L]);
            var (experts, weights) = Select(dist.data<double>().ToArray(), strategy);
            for (int t = first; t < ids.Length; t++)
            {
                Assert.Equal(experts, routes[t].Layers[l].Experts);
                for (int k = 0; k < experts.Length; k++) Assert.Equal(weights[k], routes[t].Layers[l].Weights[k], 6);
            }
        }
        // the prefix is routed freely: the free run over the whole sequence agrees there
        var freeRoutes = Prefill(model, FreeRouterPolicy.Instance, (ids, labels))[0];
        for (int t = 0; t < first; t++) AssertSame(freeRoutes[t], routes[t], $"prefix token {t}");
        // and the free run does not freeze: some later token routes differently from the frozen decision
        Assert.Contains(Enumerable.Range(first, ids.Length - first), t => !Same(freeRoutes[t], routes[t]));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void ASequenceWithoutUntrustedTokensIsRoutedExactlyAsUnderFree(int strategy)
    {
        using var scope = NewDisposeScope();
        using var model = Model(strategy, 30 + strategy);
        var rnd = new Random(strategy);
        var ids = RoutingTestKit.Ids(rnd, 20);
        var labels = ids.Select((_, i) => i < 6 ? S : i < 14 ? U : A).ToArray();
        var free = Prefill(model, FreeRouterPolicy.Instance, (ids, labels))[0];
        foreach (var snap in new[] { "last", "pooled" })
        {
            var priv = Prefill(model, Policy(snap), (ids, labels))[0];
            for (int t = 0; t < ids.Length; t++)
            {
                Assert.Equal(free[t].Layers.Select(l => l.Experts), priv[t].Layers.Select(l => l.Experts));
                Assert.Equal(free[t].Layers.SelectMany(l => l.Weights), priv[t].Layers.SelectMany(l => l.Weights));   // bitwise
            }
        }
    }

    [Theory]
    [InlineData(0, "last")]
    [InlineData(2, "pooled")]
    [InlineData(3, "last")]
    public void BatchRowsAreIndependentOfEachOtherAndOfThePadding(int strategy, string snap)
    {
        using var scope = NewDisposeScope();
        using var model = Model(strategy, 40 + strategy);
        var a = Chat(1, untrusted: 3);
        var b = Chat(2, untrusted: 11);
        var rnd = new Random(3);
        var c = (Ids: RoutingTestKit.Ids(rnd, 9), Labels: Enumerable.Repeat(U, 9).ToArray());   // no untrusted token
        var alone = new[] { a, b, c }.Select(r => Prefill(model, Policy(snap), r)[0]).ToArray();
        var batched = Prefill(model, Policy(snap), a, b, c);
        for (int r = 0; r < 3; r++)
        {
            Assert.Equal(alone[r].Count, batched[r].Count);
            for (int t = 0; t < alone[r].Count; t++) AssertSame(alone[r][t], batched[r][t], $"row {r} token {t}");
        }
    }

    [Theory]
    [InlineData(0, "last")]
    [InlineData(1, "pooled")]
    [InlineData(2, "last")]
    [InlineData(4, "pooled")]   // switch capacity binds per forward call (free too): cached == uncached while none overflows
    public void CachedDecodingAndChunkedPrefillRouteAsTheUncachedForward(int strategy, string snap)
    {
        using var scope = NewDisposeScope();
        using var model = Model(strategy, 50 + strategy);
        var (ids, labels) = Chat(7);
        var full = Prefill(model, Policy(snap), (ids, labels))[0];

        // chunks: the privileged prefix minus one token, then token by token (the untrusted one arrives in a decoding step)
        using var cache = model.CreateCache(1, 64);
        using var routing = new RoutingContext { Policy = Policy(snap), Trace = new RoutingTrace() };
        int first = Array.IndexOf(labels, X);
        using (no_grad())
        {
            routing.SetPrivileges([labels[..(first - 1)]]);
            model.Forward(tensor(ids[..(first - 1)]).unsqueeze(0), cache, routing: routing, adapters: MixLoraTestKit.Default);
            for (int i = first - 1; i < ids.Length; i++)
            {
                routing.SetPrivileges(labels[i], 1);
                model.Forward(tensor(new[] { ids[i] }).unsqueeze(0), cache, routing: routing, adapters: MixLoraTestKit.Default);
            }
        }
        var stepwise = routing.Trace!.Row(0);
        Assert.Equal(ids.Length, stepwise.Count);
        for (int t = 0; t < ids.Length; t++)
        {
            Assert.Equal(full[t].Layers.Select(l => l.Experts), stepwise[t].Layers.Select(l => l.Experts));
            for (int l = 0; l < 3; l++)
                for (int k = 0; k < full[t].Layers[l].Weights.Length; k++)
                    Assert.Equal(full[t].Layers[l].Weights[k], stepwise[t].Layers[l].Weights[k], 4);
        }
        var state = Assert.IsType<PrivilegedRoutingState>(routing.PolicyState);
        Assert.True(state.IsFrozen(0));
        Assert.Equal(first, state.FirstUntrustedPosition(0));
        Assert.Equal(first, state.RoutedTokens(0));
    }

    /// <summary>Wraps a policy and replaces the router input of the given tokens by NaN: if the policy ran the router on
    /// any of them, NaN would reach a decision, the recorded logits or the output.</summary>
    private sealed class PoisonRouterInput(IRouterPolicy inner, Func<RouterStep, Tensor> poisoned) : IRouterPolicy
    {
        public string Name => inner.Name;

        public bool FreezesOnUntrusted => inner.FreezesOnUntrusted;

        public RoutingDecision Route(RouterStep step)
        {
            var mask = poisoned(step).unsqueeze(-1);
            return inner.Route(new RouterStep
            {
                Layer = step.Layer, Input = step.Input.masked_fill(mask, double.NaN), Router = step.Router,
                Strategy = step.Strategy, Context = step.Context,
            });
        }
    }

    [Theory]
    [InlineData(0, "last")]
    [InlineData(2, "pooled")]
    [InlineData(3, "last")]
    public void TheRouterNeverReadsTheHiddenStateOfAFrozenToken(int strategy, string snap)
    {
        using var scope = NewDisposeScope();
        using var model = Model(strategy, 60 + strategy);
        var a = Chat(8);
        var b = Chat(9, untrusted: 2);
        var (ids, mask) = Pad([a.Ids, b.Ids]);
        long t = ids.shape[1];
        // frozen in padded coordinates: from each row's first untrusted token on
        var frozen = zeros(2, t, dtype: ScalarType.Bool);
        foreach (var (row, r) in new[] { (a, 0), (b, 1) })
        {
            long pad = t - row.Ids.Length;
            frozen[r].narrow(0, pad + Array.IndexOf(row.Labels, X), t - pad - Array.IndexOf(row.Labels, X)).fill_(true);
        }

        (Tensor Logits, RoutingTrace Trace, List<Tensor> Recorded) Run(IRouterPolicy policy, bool decode)
        {
            var routing = new RoutingContext { Policy = policy, Trace = new RoutingTrace(), Collector = new RouterLogitsCollector() };
            using var cache = model.CreateCache(2, 32);
            routing.SetPrivileges([a.Labels, b.Labels]);
            var recorded = new List<Tensor>();
            using var noGrad = no_grad();
            var logits = model.Forward(ids, cache, mask, routing: routing, adapters: MixLoraTestKit.Default);
            recorded.AddRange(routing.Collector!.Logits.Select(l => l.clone()));
            if (decode)
                for (int i = 0; i < 3; i++)
                {
                    routing.SetPrivileges(A, 2);
                    logits = cat([logits, model.Forward(tensor(new long[] { 7 + i, 9 + i }).view(2, 1), cache, routing: routing, adapters: MixLoraTestKit.Default)], 1);
                    recorded.AddRange(routing.Collector!.Logits.Select(l => l.clone()));
                }
            return (logits, routing.Trace!, recorded);
        }

        var clean = Run(Policy(snap), decode: true);
        // The prefill runs each row's privileged prefix on its own (batch 1: nothing frozen there), then the rest of both
        // rows batched, which starts at each row's first untrusted token (every real token frozen); decoding: all frozen.
        Tensor Frozen(RouterStep s)
        {
            if (s.Input.shape[0] == 1) return zeros(1, s.Input.shape[1], dtype: ScalarType.Bool);
            if (s.Input.shape[1] == 1) return ones(2, 1, dtype: ScalarType.Bool);
            var real = (s.Context.TokenMask ?? ones(2, s.Input.shape[1])).to(ScalarType.Bool);
            var labels = s.Context.Routing!.PrivilegeLabels!;
            for (int r = 0; r < 2; r++)
            {
                long firstReal = real[r].to(ScalarType.Int64).argmax().item<long>();
                Assert.Equal((byte)X, labels[r, firstReal].item<byte>());
            }
            Assert.True(s.Input.shape[1] < t, "the prefill was not split");
            return real;
        }
        var poisoned = Run(new PoisonRouterInput(Policy(snap), Frozen), decode: true);
        Assert.True(clean.Logits.equal(poisoned.Logits).all().item<bool>(), "model output changed");
        for (int i = 0; i < clean.Recorded.Count; i++)
        {
            Assert.False(poisoned.Recorded[i].isnan().any().item<bool>(), $"record {i} holds NaN");
            Assert.True(clean.Recorded[i].equal(poisoned.Recorded[i]).all().item<bool>(), $"record {i} changed");
        }
        for (int r = 0; r < 2; r++)
            for (int k = 0; k < clean.Trace.Row(r).Count; k++)
                Assert.True(Same(clean.Trace.Row(r)[k], poisoned.Trace.Row(r)[k], 0), $"row {r} token {k}");

        // control: the same poison under the free policy reaches the routing (the check can fail)
        var control = Run(new PoisonRouterInput(FreeRouterPolicy.Instance, s => s.Input.shape[1] == t ? frozen : ones(2, 1, dtype: ScalarType.Bool)), decode: false);
        Assert.Contains(control.Recorded, l => l.isnan().any().item<bool>());
    }

    [Fact]
    public void AuxLossesCountOnlyTheTokensTheRouterRouted()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config() with { RouterZLossCoef = 0.01, RouterPolicy = MixLoraConfig.PrivilegedPolicy };
        using var model = MixLoraTestKit.Model(config, 70);
        model.eval();
        var (ids, labels) = Chat(10);
        int first = Array.IndexOf(labels, X);
        using var priv = new RoutingContext { Collector = new RouterLogitsCollector() };   // the adapter's policy
        priv.SetPrivileges([labels]);
        model.Forward(tensor(ids).unsqueeze(0), routing: priv, adapters: MixLoraTestKit.Default);
        var mask = priv.Collector!.Records[0].TokenMask!;
        Assert.Equal(Enumerable.Range(0, ids.Length).Select(t => t < first), mask[0].data<bool>().ToArray());
        var lossPriv = MixLoraLosses.Compute(config, priv.Collector);

        using var free = new RoutingContext { Policy = FreeRouterPolicy.Instance, Collector = new RouterLogitsCollector() };
        model.Forward(tensor(ids[..first]).unsqueeze(0), routing: free, adapters: MixLoraTestKit.Default);
        var lossPrefix = MixLoraLosses.Compute(config, free.Collector!);
        Assert.Equal(lossPrefix.LoadBalancing.item<float>(), lossPriv.LoadBalancing.item<float>(), 5);
        Assert.Equal(lossPrefix.ZLoss.item<float>(), lossPriv.ZLoss.item<float>(), 5);
    }

    [Fact]
    public void TrainingThroughFrozenTokensReachesTheRouterViaTheSnapshot()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config() with { LoraDropout = 0.0 };
        using var model = MixLoraTestKit.Model(config, 71);
        var trainable = MixLoraAdapters.PrepareForTraining(model);
        var (ids, labels) = Chat(11);
        int first = Array.IndexOf(labels, X);
        using var routing = new RoutingContext { Policy = PrivilegedRouterPolicy.Pooled };
        routing.SetPrivileges([labels]);
        var logits = model.Forward(tensor(ids).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        logits.narrow(1, first, ids.Length - first).pow(2).mean().backward();   // a loss on frozen tokens only
        var router = MixLoraAdapters.Blocks(model)[2].GetAdapter("default").RouterWeight;
        Assert.True(router.grad is not null && router.grad.abs().sum().item<float>() > 0);
        Assert.Contains(trainable, p => ReferenceEquals(p, router));
    }

    [Fact]
    public void TheAdaptersConfiguredPolicyAppliesAndFailsClosedWithoutLabels()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config() with { RouterPolicy = MixLoraConfig.PrivilegedPolicy, PrivilegedSnapshot = MixLoraConfig.PooledSnapshot };
        using var model = MixLoraTestKit.Model(config, 72);
        model.eval();
        Assert.Same(PrivilegedRouterPolicy.Pooled, MixLoraAdapters.Blocks(model)[0].GetAdapter("default").Policy);
        var (ids, labels) = Chat(12);
        var ex = Assert.Throws<InvalidOperationException>(() => model.Forward(tensor(ids).unsqueeze(0), adapters: MixLoraTestKit.Default));
        Assert.Contains("privilege labels", ex.Message);
        using var noLabels = new RoutingContext();
        Assert.Throws<InvalidOperationException>(() => model.Forward(tensor(ids).unsqueeze(0), routing: noLabels, adapters: MixLoraTestKit.Default));
        using var wrongShape = new RoutingContext();
        wrongShape.SetPrivileges([labels[..5]]);
        Assert.Throws<ArgumentException>(() => model.Forward(tensor(ids).unsqueeze(0), routing: wrongShape, adapters: MixLoraTestKit.Default));

        var configured = new RoutingContext { Trace = new RoutingTrace() };
        configured.SetPrivileges([labels]);
        model.Forward(tensor(ids).unsqueeze(0), routing: configured, adapters: MixLoraTestKit.Default);
        var explicitPolicy = Prefill(model, PrivilegedRouterPolicy.Pooled, (ids, labels))[0];
        for (int t = 0; t < ids.Length; t++) AssertSame(explicitPolicy[t], configured.Trace!.Row(0)[t], $"token {t}");
        // a forward without a cache starts a new sequence: the state does not leak into the next batch
        configured.SetPrivileges([Enumerable.Repeat(U, 5).ToArray()]);
        model.Forward(tensor(ids[..5]).unsqueeze(0), routing: configured, adapters: MixLoraTestKit.Default);
        Assert.False(Assert.IsType<PrivilegedRoutingState>(configured.PolicyState).IsFrozen(0));
        configured.Dispose();
    }

    [Theory]
    [InlineData("last")]
    [InlineData("pooled")]
    public void GenerationRoutesThroughTheContextAndGeneratedTokensStayFrozen(string snap)
    {
        using var scope = NewDisposeScope();
        using var model = Model(0, 80);
        var generator = new TokenGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 6, Temperature = 0, StopAtEos = false, Adapters = MixLoraTestKit.Default };
        var a = Chat(13, untrusted: 4);
        var b = Chat(14, untrusted: 9);
        var rnd = new Random(15);
        var clean = (Ids: RoutingTestKit.Ids(rnd, 7), Labels: new[] { S, S, U, U, U, U, A });

        using var routing = new RoutingContext { Policy = Policy(snap), Trace = new RoutingTrace() };
        var prompts = new[] { a, b, clean };
        var outputs = generator.Generate(prompts.Select(p => (IReadOnlyList<int>)p.Ids.Select(x => (int)x).ToList()).ToList(), options,
            routing, prompts.Select(p => (IReadOnlyList<Privilege>)p.Labels).ToList());
        Assert.Equal(6, routing.Trace!.StepCount);
        // the plain API is unchanged: with a free routing context (no labels) it generates the same tokens
        var promptIds = prompts.Select(p => (IReadOnlyList<int>)p.Ids.Select(x => (int)x).ToList()).ToList();
        var plain = generator.Generate(promptIds, options);
        using var freeRouting = new RoutingContext { Trace = new RoutingTrace() };
        var traced = generator.Generate(promptIds, options, freeRouting, null);
        for (int r = 0; r < 3; r++) Assert.Equal(plain[r].Tokens, traced[r].Tokens);
        Assert.Equal(6, freeRouting.Trace!.StepCount);

        for (int r = 0; r < 2; r++)
        {
            var (ids, labels) = prompts[r];
            var routes = routing.Trace.Row(r);
            Assert.Equal(ids.Length + options.MaxNewTokens - 1, routes.Count);
            int first = Array.IndexOf(labels, X);
            for (int t = first + 1; t < routes.Count; t++) AssertSame(routes[first], routes[t], $"row {r} token {t}");
            // the generated tokens routed exactly as the uncached forward of prompt + generated tokens
            var fullIds = ids.Concat(outputs[r].Tokens.Take(options.MaxNewTokens - 1).Select(x => (long)x)).ToArray();
            var fullLabels = labels.Concat(Enumerable.Repeat(A, fullIds.Length - ids.Length)).ToArray();
            var uncached = Prefill(model, Policy(snap), (fullIds, fullLabels))[0];
            for (int t = 0; t < routes.Count; t++)
                Assert.Equal(uncached[t].Layers.Select(l => l.Experts), routes[t].Layers.Select(l => l.Experts));
        }
        // without an untrusted token, generated tokens are routed on their own hidden state
        var cleanRoutes = routing.Trace.Row(2);
        Assert.Contains(Enumerable.Range(clean.Ids.Length, cleanRoutes.Count - clean.Ids.Length), t => !Same(cleanRoutes[t], cleanRoutes[clean.Ids.Length - 1]));
        Assert.False(Assert.IsType<PrivilegedRoutingState>(routing.PolicyState).IsFrozen(2));
    }

    [Fact]
    public void PrivilegeLabelsOfRowsArePaddedOnTheLeft()
    {
        using var routing = new RoutingContext();
        routing.SetPrivileges([new[] { X, U }, new[] { S, U, A }]);
        Assert.Equal(new byte[] { (byte)S, 0, (byte)U, (byte)S, (byte)U, (byte)A }, routing.PrivilegeLabels!.data<byte>().ToArray());
        routing.SetPrivileges(A, 2);
        Assert.Equal(new long[] { 2, 1 }, routing.PrivilegeLabels!.shape);
    }
}
