using LoraMix.Modeling;
using LoraMix.Routing;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Adapters.MixLora;

/// <summary>One expert: LoRA deltas (<see cref="LoraDelta"/>, the one LoRA implementation) on the targeted projections of
/// the shared frozen MLP. An untargeted projection uses the frozen weight alone.</summary>
public sealed class MixLoraExpert : nn.Module
{
    private readonly Dictionary<string, LoraDelta> _deltas = new(StringComparer.Ordinal);

    internal MixLoraExpert(LlamaConfig c, IReadOnlyList<string> targets, int rank, double alpha, double dropout, bool rsLora,
        Device device, ScalarType dtype, Generator generator) : base(nameof(MixLoraExpert))
    {
        foreach (var name in MixLoraConfig.ExpertProjectionOrder)
        {
            if (!targets.Contains(name)) continue;
            (long inF, long outF) = name == "down_proj" ? (c.IntermediateSize, c.HiddenSize) : (c.HiddenSize, c.IntermediateSize);
            var d = new LoraDelta(inF, outF, rank, alpha, dropout, rsLora, device, dtype, generator);
            _deltas[name] = d;
            register_module(name, d);
        }
    }

    /// <summary>The delta on <c>gate_proj</c>, <c>up_proj</c> or <c>down_proj</c>, or null when not targeted.</summary>
    public LoraDelta? Get(string projection) => _deltas.GetValueOrDefault(projection);

    /// <summary>Deltas by projection name, in gate, down, up order.</summary>
    public IEnumerable<(string Projection, LoraDelta Delta)> Deltas =>
        MixLoraConfig.ExpertProjectionOrder.Where(_deltas.ContainsKey).Select(n => (n, _deltas[n]));
}

/// <summary>One MixLoRA adapter inside a feed-forward block: the router gate and the experts.</summary>
public sealed class MixLoraMixture : nn.Module
{
    [ComponentName(Name = "moe_gate")] private readonly LinearLayer _router;
    [ComponentName(Name = "experts")] private readonly ModuleList<MixLoraExpert> _experts;

    internal MixLoraMixture(LlamaConfig c, MixLoraConfig config, Device device, ScalarType adapterDType, Generator generator)
        : base(nameof(MixLoraMixture))
    {
        Config = config;
        Strategy = config.CreateStrategy();
        Policy = config.CreatePolicy();
        Activation = MixLoraFeedForward.ActivationFunction(config.EffectiveActFn);
        _router = new LinearLayer(c.HiddenSize, config.NumExperts, false, device, adapterDType);
        using (no_grad())
        {
            using var w = empty(config.NumExperts, c.HiddenSize, dtype: ScalarType.Float32).normal_(0, config.EffectiveRouterInitRange, generator);
            _router.Weight.copy_(w);
        }
        _experts = new ModuleList<MixLoraExpert>();
        for (int e = 0; e < config.NumExperts; e++)
            _experts.Add(new MixLoraExpert(c, config.ExpertTargets, config.ExpertR, config.ExpertAlpha, config.ExpertDropout,
                config.ExpertUseRsLora, device, adapterDType, generator));
        if (config.LoraInit == "gaussian")
            using (no_grad())
                foreach (var ex in _experts)
                    foreach (var (_, d) in ex.Deltas) d.A.normal_(0, 1.0 / d.Rank, generator);
        RegisterComponents();
    }

    public MixLoraConfig Config { get; }
    public IRoutingStrategy Strategy { get; }

    /// <summary>The configured <c>router_policy</c> (used when the forward's <see cref="RoutingContext.Policy"/> is null).</summary>
    public IRouterPolicy Policy { get; }
    internal Func<Tensor, Tensor> Activation { get; }

    /// <summary>The router weight <c>[E, hidden]</c> (MoE-PEFT's <c>moe_gate.weight</c>), fp32.</summary>
    public Parameter RouterWeight => _router.Weight;

    public IReadOnlyList<MixLoraExpert> Experts => _experts.ToList();

    /// <summary>The experts without a copy (the forward pass indexes them per run).</summary>
    internal IList<MixLoraExpert> ExpertList => _experts;

    /// <summary>Every trainable tensor: the router weight, then each expert's A and B.</summary>
    public IEnumerable<Parameter> AdapterParameters()
    {
        yield return _router.Weight;
        foreach (var ex in _experts)
            foreach (var (_, d) in ex.Deltas)
            {
                yield return d.A;
                yield return d.B;
            }
    }
}

/// <summary>How a <see cref="MixLoraFeedForward"/> runs its experts. Not an adapter-config key (MoE-PEFT's format has
/// none): a runtime switch, set per block or for a whole model with <see cref="MixLoraAdapters.SetDispatch"/>.</summary>
public enum MixLoraDispatch
{
    /// <summary>Each expert runs on its routed tokens only (the default).</summary>
    Sparse,

    /// <summary>Every expert runs on every token; the outputs are masked by the routing weights (zero for unselected
    /// experts). The same function as <see cref="Sparse"/> up to rounding; a reference for tests and benchmarks.</summary>
    Dense,
}

/// <summary>
/// The MixLoRA feed-forward block: the frozen SwiGLU MLP of a layer shared by a router and LoRA experts
/// (research/mixlora.md §3). For the rows that select one of its mixtures (<see cref="ForwardContext.Adapters"/>), per token:
/// the router policy (the routing context's, else the
/// adapter's <c>router_policy</c>) runs the fp32 router on the block input (the post-attention-norm hidden state) of the
/// tokens it routes, softmax, strategy selection (top-k renormalised, top-p, or switch); then sparse dispatch — the base
/// <c>gate</c> and <c>up</c> projections run once for all tokens, the routed (token, slot) pairs are grouped by expert and
/// gathered once, each expert's LoRA deltas run only on its own rows, the base <c>down</c> projection runs once over all
/// routed rows, and the results are summed with the routing weights in fp32 (<c>index_add</c>). <see cref="Dispatch"/>
/// selects the dense variant instead (every expert on every token, for comparison). Jitter and the experts' LoRA dropout act
/// in training mode only. Rows that select none of its mixtures run the dense MLP. State-dict keys of the base MLP are unchanged (<c>mlp.gate_proj.weight</c>, ...);
/// adapters live under <c>mlp.moe.&lt;adapter&gt;.*</c>.
/// </summary>
public sealed class MixLoraFeedForward : FeedForwardBlock
{
    [ComponentName(Name = "moe")] private readonly NamedModules<MixLoraMixture> _mixtures = new();
    private readonly LlamaMlp _dense;
    private readonly LlamaConfig _config;

    /// <summary>Wraps a layer's dense MLP (its projection modules are shared, not copied).</summary>
    public MixLoraFeedForward(LlamaMlp dense, LlamaConfig config, int layer) : base(nameof(MixLoraFeedForward))
    {
        _dense = dense;
        _config = config;
        Layer = layer;
        // the dense MLP's projections under this block's own names (mlp.gate_proj.weight, ...): shared, not copied
        foreach (var name in LlamaMlp.ProjectionNames) register_module(name, dense.GetProjection(name));
        RegisterComponents();
    }

    /// <summary>The decoder layer index (reported to the routing context).</summary>
    public int Layer { get; }

    /// <summary>Sparse (default) or dense expert dispatch; both compute the same function.</summary>
    public MixLoraDispatch Dispatch { get; set; } = MixLoraDispatch.Sparse;

    /// <summary>The wrapped dense MLP (restored when the last adapter is removed).</summary>
    public LlamaMlp Dense => _dense;

    public IReadOnlyList<string> AdapterNames => _mixtures.Names;

    /// <summary>Replaces a projection of the shared MLP (e.g. with an adapted linear layer for a LoRA adapter that
    /// targets <c>mlp.*</c>), in the wrapped dense MLP and in this block, under the same state-dict name.</summary>
    public void SetProjection(string name, LinearSlot module)
    {
        _dense.SetProjection(name, module);
        register_module(name, null!);
        register_module(name, module);
    }

    private LinearSlot Gate => _dense.GetProjection("gate_proj");
    private LinearSlot Up => _dense.GetProjection("up_proj");
    private LinearSlot Down => _dense.GetProjection("down_proj");

    public bool HasAdapter(string name) => _mixtures.TryGet(name, out _);

    public MixLoraMixture GetAdapter(string name) =>
        _mixtures.TryGet(name, out var m) ? m : throw new ArgumentException($"no MixLoRA adapter '{name}' on layer {Layer}; have: {string.Join(", ", AdapterNames)}");

    /// <summary>Adds a freshly initialised mixture (router N(0, σ), expert A per <c>lora_init</c>, expert B zero).</summary>
    public MixLoraMixture AddAdapter(string name, MixLoraConfig config, Generator generator)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.')) throw new ArgumentException($"adapter name '{name}' must be non-empty and contain no '.'");
        if (HasAdapter(name)) throw new ArgumentException($"MixLoRA adapter '{name}' already exists on layer {Layer}");
        var weight = Gate.Weight;
        var mixture = new MixLoraMixture(_config, config, weight.device, AdapterDType(weight.dtype), generator);
        _mixtures.Add(name, mixture);
        return mixture;
    }

    public void RemoveAdapter(string name)
    {
        var m = GetAdapter(name);
        _mixtures.Remove(name);
        m.Dispose();
    }

    /// <summary>Router and LoRA dtype: fp32, or fp64 for an fp64 model (MoE-PEFT keeps both in full precision).</summary>
    public static ScalarType AdapterDType(ScalarType modelDType) => modelDType == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;

    /// <summary>The activation for an <c>act_fn</c> name (transformers' ACT2FN names).</summary>
    public static Func<Tensor, Tensor> ActivationFunction(string name) => name switch
    {
        "silu" => x => nn.functional.silu(x),
        "relu" => x => nn.functional.relu(x),
        "gelu" => x => nn.functional.gelu(x),
        "gelu_pytorch_tanh" or "gelu_new" => x => 0.5 * x * (1 + tanh(Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x.pow(3)))),
        _ => throw new ArgumentException($"act_fn '{name}' is not supported; use one of {string.Join(", ", MixLoraConfig.ActivationFunctions)}"),
    };

    public override IEnumerable<IRouterPolicy> RouterPoliciesFor(RoutingContext? routing, AdapterSelection? adapters)
    {
        if (adapters is null) yield break;
        foreach (var name in adapters.Names)
            if (_mixtures.TryGet(name, out var m)) yield return routing?.Policy ?? m.Policy;
    }

    /// <summary>
    /// Each row runs the mixture of the adapter it selects (<see cref="ForwardContext.Adapters"/>), or the dense MLP when
    /// it selects none of this block's. When every row selects the same mixture the whole batch runs as one; otherwise the
    /// rows are gathered per mixture (and the dense rows together), each group runs as a sub-batch with its own router and
    /// router policy, and the outputs are put back in row order.
    /// </summary>
    public override Tensor forward(Tensor x, ForwardContext ctx)
    {
        var groups = ctx.Adapters is { } adapters ? adapters.Uses.Where(u => _mixtures.TryGet(u.Name, out _)).ToList() : [];
        if (groups.Count == 0) return _dense.forward(x, ctx);
        foreach (var g in groups)
            if (g.UniformWeight != 1.0)
                throw new ArgumentException($"MixLoRA adapter '{g.Name}' was selected with weight {g.Weights.First(w => w != 1.0)}; a mixture of experts runs at weight 1 only");
        if (groups.Count == 1 && groups[0].AllRows) return MixtureForward(GetAdapter(groups[0].Name), groups[0].Name, x, ctx);

        using var scope = NewDisposeScope();
        long b = x.shape[0];
        var owner = new string?[b];
        foreach (var g in groups)
            foreach (long r in g.Rows)
                owner[r] = owner[r] is null ? g.Name
                    : throw new ArgumentException($"row {r} composes two MixLoRA adapters ('{owner[r]}' and '{g.Name}'); a row may run one mixture of experts at most");
        var output = zeros_like(x);
        Tensor Run(int[] rows, Func<Tensor, ForwardContext, Tensor> block)
        {
            var index = tensor(rows.Select(r => (long)r).ToArray(), device: x.device);
            return output.index_copy(0, index, block(x.index_select(0, index), ctx.ForRows(rows, index)));
        }
        var dense = Enumerable.Range(0, (int)b).Where(r => owner[r] is null).ToArray();
        if (dense.Length > 0) output = Run(dense, (xs, c) => _dense.forward(xs, c));
        foreach (var g in groups)
            output = Run(g.Rows.Select(r => (int)r).ToArray(), (xs, c) => MixtureForward(GetAdapter(g.Name), g.Name, xs, c));
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>Every row of <paramref name="x"/> through <paramref name="mixture"/>: route, then sparse (or dense) dispatch.</summary>
    private Tensor MixtureForward(MixLoraMixture mixture, string name, Tensor x, ForwardContext ctx)
    {
        var cfg = mixture.Config;
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], h = x.shape[2];
        var routerDType = mixture.RouterWeight.dtype;
        var xs = x.reshape(b * t, h);
        double jitter = cfg.EffectiveJitterNoise;
        if (training && jitter > 0)
            xs = xs * empty_like(xs).uniform_(1 - jitter, 1 + jitter);   // MoE-PEFT: the experts see the jittered input too

        var routerInput = xs.to(routerDType);
        var routing = ctx.Routing;
        var policy = routing?.Policy ?? mixture.Policy;
        var routerWeight = mixture.RouterWeight;
        var step = new RouterStep
        {
            Layer = Layer, Input = routerInput.view(b, t, h), Router = input => nn.functional.linear(input, routerWeight),
            Strategy = mixture.Strategy, Context = ctx, Adapter = name,
        };
        var decision = policy.Route(step);
        routing?.Record(Layer, decision.Logits ?? step.Logits, decision, ctx.TokenMask, ctx.Rows, name);

        // the frozen gate and up projections, once for all tokens (with the LoRA updates of the rows' other adapters)
        var gateBase = Gate.call(xs.view(b, t, h), ctx).reshape(b * t, -1);
        var upBase = Up.call(xs.view(b, t, h), ctx).reshape(b * t, -1);
        if (ctx.Adapters is { } adapters && Down is AdaptedLinear downAdapted
            && adapters.Uses.FirstOrDefault(u => downAdapted.HasAdapter(u.Name) && !downAdapted.IsMerged(u.Name)) is { } clash)
            throw new NotSupportedException($"layer {Layer}: adapter '{clash.Name}' adapts mlp.down_proj and is composed with MixLoRA adapter " +
                                            $"'{name}' in the same row; run them in separate rows, or merge '{clash.Name}' first");
        var y = Dispatch == MixLoraDispatch.Dense
            ? DenseDispatch(mixture, xs, gateBase, upBase, decision, routerDType)
            : SparseDispatch(mixture, xs, gateBase, upBase, decision, routerDType);
        if (decision.Passthrough is { } pass) y = y + pass.reshape(b * t, 1).to(routerDType) * xs.to(routerDType);
        if (training && cfg.RoutingStrategy == MixLoraConfig.SwitchStrategy && cfg.FfnDropout > 0)
            y = nn.functional.dropout(y, cfg.FfnDropout, true);
        return y.to(x.dtype).view(b, t, h).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Sparse dispatch: the (token, slot) pairs are sorted by expert and gathered once (the block input and the frozen
    /// gate/up outputs); each expert's LoRA runs on its contiguous run of rows only; the frozen down projection runs once
    /// on all gathered rows; the weighted rows are scattered back into the tokens in <paramref name="accDType"/>.
    /// </summary>
    private Tensor SparseDispatch(MixLoraMixture mixture, Tensor xs, Tensor gateBase, Tensor upBase, RoutingDecision d, ScalarType accDType)
    {
        long n = xs.shape[0], k = d.Experts.shape[^1];
        int numExperts = mixture.Strategy.NumExperts;
        var experts = d.Experts.reshape(-1);
        var weights = d.Weights.reshape(-1).to(accDType);
        var token = arange(n * k, dtype: ScalarType.Int64, device: xs.device).div(k, rounding_mode: RoundingMode.floor);
        if (d.Active is { } active)
        {
            var keep = active.reshape(-1).nonzero().squeeze(1);
            experts = experts.index_select(0, keep);
            weights = weights.index_select(0, keep);
            token = token.index_select(0, keep);
        }
        // group the (token, slot) pairs by expert: one sort, one host copy of the counts
        var order = experts.argsort();
        var sortedToken = token.index_select(0, order);
        var sortedWeight = weights.index_select(0, order);
        var counts = experts.bincount(null, numExperts).cpu().data<long>().ToArray();
        var segments = Enumerable.Range(0, numExperts).Where(e => counts[e] > 0).ToArray();
        var sizes = segments.Select(e => counts[e]).ToArray();
        if (sizes.Length == 0) return zeros(n, xs.shape[1], dtype: accDType, device: xs.device);

        var xRows = xs.index_select(0, sortedToken);
        var xParts = xRows.to(mixture.RouterWeight.dtype).split(sizes);
        var parts = segments.Select((e, i) => (e, xParts[i])).ToList();
        var gate = AddDeltas(gateBase.index_select(0, sortedToken), mixture, "gate_proj", parts);
        var up = AddDeltas(upBase.index_select(0, sortedToken), mixture, "up_proj", parts);
        var rows = ExpertOutputs(mixture, gate, up, segments, sizes);   // [M, hidden]
        return zeros(n, xs.shape[1], dtype: accDType, device: xs.device)
            .index_add(0, sortedToken, rows.to(accDType) * sortedWeight.unsqueeze(1), 1.0);
    }

    /// <summary>
    /// Dense dispatch (<see cref="MixLoraDispatch.Dense"/>, a reference for benchmarks and tests): every expert runs on
    /// every token and the outputs are summed with a <c>[N, E]</c> weight matrix that is zero off the selection. Same
    /// result as <see cref="SparseDispatch"/> up to rounding, E/k times the expert work.
    /// </summary>
    private Tensor DenseDispatch(MixLoraMixture mixture, Tensor xs, Tensor gateBase, Tensor upBase, RoutingDecision d, ScalarType accDType)
    {
        long n = xs.shape[0], h = xs.shape[1], inter = gateBase.shape[1];
        int numExperts = mixture.Strategy.NumExperts;
        var experts = d.Experts.reshape(n, -1);
        var weights = d.Weights.reshape(n, -1).to(accDType);
        if (d.Active is { } active) weights = where(active.reshape(n, -1), weights, zeros_like(weights));
        var mix = zeros(n, numExperts, dtype: accDType, device: xs.device).scatter_add(1, experts, weights);   // [N, E]

        var xa = xs.to(mixture.RouterWeight.dtype);
        var segments = Enumerable.Range(0, numExperts).ToArray();
        var sizes = segments.Select(_ => n).ToArray();
        var parts = segments.Select(e => (e, xa)).ToList();
        // the frozen gate/up outputs broadcast over the experts: [E, N, I] viewed as E runs of N rows
        Tensor Broadcast(Tensor baseOut, string proj) =>
            AddDeltas(baseOut.unsqueeze(0).expand(numExperts, n, inter).reshape(numExperts * n, inter), mixture, proj, parts);
        var rows = ExpertOutputs(mixture, Broadcast(gateBase, "gate_proj"), Broadcast(upBase, "up_proj"), segments, sizes);
        return (rows.to(accDType).view(numExperts, n, h) * mix.t().unsqueeze(2)).sum(0L);   // 0L: a literal 0 would bind to sum(ScalarType)
    }

    /// <summary>Adds each expert's LoRA delta on <paramref name="projection"/> to its run of <paramref name="baseRows"/>
    /// (runs in the order of <paramref name="parts"/>, each part the expert's adapter-dtype inputs).</summary>
    private static Tensor AddDeltas(Tensor baseRows, MixLoraMixture mixture, string projection, IReadOnlyList<(int Expert, Tensor Input)> parts)
    {
        if (mixture.ExpertList[0].Get(projection) is null) return baseRows;
        var deltas = parts.Select(p => mixture.ExpertList[p.Expert].Get(projection)!.call(p.Input)).ToList();
        var delta = deltas.Count == 1 ? deltas[0] : cat(deltas, 0);
        return baseRows + delta.to(baseRows.dtype);
    }

    /// <summary>The experts' SwiGLU outputs for runs of rows: activation, the frozen down projection once over all rows,
    /// plus each expert's down-projection delta on its own run (<paramref name="segments"/> experts, <paramref name="sizes"/> rows each).</summary>
    private Tensor ExpertOutputs(MixLoraMixture mixture, Tensor gate, Tensor up, int[] segments, long[] sizes)
    {
        var hidden = mixture.Activation(gate) * up;
        var y = Down.call(hidden, null);   // expert rows are gathered tokens, not batch rows: the base map alone
        if (mixture.ExpertList[0].Get("down_proj") is null) return y;
        var hParts = hidden.to(mixture.RouterWeight.dtype).split(sizes);
        return AddDeltas(y, mixture, "down_proj", segments.Select((e, i) => (e, hParts[i])).ToList());
    }
}
