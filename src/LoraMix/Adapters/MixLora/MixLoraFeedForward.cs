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

/// <summary>
/// The MixLoRA feed-forward block: the frozen SwiGLU MLP of a layer shared by a router and LoRA experts
/// (research/mixlora.md §3). For the active adapter, per token: the router policy (the routing context's, else the
/// adapter's <c>router_policy</c>) runs the fp32 router on the block input (the post-attention-norm hidden state) of the
/// tokens it routes, softmax, strategy selection (top-k renormalised, top-p, or switch); then sparse dispatch — the base <c>gate</c> and <c>up</c> projections run once for all
/// tokens, each expert runs only on its routed tokens (<c>index_select</c>), and the results are summed with the routing
/// weights in fp32 (<c>index_add_</c>). Jitter and the experts' LoRA dropout act in training mode only. With no active
/// adapter it is the dense MLP. State-dict keys of the base MLP are unchanged (<c>mlp.gate_proj.weight</c>, ...);
/// adapters live under <c>mlp.moe.&lt;adapter&gt;.*</c>.
/// </summary>
public sealed class MixLoraFeedForward : FeedForwardBlock
{
    [ComponentName(Name = "gate_proj")] private readonly nn.Module<Tensor, Tensor> _gate;
    [ComponentName(Name = "up_proj")] private readonly nn.Module<Tensor, Tensor> _up;
    [ComponentName(Name = "down_proj")] private readonly nn.Module<Tensor, Tensor> _down;
    [ComponentName(Name = "moe")] private readonly MixtureSet _mixtures = new();
    private readonly LlamaMlp _dense;
    private readonly LlamaConfig _config;
    private string? _active;

    /// <summary>Wraps a layer's dense MLP (its projection modules are shared, not copied).</summary>
    public MixLoraFeedForward(LlamaMlp dense, LlamaConfig config, int layer) : base(nameof(MixLoraFeedForward))
    {
        _dense = dense;
        _config = config;
        Layer = layer;
        _gate = dense.GetProjection("gate_proj");
        _up = dense.GetProjection("up_proj");
        _down = dense.GetProjection("down_proj");
        RegisterComponents();
    }

    /// <summary>The decoder layer index (reported to the routing context).</summary>
    public int Layer { get; }

    /// <summary>The wrapped dense MLP (restored when the last adapter is removed).</summary>
    public LlamaMlp Dense => _dense;

    public IReadOnlyList<string> AdapterNames => _mixtures.Names;

    /// <summary>The adapter used in the forward pass, or null for the dense MLP.</summary>
    public string? ActiveAdapter
    {
        get => _active;
        set
        {
            if (value is not null && !_mixtures.TryGet(value, out _))
                throw new ArgumentException($"no MixLoRA adapter '{value}' on layer {Layer}; have: {string.Join(", ", AdapterNames)}");
            _active = value;
        }
    }

    public bool HasAdapter(string name) => _mixtures.TryGet(name, out _);

    public MixLoraMixture GetAdapter(string name) =>
        _mixtures.TryGet(name, out var m) ? m : throw new ArgumentException($"no MixLoRA adapter '{name}' on layer {Layer}; have: {string.Join(", ", AdapterNames)}");

    /// <summary>Adds a freshly initialised mixture (router N(0, σ), expert A per <c>lora_init</c>, expert B zero).</summary>
    public MixLoraMixture AddAdapter(string name, MixLoraConfig config, Generator generator)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.')) throw new ArgumentException($"adapter name '{name}' must be non-empty and contain no '.'");
        if (HasAdapter(name)) throw new ArgumentException($"MixLoRA adapter '{name}' already exists on layer {Layer}");
        var weight = _gate switch
        {
            LinearLayer l => l.Weight,
            AdaptedLinear a => a.Weight,
            var other => throw new LoraMixException($"layer {Layer}: gate_proj holds a {other.GetType().Name}, not a linear layer"),
        };
        var mixture = new MixLoraMixture(_config, config, weight.device, AdapterDType(weight.dtype), generator);
        _mixtures.Add(name, mixture);
        return mixture;
    }

    public void RemoveAdapter(string name)
    {
        var m = GetAdapter(name);
        _mixtures.Remove(name);
        if (_active == name) _active = null;
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

    public override Tensor forward(Tensor x, ForwardContext ctx)
    {
        if (_active is null) return _dense.forward(x, ctx);
        var mixture = GetAdapter(_active);
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
            Strategy = mixture.Strategy, Context = ctx,
        };
        var decision = policy.Route(step);
        routing?.Record(Layer, decision.Logits ?? step.Logits, decision, ctx.TokenMask);

        var y = SparseDispatch(mixture, xs, decision, routerDType);
        if (decision.Passthrough is { } pass) y = y + pass.reshape(b * t, 1).to(routerDType) * xs.to(routerDType);
        if (training && cfg.RoutingStrategy == MixLoraConfig.SwitchStrategy && cfg.FfnDropout > 0)
            y = nn.functional.dropout(y, cfg.FfnDropout, true);
        return y.to(x.dtype).view(b, t, h).MoveToOuterDisposeScope();
    }

    /// <summary>Runs each expert on its routed tokens only and sums the weighted outputs in <paramref name="accDType"/>.</summary>
    private Tensor SparseDispatch(MixLoraMixture mixture, Tensor xs, RoutingDecision d, ScalarType accDType)
    {
        long n = xs.shape[0], k = d.Experts.shape[^1];
        int numExperts = mixture.Strategy.NumExperts;
        var dtype = xs.dtype;
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

        // the frozen gate and up projections, once for all tokens
        var gateBase = _gate.call(xs);
        var upBase = _up.call(xs);
        var output = zeros(n, xs.shape[1], dtype: accDType, device: xs.device);
        var act = mixture.Activation;
        var adapterDType = mixture.RouterWeight.dtype;
        long offset = 0;
        for (int e = 0; e < numExperts; e++)
        {
            long count = counts[e];
            if (count == 0) continue;
            var idx = sortedToken.narrow(0, offset, count);
            var w = sortedWeight.narrow(0, offset, count);
            offset += count;
            var expert = mixture.Experts[e];
            var xe = xs.index_select(0, idx);
            var g = gateBase.index_select(0, idx);
            var u = upBase.index_select(0, idx);
            if (expert.Get("gate_proj") is { } dg) g = g + dg.call(xe.to(adapterDType)).to(dtype);
            if (expert.Get("up_proj") is { } du) u = u + du.call(xe.to(adapterDType)).to(dtype);
            var hidden = act(g) * u;
            var ye = _down.call(hidden);
            if (expert.Get("down_proj") is { } dd) ye = ye + dd.call(hidden.to(adapterDType)).to(dtype);
            output.index_add_(0, idx, ye.to(accDType) * w.unsqueeze(1), 1.0);
        }
        return output;
    }
}

/// <summary>Named mixtures registered as child modules as they are added (so train/eval, parameters() and
/// state_dict() always see them).</summary>
internal sealed class MixtureSet : nn.Module
{
    private readonly List<(string Name, MixLoraMixture Mixture)> _items = [];

    public MixtureSet() : base(nameof(MixtureSet)) { }

    public IReadOnlyList<string> Names => _items.Select(i => i.Name).ToList();

    public bool TryGet(string name, out MixLoraMixture mixture)
    {
        foreach (var (n, m) in _items)
            if (n == name) { mixture = m; return true; }
        mixture = null!;
        return false;
    }

    public void Add(string name, MixLoraMixture mixture)
    {
        register_module(name, mixture);
        _items.Add((name, mixture));
    }

    public void Remove(string name)
    {
        register_module(name, null!);
        _items.RemoveAll(i => i.Name == name);
    }
}
