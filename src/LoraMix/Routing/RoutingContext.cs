using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>
/// The one routing context that travels with a forward call (through <see cref="Modeling.ForwardContext.Routing"/>):
/// the router policy, per-token privilege labels, a collector of router logits for the auxiliary losses, and a routing
/// trace. Keep one context per sequence (or batch) for the life of its KV cache: a policy's state (e.g. a routing
/// snapshot for frozen routing) lives in <see cref="PolicyState"/> across decoding steps.
/// </summary>
/// <remarks>Not thread-safe; like the model, use it from the model thread.</remarks>
public sealed class RoutingContext : IDisposable
{
    /// <summary>The router policy (default: <see cref="FreeRouterPolicy"/>).</summary>
    public IRouterPolicy Policy { get; init; } = FreeRouterPolicy.Instance;

    /// <summary>Per-token privilege labels <c>[B, T]</c> of the next forward step (meaning defined by the policy), or
    /// null. Set before each step.</summary>
    public Tensor? PrivilegeLabels { get; set; }

    /// <summary>Collects every layer's router logits and decisions of the latest forward call (for losses and
    /// statistics), or null.</summary>
    public RouterLogitsCollector? Collector { get; init; }

    /// <summary>Accumulates decisions over forward calls (prefill and every decoding step), or null.</summary>
    public RoutingTrace? Trace { get; init; }

    /// <summary>State a policy keeps across steps of the same sequence (owned by the policy).</summary>
    public object? PolicyState { get; set; }

    /// <summary>Number of forward calls seen.</summary>
    public int Steps { get; private set; }

    /// <summary>Shape and token mask of the current forward call.</summary>
    public long Batch { get; private set; }
    public long Length { get; private set; }
    public Tensor? TokenMask { get; private set; }

    /// <summary>Called by the model at the start of every forward call.</summary>
    public void BeginForward(long batch, long length, Tensor? tokenMask)
    {
        Batch = batch;
        Length = length;
        TokenMask = tokenMask;
        Steps++;
        Collector?.Clear();
        Trace?.BeginStep(batch, length, tokenMask);
    }

    /// <summary>Called by a mixture-of-experts block after routing.</summary>
    public void Record(int layer, Tensor logits, RoutingDecision decision, Tensor? tokenMask)
    {
        Collector?.Add(layer, logits, decision, tokenMask);
        Trace?.Add(layer, decision);
    }

    public void Dispose() => Collector?.Dispose();
}

/// <summary>One layer's router output for one forward call.</summary>
/// <param name="Layer">Decoder layer index.</param>
/// <param name="Logits">Router logits <c>[B, T, E]</c>, still attached to the autograd graph (for the losses).</param>
/// <param name="Experts">Chosen experts <c>[B, T, K]</c> (detached).</param>
/// <param name="Weights">Their weights <c>[B, T, K]</c> (detached).</param>
/// <param name="Active">Active slots <c>[B, T, K]</c>, or null when all are.</param>
/// <param name="TokenMask">Real tokens <c>[B, T]</c>, or null when nothing is padded.</param>
public sealed record RouterRecord(int Layer, Tensor Logits, Tensor Experts, Tensor Weights, Tensor? Active, Tensor? TokenMask);

/// <summary>
/// Holds the router records of the latest forward call, in layer order. It owns the tensors (they outlive the forward
/// pass's dispose scopes) and frees them when the next forward starts, on <see cref="Clear"/> and on dispose.
/// </summary>
public sealed class RouterLogitsCollector : IDisposable
{
    private readonly List<RouterRecord> _records = [];

    public IReadOnlyList<RouterRecord> Records => _records;

    /// <summary>The router logits of every layer, in layer order.</summary>
    public IReadOnlyList<Tensor> Logits => _records.Select(r => r.Logits).ToList();

    internal void Add(int layer, Tensor logits, RoutingDecision d, Tensor? tokenMask)
    {
        static Tensor Keep(Tensor t) => t.DetachFromDisposeScope();
        _records.Add(new RouterRecord(layer, Keep(logits.alias()), Keep(d.Experts.detach()), Keep(d.Weights.detach()),
            d.Active is null ? null : Keep(d.Active.detach()), tokenMask is null ? null : Keep(tokenMask.alias())));
    }

    public void Clear()
    {
        foreach (var r in _records)
        {
            r.Logits.Dispose();
            r.Experts.Dispose();
            r.Weights.Dispose();
            r.Active?.Dispose();
            r.TokenMask?.Dispose();
        }
        _records.Clear();
    }

    public void Dispose() => Clear();
}
