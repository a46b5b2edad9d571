using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>
/// The one routing context that travels with a forward call (through <see cref="IRouterStepContext.Routing"/> of the model's forward context):
/// the router policy, per-token privilege labels, a collector of router logits for the auxiliary losses, and a routing
/// trace. Keep one context per sequence (or batch) for the life of its KV cache: a policy's state (e.g. a routing
/// snapshot for frozen routing) lives in <see cref="PolicyState"/> across decoding steps. A forward call that starts a
/// sequence (no cache, or an empty one) resets that state, so one context can serve many training batches. A call that
/// continues a cache needs the state of the calls that filled it: the privileged policy refuses a context without it
/// (or with the state of another cache), so the freeze cannot be lost by switching contexts.
/// </summary>
/// <remarks>Not thread-safe; like the model, use it from the model thread.</remarks>
public sealed class RoutingContext : IDisposable
{
    private Tensor? _ownedLabels;

    /// <summary>The router policy for every mixture this call runs, or null (default) for each selected adapter's
    /// configured <c>router_policy</c>.</summary>
    public IRouterPolicy? Policy { get; init; }

    /// <summary>Called once per forward call and X-LoRA adapter with the adapter's name and the scalings
    /// <c>[B, T, L, N]</c> the scaled pass used (detached from the graph; rows that do not select it hold zeros). A log
    /// that copies what it needs never keeps a training graph alive.</summary>
    public Action<string, Tensor>? OnScalings { get; init; }

    /// <summary>
    /// Per-token privilege labels <c>[B, T]</c> of the next forward step, integer values of <see cref="Privilege"/>
    /// (<c>Untrusted</c> = 0), aligned with the (left-padded) input ids; padding labels are ignored. Required by the
    /// privileged policy for every step, decoding steps included. Set before each step (see <see cref="SetPrivileges(IReadOnlyList{IReadOnlyList{Privilege}}, long?)"/>).
    /// </summary>
    public Tensor? PrivilegeLabels
    {
        get => _labels;
        set
        {
            if (!ReferenceEquals(value, _ownedLabels)) { _ownedLabels?.Dispose(); _ownedLabels = null; }
            _labels = value;
        }
    }
    private Tensor? _labels;

    /// <summary>Sets <see cref="PrivilegeLabels"/> from one label array per row, left-padded to <paramref name="length"/>
    /// (default: the longest row) as the input ids are. The context owns the tensor.</summary>
    public void SetPrivileges(IReadOnlyList<IReadOnlyList<Privilege>> rows, long? length = null)
    {
        ArgumentNullException.ThrowIfNull(rows);
        if (rows.Count == 0) throw new ArgumentException("no rows", nameof(rows));
        long t = length ?? rows.Max(r => r.Count);
        var values = new byte[rows.Count * t];
        for (int b = 0; b < rows.Count; b++)
        {
            var row = rows[b];
            if (row.Count > t) throw new ArgumentException($"row {b} has {row.Count} labels, more than the length {t}", nameof(rows));
            long pad = t - row.Count;
            for (int i = 0; i < row.Count; i++) values[b * t + pad + i] = (byte)row[i];
            for (long i = 0; i < pad; i++) values[b * t + i] = (byte)Privilege.System;   // padding: ignored
        }
        Own(tensor(values, [rows.Count, t], dtype: ScalarType.Byte));
    }

    /// <summary>Sets <see cref="PrivilegeLabels"/> to one label for every token of a <c>[batch, length]</c> step (e.g.
    /// <see cref="Privilege.Assistant"/> for generated tokens). The context owns the tensor.</summary>
    public void SetPrivileges(Privilege privilege, long batch, long length = 1) =>
        Own(full([batch, length], (byte)privilege, dtype: ScalarType.Byte));

    /// <summary>Uses <paramref name="labels"/> as the labels of the next forward call without taking or freeing the
    /// current ones; disposing the result puts the current ones back (the model's split of a privileged prefill).</summary>
    internal IDisposable SwapLabels(Tensor labels)
    {
        var (saved, savedOwned) = (_labels, _ownedLabels);
        _labels = labels;
        _ownedLabels = null;
        return new Restore(() => { _labels = saved; _ownedLabels = savedOwned; });
    }

    private sealed class Restore(Action restore) : IDisposable
    {
        private Action? _restore = restore;
        public void Dispose() { _restore?.Invoke(); _restore = null; }
    }

    private void Own(Tensor labels)
    {
        labels = labels.DetachFromDisposeScope();
        PrivilegeLabels = null;
        _ownedLabels = labels;
        _labels = labels;
    }

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

    /// <summary>True when the current forward call continues a sequence held in a KV cache.</summary>
    public bool IsContinuation { get; private set; }

    /// <summary>The KV cache of the current forward call (null: cache-free) and the first slot of its tokens.</summary>
    public IRoutedSequenceCache? CurrentCache { get; private set; }
    public long CurrentStart { get; private set; }

    /// <summary>Called by the model at the start of every forward call. <paramref name="continuation"/> is true when the
    /// call continues a sequence held in a KV cache; otherwise the policy state is reset (a new sequence).</summary>
    public void BeginForward(long batch, long length, Tensor? tokenMask, bool continuation = false, IRoutedSequenceCache? cache = null, long start = 0)
    {
        if (!continuation) ResetPolicyState();
        IsContinuation = continuation;
        CurrentCache = cache;
        CurrentStart = start;
        Batch = batch;
        Length = length;
        TokenMask = tokenMask;
        Steps++;
        Collector?.Clear();
        Trace?.BeginStep(batch, length, tokenMask);
    }

    /// <summary>Called by a mixture-of-experts block after routing. The collector counts the real tokens the router
    /// routed itself (<paramref name="tokenMask"/> and <see cref="RoutingDecision.Routed"/>). <paramref name="rows"/>: the
    /// rows of the call the decision covers when the block routed a sub-batch (a batch mixing adapters), else null.</summary>
    /// <exception cref="NotSupportedException">A collector is attached and the block routed a sub-batch: router losses
    /// train one adapter, on batches whose rows all select it.</exception>
    public void Record(int layer, Tensor logits, RoutingDecision decision, Tensor? tokenMask, int[]? rows = null, string? adapter = null)
    {
        if (Collector is not null)
        {
            if (rows is not null)
                throw new NotSupportedException($"the router-logit collector needs every row of the batch on one mixture adapter, but layer {layer} " +
                                                $"routed {rows.Length} of {Batch} rows for adapter '{adapter}'; collect router logits on batches of one adapter");
            using var scope = NewDisposeScope();
            Tensor? counted = decision.Routed is null ? tokenMask
                : tokenMask is null ? decision.Routed : tokenMask.to(ScalarType.Bool).logical_and(decision.Routed);
            Collector.Add(layer, logits, decision, counted);
        }
        Trace?.Add(layer, decision, rows);
    }

    /// <summary>Disposes and forgets <see cref="PolicyState"/> (a new sequence starts).</summary>
    public void ResetPolicyState()
    {
        (PolicyState as IDisposable)?.Dispose();
        PolicyState = null;
    }

    public void Dispose()
    {
        Collector?.Dispose();
        ResetPolicyState();
        PrivilegeLabels = null;
    }
}

/// <summary>One layer's router output for one forward call.</summary>
/// <param name="Layer">Decoder layer index.</param>
/// <param name="Logits">Router logits <c>[B, T, E]</c>, still attached to the autograd graph (for the losses).</param>
/// <param name="Experts">Chosen experts <c>[B, T, K]</c> (detached).</param>
/// <param name="Weights">Their weights <c>[B, T, K]</c> (detached).</param>
/// <param name="Active">Active slots <c>[B, T, K]</c>, or null when all are.</param>
/// <param name="TokenMask">The tokens to count <c>[B, T]</c> in losses and statistics: real tokens routed by the router on
/// their own hidden state (padding, and frozen tokens under the privileged policy, excluded), or null for every token.</param>
public sealed record RouterRecord(int Layer, Tensor Logits, Tensor Experts, Tensor Weights, Tensor? Active, Tensor? TokenMask)
{
    /// <summary>Frees its tensors (the holder of the record owns them).</summary>
    internal void DisposeTensors()
    {
        Logits.Dispose();
        Experts.Dispose();
        Weights.Dispose();
        Active?.Dispose();
        TokenMask?.Dispose();
    }
}

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

    /// <summary>Hands the records over to the caller (who disposes their tensors) and forgets them.</summary>
    internal List<RouterRecord> Take()
    {
        var taken = _records.ToList();
        _records.Clear();
        return taken;
    }

    /// <summary>Replaces the records (taking ownership of the new tensors, freeing the old).</summary>
    internal void Replace(IReadOnlyList<RouterRecord> records)
    {
        Clear();
        _records.AddRange(records);
    }

    internal void Add(int layer, Tensor logits, RoutingDecision d, Tensor? tokenMask)
    {
        static Tensor Keep(Tensor t) => t.DetachFromDisposeScope();
        _records.Add(new RouterRecord(layer, Keep(logits.alias()), Keep(d.Experts.detach()), Keep(d.Weights.detach()),
            d.Active is null ? null : Keep(d.Active.detach()), tokenMask is null ? null : Keep(tokenMask.alias())));
    }

    public void Clear()
    {
        foreach (var r in _records) r.DisposeTensors();
        _records.Clear();
    }

    public void Dispose() => Clear();
}
