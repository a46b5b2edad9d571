using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>Where the frozen routing decision of <see cref="PrivilegedRouterPolicy"/> comes from.</summary>
public enum PrivilegedSnapshot
{
    /// <summary>The routing distribution of the last privileged token before the first untrusted one (its decision).</summary>
    Last,

    /// <summary>The mean routing distribution over all privileged tokens before the first untrusted one, then the
    /// strategy (top-k, top-p, switch) on that mean.</summary>
    Pooled,
}

/// <summary>
/// Hardened routing: only privileged instructions steer the router. Per row and per layer, every real token from the
/// row's first untrusted token (<see cref="Privilege.Untrusted"/>) to the end of the sequence — later user turns and
/// generated tokens included — gets a frozen decision: the configured strategy applied to a snapshot distribution taken
/// from the privileged tokens before that first untrusted token (<see cref="PrivilegedSnapshot"/>). Tokens before it are
/// routed freely on their own hidden state.
/// </summary>
/// <remarks>
/// <para>The router never reads a frozen token's hidden state: its logits are computed for the routed (privileged-prefix)
/// rows only (<c>index_select</c>, then <see cref="RouterStep.Router"/>). A frozen token's hidden state is contaminated
/// by the untrusted content through attention, so routing on it — even for a later privileged turn — would let that
/// content choose experts. The experts still process every token; only the choice is frozen.</para>
/// <para>Frozen tokens are routed as if each were alone: under switch routing they never count against an expert's
/// capacity and are never dropped (otherwise the untrusted length would decide which frozen tokens are dropped); routed
/// tokens count only routed tokens (not padding) against the capacity.</para>
/// <para>The snapshot lives in <see cref="RoutingContext.PolicyState"/> (a <see cref="PrivilegedRoutingState"/>) with
/// the KV cache: it is updated by every routed token and fixed once the row freezes. A row with no privileged token
/// before its first untrusted token is frozen on the uniform distribution. A sequence with no untrusted token is routed
/// exactly as by <see cref="FreeRouterPolicy"/> (switch: padding does not count against the capacity here).</para>
/// <para>The decision records <see cref="RoutingDecision.Routed"/> (false on frozen tokens and padding) and effective
/// logits (<c>log</c> of the snapshot on frozen tokens): the auxiliary losses and routing statistics count routed tokens
/// only. In training (no cache) the frozen tokens' weights stay attached to the snapshot's graph, so the language-model
/// loss on frozen tokens trains the router through the privileged tokens that produced the snapshot.</para>
/// </remarks>
public sealed class PrivilegedRouterPolicy : IRouterPolicy
{
    public static readonly PrivilegedRouterPolicy Last = new(PrivilegedSnapshot.Last);
    public static readonly PrivilegedRouterPolicy Pooled = new(PrivilegedSnapshot.Pooled);

    public PrivilegedRouterPolicy(PrivilegedSnapshot snapshot = PrivilegedSnapshot.Last) => Snapshot = snapshot;

    public PrivilegedSnapshot Snapshot { get; }

    public string Name => "privileged";

    public bool FreezesOnUntrusted => true;

    public RoutingDecision Route(RouterStep step)
    {
        var routing = step.Context.Routing
            ?? throw new InvalidOperationException("router_policy \"privileged\" needs a RoutingContext with privilege labels (LlamaForCausalLM.Forward(..., routing:))");
        var input = step.Input;
        long b = input.shape[0], t = input.shape[1], h = input.shape[2];
        int e = step.Strategy.NumExperts;
        var rows = step.Context.Rows;   // a sub-batch of the call (rows of other adapters elsewhere), or null: all rows
        var state = PrivilegedRoutingState.For(routing, rows is null ? b : routing.Batch);
        var frame = rows is null ? state.Frame(routing, step.Context.TokenMask, b, t, input.device)
            : state.Frame(routing, routing.TokenMask, routing.Batch, t, input.device).Select(rows, input.device);
        var dtype = input.dtype;

        // The router runs on the routed rows only: a frozen (or padding) token's hidden state is never read.
        var uniform = full([b * t, e], 1.0 / e, dtype: dtype, device: input.device);
        Tensor ownProbabilities = uniform, ownLogits = zeros([b * t, e], dtype: dtype, device: input.device);
        if (frame.RoutedCount > 0)
        {
            var selected = input.reshape(b * t, h).index_select(0, frame.RoutedIndex);
            var logits = step.Router(selected);
            ownLogits = ownLogits.index_copy(0, frame.RoutedIndex, logits);
            ownProbabilities = uniform.index_copy(0, frame.RoutedIndex, nn.functional.softmax(logits, -1));
        }
        var probabilities = ownProbabilities.view(b, t, e);
        var routedMask = frame.Routed;                                       // [B, T] bool

        // This layer's snapshot after the routed tokens of this step (they all precede the row's frozen tokens).
        var layer = state.Layer(step.Adapter, step.Layer, state.Batch, e, dtype, input.device);
        var rowIndex = rows is null ? null : tensor(rows.Select(r => (long)r).ToArray(), device: input.device);
        var (layerLast, layerSum) = rowIndex is null ? (layer.Last, layer.Sum) : (layer.Last.index_select(0, rowIndex), layer.Sum.index_select(0, rowIndex));
        var last = frame.RoutedCount == 0 ? layerLast
            : where(frame.HasNewRouted.unsqueeze(1), ownProbabilities.index_select(0, frame.LastRoutedIndex), layerLast);
        var sum = frame.RoutedCount == 0 ? layerSum : layerSum + (probabilities * routedMask.unsqueeze(-1).to(dtype)).sum(1);
        var snapshot = Snapshot == PrivilegedSnapshot.Last ? last
            : where(frame.PooledCount.unsqueeze(1) > 0, sum / frame.PooledCount.clamp_min(1).unsqueeze(1).to(dtype), uniform.narrow(0, 0, b));
        layer.Store(frame.RoutedCount > 0 ? (last, sum) : null, routing.Steps, rowIndex);   // no routed token: unchanged

        var own = step.Strategy.Select(probabilities, routedMask);
        if (!frame.AnyFrozen)
            return new RoutingDecision
            {
                Experts = own.Experts, Weights = own.Weights, Active = own.Active, Passthrough = own.Passthrough,
                Routed = routedMask, Logits = ownLogits.view(b, t, e),
            };

        var frozen = step.Strategy.Select(snapshot.unsqueeze(1));           // each frozen token as if alone: [B, 1, K]
        var m = routedMask.unsqueeze(-1);
        long k = own.Experts.shape[^1];
        Tensor Expand(Tensor x) => x.expand(b, t, k);
        Tensor? active = own.Active is null && frozen.Active is null ? null
            : where(m, own.Active ?? ones([b, t, k], dtype: ScalarType.Bool, device: input.device),
                Expand(frozen.Active ?? ones([b, 1, k], dtype: ScalarType.Bool, device: input.device)));
        Tensor? passthrough = own.Passthrough is null && frozen.Passthrough is null ? null
            : where(routedMask, own.Passthrough ?? zeros([b, t], dtype: dtype, device: input.device),
                (frozen.Passthrough ?? zeros([b, 1], dtype: dtype, device: input.device)).expand(b, t));
        var effectiveLogits = where(m, ownLogits.view(b, t, e), snapshot.clamp_min(1e-30).log().unsqueeze(1).expand(b, t, e));
        return new RoutingDecision
        {
            Experts = where(m, own.Experts, Expand(frozen.Experts)),
            Weights = where(m, own.Weights, Expand(frozen.Weights)),
            Active = active,
            Passthrough = passthrough,
            Routed = routedMask,
            Logits = effectiveLogits,
        };
    }
}

/// <summary>The privileged policy applied to a scaling head (X-LoRA): the same frame, state and snapshots as
/// <see cref="PrivilegedRouterPolicy.Route"/>, over per-token scaling vectors instead of router distributions.</summary>
public static class PrivilegedScalings
{
    /// <summary>
    /// Scalings <c>[R, T, L, N]</c> for rows <paramref name="rows"/> of the current forward call under
    /// <paramref name="policy"/>: each row's privileged-prefix tokens get the head's own scalings, computed from their
    /// hidden states only (<paramref name="head"/> maps <c>[1, n, hidden]</c> to <c>[1, n, L, N]</c>); every real token
    /// from the row's first untrusted token on — later turns and generated tokens included — gets the snapshot (the last
    /// privileged token's scalings, or their mean with <see cref="PrivilegedSnapshot.Pooled"/>; uniform 1/N when the
    /// row has none). The head never reads a frozen token's hidden state. Call once per forward call and adapter, after
    /// <see cref="RoutingContext.BeginForward"/>.
    /// </summary>
    /// <param name="policy">The privileged policy (its snapshot kind).</param>
    /// <param name="routing">The call's routing context: labels and the sequence's policy state.</param>
    /// <param name="adapter">The adapter's name (its snapshot is kept under it).</param>
    /// <param name="hidden">The scaling pass's hidden states of the rows <c>[R, T, hidden]</c>.</param>
    /// <param name="rows">The rows of the call (ascending) that <paramref name="hidden"/> holds.</param>
    /// <param name="modules">L, the scalings' module axis.</param>
    /// <param name="experts">N, the number of experts.</param>
    /// <param name="head">The scaling head.</param>
    public static Tensor Freeze(PrivilegedRouterPolicy policy, RoutingContext routing, string adapter, Tensor hidden, int[] rows,
        int modules, int experts, Func<Tensor, Tensor> head)
    {
        long r = hidden.shape[0], t = hidden.shape[1], h = hidden.shape[2];
        int e = modules * experts;
        var device = hidden.device;
        var state = PrivilegedRoutingState.For(routing, routing.Batch);
        var frame = state.Frame(routing, routing.TokenMask, routing.Batch, t, device);
        bool all = rows.Length == routing.Batch;
        if (!all) frame = frame.Select(rows, device);
        var uniform = full([r * t, e], 1.0 / experts, dtype: ScalarType.Float32, device: device);
        var own = uniform;
        if (frame.RoutedCount > 0)
        {
            var selected = hidden.reshape(r * t, h).index_select(0, frame.RoutedIndex).unsqueeze(0);     // the routed tokens only
            var s = head(selected).reshape(frame.RoutedCount, e);
            own = uniform.to(s.dtype).index_copy(0, frame.RoutedIndex, s);
            uniform = uniform.to(s.dtype);
        }
        var dtype = own.dtype;
        var routedMask = frame.Routed;                                                                  // [R, T]
        var layer = state.Layer(adapter, -1, state.Batch, e, dtype, device, start: 1.0 / experts);   // uniform over the experts
        var rowIndex = all ? null : tensor(rows.Select(x => (long)x).ToArray(), device: device);
        var (layerLast, layerSum) = rowIndex is null ? (layer.Last, layer.Sum) : (layer.Last.index_select(0, rowIndex), layer.Sum.index_select(0, rowIndex));
        var last = frame.RoutedCount == 0 ? layerLast
            : where(frame.HasNewRouted.unsqueeze(1), own.index_select(0, frame.LastRoutedIndex), layerLast);
        var sum = frame.RoutedCount == 0 ? layerSum : layerSum + (own.view(r, t, e) * routedMask.unsqueeze(-1).to(dtype)).sum(1);
        var snapshot = policy.Snapshot == PrivilegedSnapshot.Last ? last
            : where(frame.PooledCount.unsqueeze(1) > 0, sum / frame.PooledCount.clamp_min(1).unsqueeze(1).to(dtype), uniform.narrow(0, 0, r));
        layer.Store(frame.RoutedCount > 0 ? (last, sum) : null, routing.Steps, rowIndex);
        var result = where(routedMask.unsqueeze(-1), own.view(r, t, e), snapshot.unsqueeze(1).expand(r, t, e));
        return result.view(r, t, modules, experts);
    }
}

/// <summary>
/// The privileged policy's state for one batch of sequences, kept in <see cref="RoutingContext.PolicyState"/> for the
/// life of the KV cache: which rows have frozen (and where), how many privileged tokens each row has routed, and per
/// layer the snapshot (last routed distribution and the sum of routed distributions).
/// </summary>
public sealed class PrivilegedRoutingState : IDisposable
{
    private readonly bool[] _frozen;
    private readonly long[] _seen;             // real tokens per row so far
    private readonly long[] _routed;           // routed (privileged-prefix) tokens per row so far
    private readonly long[] _firstUntrusted;   // position among real tokens, or -1
    private readonly Dictionary<(string Adapter, int Layer), LayerSnapshot> _layers = [];
    private StepFrame? _frame;
    private IRoutedSequenceCache? _cache;                   // the cache this state's sequence lives in (null: cache-free calls)
    private long _nextSlot;                    // the cache slot its next call must start at

    private PrivilegedRoutingState(long batch)
    {
        Batch = batch;
        _frozen = new bool[batch];
        _seen = new long[batch];
        _routed = new long[batch];
        _firstUntrusted = new long[batch];
        Array.Fill(_firstUntrusted, -1L);
    }

    /// <summary>Batch size the state was created for.</summary>
    public long Batch { get; }

    /// <summary>Whether row <paramref name="row"/> has seen an untrusted token (its routing is frozen from there on).</summary>
    public bool IsFrozen(int row) => _frozen[row];

    /// <summary>The position (among the row's real tokens, over all steps) of the row's first untrusted token, or -1.</summary>
    public long FirstUntrustedPosition(int row) => _firstUntrusted[row];

    /// <summary>Number of privileged tokens the router has routed in row <paramref name="row"/> (the snapshot's support).</summary>
    public long RoutedTokens(int row) => _routed[row];

    internal static PrivilegedRoutingState For(RoutingContext routing, long batch)
    {
        switch (routing.PolicyState)
        {
            case PrivilegedRoutingState s when s.Batch == batch:
                return s;
            case PrivilegedRoutingState s:
                throw new InvalidOperationException($"privileged routing: this sequence has batch size {s.Batch} but the step has {batch}");
            case null when routing.IsContinuation:
                throw new InvalidOperationException(
                    $"privileged routing: the KV cache already holds {routing.CurrentStart} slot(s) of this sequence, but the routing " +
                    "context has no routing state for them (a new RoutingContext?); the tokens already in the cache may include " +
                    "untrusted ones, so routing them freely could undo the freeze. Use the context that ran the earlier steps " +
                    "for the whole life of the cache, or start over with an empty cache.");
            case null:
                var state = new PrivilegedRoutingState(batch);
                routing.PolicyState = state;
                return state;
            default:
                throw new InvalidOperationException($"the routing context holds another policy's state ({routing.PolicyState.GetType().Name}); use one context per policy");
        }
    }

    internal sealed class StepFrame : IDisposable
    {
        public required int Step;
        public required Tensor Routed;             // bool [B, T]
        public required Tensor RoutedIndex;        // int64 [R] flat indices
        public required long RoutedCount;
        public required Tensor LastRoutedIndex;    // int64 [B] (0 where none)
        public required Tensor HasNewRouted;       // bool [B]
        public required Tensor PooledCount;        // int64 [B] routed tokens so far, this step included
        public required bool AnyFrozen;
        private readonly Dictionary<string, StepFrame> _subsets = new(StringComparer.Ordinal);

        /// <summary>The frame of rows <paramref name="rows"/> of the call (computed once per step and row set): flat indices
        /// renumbered for the sub-batch.</summary>
        public StepFrame Select(int[] rows, Device device)
        {
            string key = string.Join(",", rows);
            if (_subsets.TryGetValue(key, out var cached)) return cached;
            using var scope = NewDisposeScope();
            long t = Routed.shape[1];
            var index = tensor(rows.Select(r => (long)r).ToArray(), device: device);
            var routed = Routed.index_select(0, index);
            var routedIndex = routed.reshape(-1).nonzero().squeeze(1);
            var local = arange(rows.Length, dtype: ScalarType.Int64, device: device) * t;
            var lastRouted = LastRoutedIndex.index_select(0, index) - index * t + local;
            var hasNew = HasNewRouted.index_select(0, index);
            var frame = new StepFrame
            {
                Step = Step,
                Routed = routed.DetachFromDisposeScope(),
                RoutedIndex = routedIndex.DetachFromDisposeScope(),
                RoutedCount = routedIndex.shape[0],
                LastRoutedIndex = where(hasNew, lastRouted, zeros_like(lastRouted)).DetachFromDisposeScope(),
                HasNewRouted = hasNew.DetachFromDisposeScope(),
                PooledCount = PooledCount.index_select(0, index).DetachFromDisposeScope(),
                AnyFrozen = rows.Any(r => FrozenRows[r]),
                FrozenRows = rows.Select(r => FrozenRows[r]).ToArray(),
            };
            _subsets[key] = frame;
            return frame;
        }

        /// <summary>Per row: whether a real token of the row is frozen in this step.</summary>
        public required bool[] FrozenRows;

        public void Dispose()
        {
            foreach (var f in _subsets.Values) f.Dispose();
            _subsets.Clear();
            Routed.Dispose();
            RoutedIndex.Dispose();
            LastRoutedIndex.Dispose();
            HasNewRouted.Dispose();
            PooledCount.Dispose();
        }
    }

    /// <summary>The routed/frozen split of the current forward call, computed once (by the first layer) from the labels
    /// and the rows' state before the call.</summary>
    internal StepFrame Frame(RoutingContext routing, Tensor? tokenMask, long b, long t, Device device)
    {
        if (_frame is not null && _frame.Step == routing.Steps) return _frame;
        if (routing.IsContinuation) CheckContinues(routing.CurrentCache, routing.CurrentStart);
        _cache = routing.CurrentCache;
        _nextSlot = routing.CurrentStart + t;
        var labels = routing.PrivilegeLabels
            ?? throw new InvalidOperationException("router_policy \"privileged\": set RoutingContext.PrivilegeLabels (or SetPrivileges) before every forward step, decoding steps included");
        if (labels.dim() != 2 || labels.shape[0] != b || labels.shape[1] != t)
            throw new ArgumentException($"privilege labels are [{string.Join(", ", labels.shape)}] but the step's input is [{b}, {t}]");
        var (label, real) = HostLabels(labels, tokenMask, b, t);
        var routed = new bool[b * t];
        var routedIndex = new List<long>();
        var lastRouted = new long[b];
        var hasNew = new bool[b];
        var frozenRows = new bool[b];
        bool anyFrozen = false;
        for (int row = 0; row < b; row++)
        {
            for (long i = 0; i < t; i++)
            {
                long n = row * t + i;
                if (!real[n]) continue;
                long l = label[n];
                if (l < 0 || l > (long)Privilege.System) throw new ArgumentException($"privilege label {l} at row {row}, position {i} is not a Privilege value (0..3)");
                if (!_frozen[row] && l == (long)Privilege.Untrusted)
                {
                    _frozen[row] = true;
                    _firstUntrusted[row] = _seen[row];
                }
                _seen[row]++;
                if (_frozen[row]) { anyFrozen = true; frozenRows[row] = true; continue; }
                routed[n] = true;
                routedIndex.Add(n);
                lastRouted[row] = n;
                hasNew[row] = true;
                _routed[row]++;
            }
        }
        _frame?.Dispose();
        _frame = new StepFrame
        {
            Step = routing.Steps,
            Routed = tensor(routed, [b, t], device: device).DetachFromDisposeScope(),
            RoutedIndex = tensor(routedIndex.ToArray(), device: device).DetachFromDisposeScope(),
            RoutedCount = routedIndex.Count,
            LastRoutedIndex = tensor(lastRouted, device: device).DetachFromDisposeScope(),
            HasNewRouted = tensor(hasNew, device: device).DetachFromDisposeScope(),
            PooledCount = tensor(_routed.ToArray(), device: device).DetachFromDisposeScope(),
            AnyFrozen = anyFrozen,
            FrozenRows = frozenRows,
        };
        return _frame;
    }

    internal sealed class LayerSnapshot : IDisposable
    {
        public required Tensor Last;   // [B, E] the latest routed distribution (uniform before any)
        public required Tensor Sum;    // [B, E] sum of routed distributions
        public int StoredStep = -1;

        /// <summary>Keeps detached copies for later steps (once per step; a layer routes an adapter once per forward
        /// call). <paramref name="rows"/>: the rows the update covers (a sub-batch), or null for all.</summary>
        public void Store((Tensor Last, Tensor Sum)? update, int step, Tensor? rows = null)
        {
            if (StoredStep == step) throw new InvalidOperationException("privileged routing: a layer routed twice in one forward call");
            StoredStep = step;
            if (update is not { } u) return;
            var (last, sum) = u;
            using var noGrad = no_grad();
            var newLast = (rows is null ? last.detach().clone() : Last.index_copy(0, rows, last.detach())).DetachFromDisposeScope();
            var newSum = (rows is null ? sum.detach().clone() : Sum.index_copy(0, rows, sum.detach())).DetachFromDisposeScope();
            Last.Dispose();
            Sum.Dispose();
            Last = newLast;
            Sum = newSum;
        }

        public void Dispose()
        {
            Last.Dispose();
            Sum.Dispose();
        }
    }

    /// <summary>The labels and the real-token flags of a <c>[b, t]</c> step as host arrays (row-major).</summary>
    internal static (long[] Labels, bool[] Real) HostLabels(Tensor labels, Tensor? tokenMask, long b, long t)
    {
        using var scope = NewDisposeScope();
        var label = labels.to(ScalarType.Int64).cpu().reshape(-1).data<long>().ToArray();
        var real = tokenMask is null ? Enumerable.Repeat(true, (int)(b * t)).ToArray()
            : tokenMask.to(ScalarType.Bool).cpu().reshape(-1).data<bool>().ToArray();
        return (label, real);
    }

    /// <summary>A fresh state for <paramref name="batch"/> rows, stored in <paramref name="routing"/> (replacing any).</summary>
    internal static PrivilegedRoutingState Create(RoutingContext routing, long batch)
    {
        routing.ResetPolicyState();
        var state = new PrivilegedRoutingState(batch);
        routing.PolicyState = state;
        return state;
    }

    /// <summary>A batch-1 copy of row <paramref name="row"/> (counters and every layer's snapshot row), continuing in
    /// <paramref name="cache"/> at its current length.</summary>
    internal PrivilegedRoutingState ExtractRow(int row, IRoutedSequenceCache cache)
    {
        var copy = new PrivilegedRoutingState(1);
        copy._frozen[0] = _frozen[row];
        copy._seen[0] = _seen[row];
        copy._routed[0] = _routed[row];
        copy._firstUntrusted[0] = _firstUntrusted[row];
        foreach (var (layer, s) in _layers)
            copy._layers[layer] = new LayerSnapshot
            {
                Last = s.Last.narrow(0, row, 1).clone().DetachFromDisposeScope(),
                Sum = s.Sum.narrow(0, row, 1).clone().DetachFromDisposeScope(),
            };
        copy._cache = cache;
        copy._nextSlot = cache.Length;
        return copy;
    }

    /// <summary>Takes back row <paramref name="row"/> from its batch-1 copy after it ran on its own.</summary>
    internal void MergeRow(int row, PrivilegedRoutingState single)
    {
        if (single.Batch != 1) throw new ArgumentException("expected a batch-1 state", nameof(single));
        _frozen[row] = single._frozen[0];
        _seen[row] = single._seen[0];
        _routed[row] = single._routed[0];
        _firstUntrusted[row] = single._firstUntrusted[0];
        using var noGrad = no_grad();
        foreach (var ((adapter, layer), s) in single._layers)
        {
            var mine = Layer(adapter, layer, Batch, (int)s.Last.shape[1], s.Last.dtype, s.Last.device);
            mine.Last.narrow(0, row, 1).copy_(s.Last);
            mine.Sum.narrow(0, row, 1).copy_(s.Sum);
        }
    }

    /// <summary>Throws unless this state's sequence is the one in <paramref name="cache"/> and its last call ended at
    /// <paramref name="slot"/>: a cache written without this state (another context) could hold untrusted tokens it never saw.</summary>
    internal void CheckContinues(IRoutedSequenceCache? cache, long slot)
    {
        if (!ReferenceEquals(_cache, cache) || _nextSlot != slot)
            throw new InvalidOperationException(
                "privileged routing: this routing state belongs to another KV cache, or the cache was written without it (state " +
                $"at slot {_nextSlot}, the call starts at slot {slot}); use one RoutingContext per cache, for every step");
    }

    /// <summary>The sequence continues in <paramref name="cache"/> at slot <paramref name="nextSlot"/> (after slots were
    /// written on this state's behalf).</summary>
    internal void ContinueAt(IRoutedSequenceCache? cache, long nextSlot)
    {
        _cache = cache;
        _nextSlot = nextSlot;
    }

    /// <summary>The snapshot of <paramref name="adapter"/>'s router in <paramref name="layer"/> (each adapter's routers
    /// keep their own; rows that never route that adapter keep the uniform start, 1/<paramref name="e"/> or
    /// <paramref name="start"/>). X-LoRA scalings use layer -1.</summary>
    internal LayerSnapshot Layer(string? adapter, int layer, long b, int e, ScalarType dtype, Device device, double? start = null)
    {
        var key = (adapter ?? "", layer);
        if (!_layers.TryGetValue(key, out var s))
            _layers[key] = s = new LayerSnapshot
            {
                Last = full([b, e], start ?? 1.0 / e, dtype: dtype, device: device).DetachFromDisposeScope(),
                Sum = zeros([b, e], dtype: dtype, device: device).DetachFromDisposeScope(),
            };
        if (s.Last.shape[1] != e) throw new InvalidOperationException($"privileged routing: layer {layer} had {s.Last.shape[1]} experts and now has {e}");
        return s;
    }

    public void Dispose()
    {
        _frame?.Dispose();
        _frame = null;
        foreach (var s in _layers.Values) s.Dispose();
        _layers.Clear();
    }
}
