using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

public sealed class MixLoraDispatchTests
{
    /// <summary>
    /// The dense reference, written here from research/mixlora.md §3: every expert computed on every token from the merged
    /// per-expert weights (W + s·B·A), then summed with a [N, E] weight matrix that is zero off the selection. The selection
    /// itself is made in plain C# from the probabilities.
    /// </summary>
    private static Tensor DenseReference(MixLoraFeedForward block, MixLoraMixture m, Tensor x, string strategy, int topK, double topP,
        int capacity = int.MaxValue)
    {
        long n = x.shape[0] * x.shape[1], h = x.shape[2];
        var xs = x.reshape(n, h);
        var p = nn.functional.softmax(xs.matmul(m.RouterWeight.t()), -1);   // [N, E]
        int e = (int)p.shape[1];
        var pv = p.detach().cpu().data<double>().ToArray();
        var mask = new double[n * e];
        var overflow = new double[n];
        var perExpert = new int[e];
        for (int t = 0; t < n; t++)
        {
            var order = Enumerable.Range(0, e).OrderByDescending(i => pv[t * e + i]).ToArray();
            if (strategy == MixLoraConfig.TopKStrategy)
                foreach (var i in order.Take(topK)) mask[t * e + i] = 1;
            else if (strategy == MixLoraConfig.TopPStrategy)
            {
                double cum = 0;
                foreach (var i in order)
                {
                    if (cum > topP) break;
                    mask[t * e + i] = 1;
                    cum += pv[t * e + i];
                }
            }
            else if (++perExpert[order[0]] <= capacity) mask[t * e + order[0]] = 1;   // one sequence in these tests
            else overflow[t] = 1;
        }
        var maskT = tensor(mask, [n, e], ScalarType.Float64);
        var w = p * maskT;
        if (strategy == MixLoraConfig.TopKStrategy) w = w / w.sum(-1, keepdim: true);

        Tensor Base(string proj) => ((LinearLayer)block.Dense.GetProjection(proj)).Weight;
        Tensor Merged(MixLoraExpert ex, string proj) =>
            ex.Get(proj) is { } d ? Base(proj) + d.B.matmul(d.A) * d.Scale : Base(proj);
        var y = zeros(n, h, dtype: ScalarType.Float64);
        for (int i = 0; i < e; i++)
        {
            var ex = m.Experts[i];
            var g = xs.matmul(Merged(ex, "gate_proj").t());
            var u = xs.matmul(Merged(ex, "up_proj").t());
            var hid = g * sigmoid(g) * u;
            y = y + w.narrow(1, i, 1) * hid.matmul(Merged(ex, "down_proj").t());
        }
        if (strategy == MixLoraConfig.SwitchStrategy)
            y = y + (p.max(-1).values * tensor(overflow, ScalarType.Float64)).unsqueeze(1) * xs;
        return y.view(x.shape);
    }

    public static IEnumerable<object[]> Strategies() =>
    [
        [MixLoraConfig.TopKStrategy, 2, int.MaxValue],
        [MixLoraConfig.TopKStrategy, 1, int.MaxValue],
        [MixLoraConfig.TopPStrategy, 0, int.MaxValue],
        [MixLoraConfig.SwitchStrategy, 1, 64],
        [MixLoraConfig.SwitchStrategy, 1, 3],   // small capacity: overflow tokens pass through
    ];

    [Theory]
    [MemberData(nameof(Strategies))]
    public void SparseDispatchEqualsTheDenseReferenceInOutputsAndGradients(string strategy, int topK, int capacity)
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config(strategy, experts: 5, topK: Math.Max(topK, 1)) with
        {
            TopP = 0.6, ExpertCapacity = Math.Min(capacity, 1000), JitterNoise = 0.0,
        };
        using var model = MixLoraTestKit.Model(config, 3, ScalarType.Float64);
        var block = (MixLoraFeedForward)model.Model.Layers[1].FeedForward;
        block.eval();   // no dropout: the two paths see the same inputs
        var m = block.GetAdapter("default");
        var trainable = MixLoraAdapters.PrepareForTraining(model);
        using var gen = new TorchSharp.torch.Generator(5, CPU);
        var x = randn([1, 16, 96], ScalarType.Float64, generator: gen).requires_grad_(true);
        var probe = randn([1, 16, 96], ScalarType.Float64, generator: gen);

        var sparse = block.forward(x, MixLoraTestKit.Context());
        (sparse * probe).sum().backward();
        var sparseGrads = trainable.Select(p => p.grad?.clone() ?? zeros_like(p)).Append(x.grad!.clone()).ToList();
        foreach (var p in trainable) p.grad?.zero_();
        x.grad!.zero_();

        var dense = DenseReference(block, m, x, strategy, topK, 0.6, capacity);
        (dense * probe).sum().backward();
        var denseGrads = trainable.Select(p => p.grad?.clone() ?? zeros_like(p)).Append(x.grad!.clone()).ToList();

        double err = TestModels.RelativeError(sparse, dense);
        Assert.True(err < 1e-12, $"output relative error {err:E3}");
        for (int i = 0; i < sparseGrads.Count; i++)
        {
            // relative to the tensor's own scale; an analytically zero gradient (the router under renormalised top-1)
            // is rounding noise in both paths
            double g = TestModels.RelativeError(sparseGrads[i], denseGrads[i]);
            double abs = (sparseGrads[i] - denseGrads[i]).abs().max().item<double>();
            Assert.True(g < 1e-10 || abs < 1e-13, $"gradient {i} relative error {g:E3} (absolute {abs:E3})");
        }
        int router = trainable.ToList().FindIndex(p => ReferenceEquals(p, m.RouterWeight));
        Assert.True(router >= 0);
        if (!(strategy == MixLoraConfig.TopKStrategy && topK == 1))
            Assert.True(denseGrads[router].abs().max().item<double>() > 1e-6, "the router receives a gradient");
    }

    private static (Tensor Output, List<Tensor> Grads) ForwardBackward(MixLoraFeedForward block, IReadOnlyList<TorchSharp.Modules.Parameter> trainable,
        Tensor x, Tensor probe)
    {
        foreach (var p in trainable) p.grad?.zero_();
        x.grad?.zero_();
        var y = block.forward(x, MixLoraTestKit.Context());
        (y * probe).sum().backward();
        return (y.detach().clone(), trainable.Select(p => p.grad?.clone() ?? zeros_like(p)).Append(x.grad!.clone()).ToList());
    }

    [Theory]
    [MemberData(nameof(Strategies))]
    public void TheLibrarysDenseDispatchEqualsSparseDispatchInOutputsAndGradients(string strategy, int topK, int capacity)
    {
        foreach (var dtype in new[] { ScalarType.Float64, ScalarType.Float32 })
        {
            using var scope = NewDisposeScope();
            var config = MixLoraTestKit.Config(strategy, experts: 5, topK: Math.Max(topK, 1)) with
            {
                TopP = 0.6, ExpertCapacity = Math.Min(capacity, 1000), JitterNoise = 0.0,
            };
            using var model = MixLoraTestKit.Model(config, 15, dtype);
            var block = (MixLoraFeedForward)model.Model.Layers[1].FeedForward;
            block.eval();
            var trainable = MixLoraAdapters.PrepareForTraining(model);
            using var gen = new TorchSharp.torch.Generator(6, CPU);
            var x = randn([2, 9, 96], generator: gen).to(dtype).requires_grad_(true);
            var probe = randn([2, 9, 96], generator: gen).to(dtype);

            Assert.Equal(MixLoraDispatch.Sparse, block.Dispatch);
            var (sparse, sparseGrads) = ForwardBackward(block, trainable, x, probe);
            MixLoraAdapters.SetDispatch(model, MixLoraDispatch.Dense);
            Assert.All(MixLoraAdapters.Blocks(model), b => Assert.Equal(MixLoraDispatch.Dense, b.Dispatch));
            var (dense, denseGrads) = ForwardBackward(block, trainable, x, probe);

            // rounding differs only in summation order: tolerance scaled by the dtype's epsilon
            double eps = dtype == ScalarType.Float64 ? 2.2e-16 : 1.2e-7;
            double err = TestModels.RelativeError(dense, sparse);
            Assert.True(err < 1e3 * eps, $"{dtype}: output relative error {err:E3}");
            for (int i = 0; i < sparseGrads.Count; i++)
            {
                double g = TestModels.RelativeError(denseGrads[i], sparseGrads[i]);
                // an analytically zero gradient (the router under renormalised top-1) is rounding noise in both paths
                double abs = (denseGrads[i] - sparseGrads[i]).abs().max().to(ScalarType.Float64).item<double>();
                Assert.True(g < 1e4 * eps || abs < 1e3 * eps, $"{dtype}: gradient {i} relative error {g:E3} (absolute {abs:E3})");
            }
        }
    }

    [Fact]
    public void DenseDispatchGivesTheSameModelLogitsAndDefaultIsSparse()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(MixLoraTestKit.Config(MixLoraConfig.TopPStrategy), 16);
        model.eval();
        Assert.All(MixLoraAdapters.Blocks(model), b => Assert.Equal(MixLoraDispatch.Sparse, b.Dispatch));
        var ids = tensor(new long[] { 1, 7, 9, 4, 200, 31, 5 }).unsqueeze(0);
        var sparse = model.Forward(ids, adapters: MixLoraTestKit.Default);
        MixLoraAdapters.SetDispatch(model, MixLoraDispatch.Dense);
        var dense = model.Forward(ids, adapters: MixLoraTestKit.Default);
        Assert.True(TestModels.RelativeError(dense, sparse) < 1e-5);
        MixLoraAdapters.SetDispatch(model, MixLoraDispatch.Sparse);
        Assert.True(model.Forward(ids, adapters: MixLoraTestKit.Default).equal(sparse).all().item<bool>());
    }

    [Fact]
    public void SparseDispatchMatchesTheDenseReferenceInFloat32WithinDTypeTolerance()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(MixLoraTestKit.Config(), 4);
        var block = (MixLoraFeedForward)model.Model.Layers[0].FeedForward;
        block.eval();
        var x = randn([2, 7, 96]);
        var sparse = block.forward(x, MixLoraTestKit.Context());
        using var model64 = MixLoraTestKit.Model(MixLoraTestKit.Config(), 4, ScalarType.Float64);
        var block64 = (MixLoraFeedForward)model64.Model.Layers[0].FeedForward;
        var dense = DenseReference(block64, block64.GetAdapter("default"), x.to(ScalarType.Float64), MixLoraConfig.TopKStrategy, 2, 0);
        double err = TestModels.RelativeError(sparse, dense);
        Assert.True(err < 2e-5, $"fp32 relative error {err:E3}");
    }

    [Fact]
    public void TopKOfAllExpertsWithAUniformRouterIsTheMeanOfTheExperts()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config(experts: 4, topK: 4);
        using var model = MixLoraTestKit.Model(config, 6, ScalarType.Float64);
        var block = (MixLoraFeedForward)model.Model.Layers[2].FeedForward;
        var m = block.GetAdapter("default");
        using (no_grad()) m.RouterWeight.zero_();
        block.eval();
        var x = randn([1, 5, 96], ScalarType.Float64);
        var y = block.forward(x, MixLoraTestKit.Context());

        // each expert alone: the dense SwiGLU with its merged weights
        Tensor Merged(MixLoraExpert ex, string proj)
        {
            var w = ((LinearLayer)block.Dense.GetProjection(proj)).Weight;
            var d = ex.Get(proj)!;
            return w + d.B.matmul(d.A) * d.Scale;
        }
        var mean = zeros_like(x);
        foreach (var ex in m.Experts)
        {
            var g = x.matmul(Merged(ex, "gate_proj").t());
            mean = mean + (nn.functional.silu(g) * x.matmul(Merged(ex, "up_proj").t())).matmul(Merged(ex, "down_proj").t()) / 4.0;
        }
        Assert.True(TestModels.RelativeError(y, mean) < 1e-12);
        // and the base MLP differs (the experts are not no-ops)
        Assert.True(TestModels.RelativeError(block.Dense.forward(x, MixLoraTestKit.Context()), mean) > 1e-3);
    }

    [Fact]
    public void AFreshAdapterIsAnExactNoOpAndRemovingItRestoresTheDenseMlp()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 8);
        var ids = tensor(new long[] { 1, 7, 9, 4, 200 }).unsqueeze(0);
        var before = model.Forward(ids);
        MixLoraAdapters.Attach(model, MixLoraTestKit.Config());
        Assert.All(model.Model.Layers, l => Assert.IsType<MixLoraFeedForward>(l.FeedForward));
        model.eval();
        Assert.True(TestModels.RelativeError(model.Forward(ids, adapters: MixLoraTestKit.Default), before) < 1e-6);   // B = 0: weights sum to 1, deltas 0
        MixLoraAdapters.Remove(model, "default");
        Assert.All(model.Model.Layers, l => Assert.IsType<LlamaMlp>(l.FeedForward));
        Assert.True(model.Forward(ids).equal(before).all().item<bool>());
    }

    [Fact]
    public void KvCachedDecodingGivesTheLogitsAndRoutesOfTheFullForward()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(MixLoraTestKit.Config(), 9);
        model.eval();
        var ids = TestModels.RandomIds(12, 512, 3);
        var full = new RoutingContext { Trace = new RoutingTrace() };
        var expected = model.Forward(tensor(ids).unsqueeze(0), routing: full, adapters: MixLoraTestKit.Default)[0];

        using var cache = model.CreateCache(1, 32);
        var stepwise = new RoutingContext { Trace = new RoutingTrace() };
        var logits = new List<Tensor> { model.Forward(tensor(ids[..5]).unsqueeze(0), cache, routing: stepwise, adapters: MixLoraTestKit.Default)[0] };
        for (int i = 5; i < ids.Length; i++)
            logits.Add(model.Forward(tensor(new[] { ids[i] }).unsqueeze(0), cache, routing: stepwise, adapters: MixLoraTestKit.Default)[0]);
        var actual = cat(logits, 0);
        double err = TestModels.RelativeError(actual, expected);
        Assert.True(err < 1e-4, $"relative error {err:E3}");

        var a = full.Trace!.Row(0);
        var b = stepwise.Trace!.Row(0);
        Assert.Equal(12, a.Count);
        Assert.Equal(12, b.Count);
        Assert.Equal(8, stepwise.Trace.StepCount);
        for (int t = 0; t < 12; t++)
        {
            Assert.Equal(t, b[t].Position);
            Assert.Equal(3, b[t].Layers.Count);
            for (int l = 0; l < 3; l++)
            {
                Assert.Equal(a[t].Layers[l].Experts, b[t].Layers[l].Experts);
                Assert.Equal(2, a[t].Layers[l].Experts.Length);
                Assert.Equal(1.0, a[t].Layers[l].Weights.Sum(), 5);
                for (int k = 0; k < 2; k++) Assert.Equal(a[t].Layers[l].Weights[k], b[t].Layers[l].Weights[k], 4);
            }
        }
    }

    [Fact]
    public void PaddedBatchesRouteEachRowAsAlone()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(MixLoraTestKit.Config(MixLoraConfig.TopPStrategy), 10);
        model.eval();
        long[] shortIds = [5, 6, 7], longIds = [9, 8, 7, 6, 5];
        var alone = new RoutingContext { Trace = new RoutingTrace() };
        var expected = model.Forward(tensor(shortIds).unsqueeze(0), routing: alone, adapters: MixLoraTestKit.Default)[0];
        var batch = tensor(new long[] { 0, 0, 5, 6, 7, 9, 8, 7, 6, 5 }).view(2, 5);
        var mask = tensor(new long[] { 0, 0, 1, 1, 1, 1, 1, 1, 1, 1 }).view(2, 5);
        var batched = new RoutingContext { Trace = new RoutingTrace(), Collector = new RouterLogitsCollector() };
        var logits = model.Forward(batch, attentionMask: mask, routing: batched, adapters: MixLoraTestKit.Default);
        Assert.True(TestModels.RelativeError(logits[0].narrow(0, 2, 3), expected) < 1e-4);
        var row0 = batched.Trace!.Row(0);
        Assert.Equal(3, row0.Count);   // padding is not traced
        Assert.Equal(5, batched.Trace.Row(1).Count);
        for (int t = 0; t < 3; t++)
            for (int l = 0; l < 3; l++)
                Assert.Equal(alone.Trace!.Row(0)[t].Layers[l].Experts, row0[t].Layers[l].Experts);
        Assert.Equal(3, batched.Collector!.Records.Count);
        Assert.NotNull(batched.Collector.Records[0].TokenMask);
        batched.Dispose();
    }

    [Fact]
    public void TrainingModeAppliesJitterAndDropoutAndEvalModeIsDeterministic()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config() with { LoraDropout = 0.3, JitterNoise = 0.1 };
        using var model = MixLoraTestKit.Model(config, 11);
        var ids = tensor(new long[] { 3, 1, 4, 1, 5, 9 }).unsqueeze(0);
        model.eval();
        Assert.True(model.Forward(ids, adapters: MixLoraTestKit.Default).equal(model.Forward(ids, adapters: MixLoraTestKit.Default)).all().item<bool>());
        model.train();
        Assert.False(model.Forward(ids, adapters: MixLoraTestKit.Default).equal(model.Forward(ids, adapters: MixLoraTestKit.Default)).all().item<bool>());
    }

    [Fact]
    public void OnlyTheAdapterTrainsAndEveryAdapterTensorGetsAGradient()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config(experts: 2, topK: 2);
        using var model = MixLoraTestKit.Model(config, 12);
        var trainable = MixLoraAdapters.PrepareForTraining(model);
        // 3 layers × (router + 4 attention × 2 + 2 experts × 3 projections × 2)
        Assert.Equal(3 * (1 + 8 + 12), trainable.Count);
        Assert.Equal(trainable.Count, model.parameters().Count(p => p.requires_grad));
        Assert.Equal(trainable.Sum(p => p.numel()), MixLoraAdapters.ParameterCount(model));
        var collector = new RouterLogitsCollector();
        var routing = new RoutingContext { Collector = collector };
        var logits = model.Forward(tensor(new long[] { 1, 2, 3, 4, 5, 6 }).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        var loss = logits.pow(2).mean() + MixLoraLosses.Compute(config, collector).Total;
        loss.backward();
        Assert.All(trainable, p => Assert.True(p.grad is not null && p.grad.abs().sum().item<float>() > 0));
        Assert.Null(model.Model.EmbedTokens.Weight.grad);
        routing.Dispose();
    }

    private sealed class FirstExpertPolicy : IRouterPolicy
    {
        public string Name => "first-expert";
        public List<int> Layers { get; } = [];

        public RoutingDecision Route(RouterStep step)
        {
            Layers.Add(step.Layer);
            var shape = step.Probabilities.shape[..^1];
            return new RoutingDecision
            {
                Experts = zeros([.. shape, 1], ScalarType.Int64),
                Weights = ones([.. shape, 1], step.Probabilities.dtype),
            };
        }
    }

    [Fact]
    public void ARouterPolicyPlugsInThroughTheRoutingContext()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(MixLoraTestKit.Config(), 13);
        model.eval();
        var policy = new FirstExpertPolicy();
        var routing = new RoutingContext { Policy = policy, Trace = new RoutingTrace() };
        model.Forward(tensor(new long[] { 4, 5, 6 }).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        Assert.Equal([0, 1, 2], policy.Layers);
        Assert.All(routing.Trace!.Row(0), t => Assert.All(t.Layers, l => Assert.Equal([0], l.Experts)));
    }

    [Fact]
    public void LiveTensorCountStaysFlatOverTrainingStepsAndCachedDecoding()
    {
        var config = MixLoraTestKit.Config();
        using var model = MixLoraTestKit.Model(config, 14);
        MixLoraAdapters.PrepareForTraining(model);
        var stats = TorchSharp.DisposeScopeManager.Statistics;
        using var routing = new RoutingContext { Collector = new RouterLogitsCollector() };
        var counts = new List<long>();
        model.train();
        for (int step = 0; step < 5; step++)
        {
            using var scope = NewDisposeScope();
            var ids = tensor(new long[] { 1, 2, 3, 4, 5, 6, 7, 8 }).view(2, 4);
            var logits = model.Forward(ids, attentionMask: ones(2, 4, dtype: ScalarType.Int64), routing: routing, adapters: MixLoraTestKit.Default);
            var loss = logits.pow(2).mean() + MixLoraLosses.Compute(config, routing.Collector!).Total;
            loss.backward();
            counts.Add(stats.ThreadTotalLiveCount);
        }
        Assert.Equal(counts[2], counts[^1]);

        model.eval();
        using var cache = model.CreateCache(1, 64);
        var trace = new RoutingContext { Trace = new RoutingTrace() };
        counts.Clear();
        using (no_grad())
            for (int step = 0; step < 10; step++)
            {
                using var scope = NewDisposeScope();
                model.Forward(tensor(new long[] { step + 1 }).unsqueeze(0), cache, routing: trace, adapters: MixLoraTestKit.Default);
                counts.Add(stats.ThreadTotalLiveCount);
            }
        Assert.Equal(counts[2], counts[^1]);
        Assert.Equal(10, trace.Trace!.Row(0).Count);
    }
}
