using LoraMix.Routing;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// Makes the privileged router's frozen decision bit-for-bit independent of everything after the first untrusted token.
/// </summary>
/// <remarks>
/// <para>Floating-point results depend on the shapes a kernel sees: the same privileged prefix computed inside a longer
/// call (more untrusted tokens after it) or a batch padded for other rows can round differently in the last bits, and at
/// a router near-tie that flips the frozen experts. So, in inference, when a row of a forward call freezes after
/// privileged tokens of the same call, those tokens run first in a pass of their own: batch 1, no padding, over a
/// compacted copy of the row's cached history (its real slots only). That pass updates the row's routing snapshot and
/// records its decisions; its keys and values are copied into the batch cache. Then the rest of every row (the untrusted
/// tokens and all that follows, and the whole of rows that do not freeze here) runs as one batched call that continues the
/// cache. The output, the routing trace and the router-logit collector are put back in the layout of the original call.</para>
/// <para>What the privileged pass sees is the row's own history, its own prefix tokens and labels: nothing of the
/// untrusted text, nothing of other rows. Rows without a privileged-then-untrusted boundary in the call, training (with
/// gradients) and the free policy take the ordinary single pass.</para>
/// </remarks>
internal static class PrivilegedPrefill
{
    /// <summary>One row's privileged prefix in this call: its positions in the call (real tokens before the row's first
    /// untrusted token).</summary>
    internal sealed record Prefix(int Row, long[] Positions);

    internal sealed record SplitPlan(long[] Labels, bool[] Real, IReadOnlyList<Prefix> Prefixes, bool Continuation);

    /// <summary>The split this call needs, or null for the ordinary pass (no row freezes after privileged tokens of this
    /// call, no privileged router, or input the ordinary pass will reject with its own message).</summary>
    public static SplitPlan? Plan(LlamaForCausalLM model, RoutingContext routing, AdapterSelection? adapters, KvCache? cache,
        Tensor? attentionMask, long b, long t)
    {
        var labels = routing.PrivilegeLabels;
        if (labels is null || labels.dim() != 2 || labels.shape[0] != b || labels.shape[1] != t) return null;
        if (!model.RoutesPrivileged(routing, adapters)) return null;
        bool continuation = cache is not null && cache.Length > 0;
        PrivilegedRoutingState? state = null;
        if (continuation)
        {
            if (routing.PolicyState is not PrivilegedRoutingState s || s.Batch != b) return null;
            state = s;
        }
        var (label, real) = PrivilegedRoutingState.HostLabels(labels, attentionMask, b, t);
        // a batch may mix adapters: only rows that route through a freezing policy are split
        var privilegedRow = Enumerable.Range(0, (int)b)
            .Select(r => adapters?.Uniform is not null || model.RoutesPrivileged(routing, adapters?.Select([r]))).ToArray();
        var prefixes = new List<Prefix>();
        for (int row = 0; row < b; row++)
        {
            if (!privilegedRow[row] || (state is not null && state.IsFrozen(row))) continue;
            var positions = new List<long>();
            for (long i = 0; i < t; i++)
            {
                long n = row * t + i;
                if (!real[n]) continue;
                if (label[n] == (long)Privilege.Untrusted)
                {
                    if (positions.Count > 0) prefixes.Add(new Prefix(row, [.. positions]));
                    break;
                }
                positions.Add(i);
            }
        }
        return prefixes.Count == 0 ? null : new SplitPlan(label, real, prefixes, continuation);
    }

    /// <summary>Runs the split: each prefix alone, then the rest batched; returns hidden states [B, T, hidden] in the
    /// layout of the call (zeros at padding).</summary>
    public static Tensor Run(LlamaForCausalLM model, SplitPlan plan, Tensor embeddings, KvCache? cache, Tensor? attentionMask,
        RoutingContext routing, AdapterSelection? adapters)
    {
        long b = embeddings.shape[0], t = embeddings.shape[1], h = embeddings.shape[2];
        using var scope = NewDisposeScope();
        var device = model.Device;
        var emb = embeddings.to(device);
        PrivilegedRoutingState state;
        if (plan.Continuation)
        {
            state = (PrivilegedRoutingState)routing.PolicyState!;
            state.CheckContinues(cache, cache!.Length);
        }
        else state = PrivilegedRoutingState.Create(routing, b);
        var work = cache ?? model.CreateCache(b, t);
        try
        {
            // 1. Every privileged prefix on its own: batch 1, unpadded, over the row's compacted history.
            var inPrefix = new bool[b * t];
            var prefixRuns = new List<(Prefix Prefix, KvCache Single, long Start, Tensor Hidden, List<RouterRecord>? Records)>();
            try
            {
                foreach (var prefix in plan.Prefixes)
                {
                    int row = prefix.Row;
                    long count = prefix.Positions.Length;
                    var single = work.ExtractRow(row, count);
                    long start = single.Length;
                    using var sub = new RoutingContext
                    {
                        Policy = routing.Policy,
                        Collector = routing.Collector is null ? null : new RouterLogitsCollector(),
                        Trace = routing.Trace is null ? null : new RoutingTrace(),
                    };
                    sub.PolicyState = state.ExtractRow(row, single);
                    sub.SetPrivileges([prefix.Positions.Select(i => (Privilege)plan.Labels[row * t + i]).ToArray()]);
                    var x = emb.narrow(0, row, 1).index_select(1, tensor(prefix.Positions, device: device));
                    var hidden = model.ForwardCore(x, single, null, sub, adapters?.Select([row]));
                    state.MergeRow(row, sub.PolicyState as PrivilegedRoutingState
                        ?? throw new InvalidOperationException($"privileged prefill: row {row}'s own pass left no privileged routing state"));
                    if (routing.Trace is not null) routing.Trace.AbsorbRow(sub.Trace!, row);
                    prefixRuns.Add((prefix, single, start, hidden, sub.Collector?.Take()));
                    foreach (long i in prefix.Positions) inPrefix[row * t + i] = true;
                }

                // 2. Their keys and values into the batch cache: one block, each row's prefix at the block's end.
                long p = plan.Prefixes.Max(x => x.Positions.LongLength);
                var restPositions = new List<long>[b];
                for (int row = 0; row < b; row++)
                {
                    restPositions[row] = [];
                    for (long i = 0; i < t; i++)
                        if (plan.Real[row * t + i] && !inPrefix[row * t + i]) restPositions[row].Add(i);
                }
                long t2 = Math.Max(1, restPositions.Max(r => r.Count));
                work.Grow(p + t2 - t);   // the split uses p + t2 slots where the call planned t
                var blockValid = new bool[b * p];
                var blockCounts = new long[b];
                foreach (var run in prefixRuns)
                {
                    long c = run.Prefix.Positions.Length;
                    for (long j = p - c; j < p; j++) blockValid[run.Prefix.Row * p + j] = true;
                    blockCounts[run.Prefix.Row] = c;
                }
                long blockStart = work.Reserve(p, tensor(blockValid, [b, p], device: device), blockCounts);
                foreach (var run in prefixRuns)
                {
                    long c = run.Prefix.Positions.Length;
                    work.WriteRow(run.Prefix.Row, blockStart + p - c, run.Single, run.Start, c);
                }
                state.ContinueAt(work, work.Length);

                // 3. The rest of every row, batched and left-padded, continuing the cache.
                var gather = new long[b * t2];
                var restMask = new long[b * t2];
                var restLabels = new byte[b * t2];
                var dest = new List<long>();
                var src = new List<long>();
                bool padded = false;
                for (int row = 0; row < b; row++)
                {
                    var rest = restPositions[row];
                    long pad = t2 - rest.Count;
                    padded |= pad > 0;
                    for (long j = 0; j < t2; j++)
                    {
                        long n = row * t2 + j;
                        restLabels[n] = (byte)Privilege.System;   // padding: ignored
                        gather[n] = row * t;
                    }
                    for (int k = 0; k < rest.Count; k++)
                    {
                        long n = row * t2 + pad + k;
                        gather[n] = row * t + rest[k];
                        restMask[n] = 1;
                        restLabels[n] = (byte)plan.Labels[row * t + rest[k]];
                        dest.Add(row * t + rest[k]);
                        src.Add(n);
                    }
                }
                var restEmb = emb.reshape(b * t, h).index_select(0, tensor(gather, device: device)).view(b, t2, h);
                var maskTensor = padded ? tensor(restMask, [b, t2], device: device) : null;
                var labelTensor = tensor(restLabels, [b, t2], dtype: ScalarType.Byte, device: device);
                Tensor h2;
                using (routing.SwapLabels(labelTensor))
                    h2 = model.ForwardCore(restEmb, work, maskTensor, routing, adapters);

                // 4. Back into the call's layout.
                var outFlat = zeros([b * t, h2.shape[2]], dtype: h2.dtype, device: device);
                var destIdx = tensor(dest.ToArray(), device: device);
                var srcIdx = tensor(src.ToArray(), device: device);
                if (dest.Count > 0) outFlat.index_copy_(0, destIdx, h2.reshape(b * t2, -1).index_select(0, srcIdx));
                foreach (var run in prefixRuns)
                    outFlat.index_copy_(0, tensor(run.Prefix.Positions.Select(i => run.Prefix.Row * t + i).ToArray(), device: device),
                        run.Hidden.reshape(run.Prefix.Positions.Length, -1));
                if (routing.Collector is { } collector)
                    MergeRecords(collector, prefixRuns.Select(r => (r.Prefix, r.Records!)).ToList(), b, t, t2, destIdx, srcIdx);
                return outFlat.view(b, t, -1).MoveToOuterDisposeScope();
            }
            finally
            {
                foreach (var run in prefixRuns)
                {
                    run.Single.Dispose();
                    if (run.Records is not null) foreach (var r in run.Records) r.DisposeTensors();
                }
            }
        }
        finally
        {
            if (cache is null) work.Dispose();
        }
    }

    /// <summary>The collector's records in the call's layout [B, T, ...]: the batched call's records at its real tokens,
    /// each prefix's records at its positions; padding gets zeros (inactive, not counted).</summary>
    private static void MergeRecords(RouterLogitsCollector collector, List<(Prefix Prefix, List<RouterRecord> Records)> prefixes,
        long b, long t, long t2, Tensor destIdx, Tensor srcIdx)
    {
        var batched = collector.Records;
        var merged = new List<RouterRecord>(batched.Count);
        for (int l = 0; l < batched.Count; l++)
        {
            var r2 = batched[l];
            long e = r2.Logits.shape[^1], k = r2.Experts.shape[^1];
            var device = r2.Logits.device;
            var logits = zeros([b * t, e], dtype: r2.Logits.dtype, device: device);
            var experts = zeros([b * t, k], dtype: r2.Experts.dtype, device: device);
            var weights = zeros([b * t, k], dtype: r2.Weights.dtype, device: device);
            var active = zeros([b * t, k], dtype: ScalarType.Bool, device: device);
            var counted = zeros([b * t], dtype: ScalarType.Bool, device: device);
            bool anyActive = r2.Active is not null;
            void Place(RouterRecord r, Tensor to, Tensor? from, long n)
            {
                Tensor Rows(Tensor x, long width) => from is null ? x.reshape(n, width) : x.reshape(-1, width).index_select(0, from);
                logits.index_copy_(0, to, Rows(r.Logits.detach(), e));
                experts.index_copy_(0, to, Rows(r.Experts, k));
                weights.index_copy_(0, to, Rows(r.Weights, k));
                active.index_copy_(0, to, r.Active is null ? ones([n, k], dtype: ScalarType.Bool, device: device) : Rows(r.Active, k));
                counted.index_copy_(0, to, r.TokenMask is null ? ones([n], dtype: ScalarType.Bool, device: device)
                    : Rows(r.TokenMask.to(ScalarType.Bool), 1).reshape(n));
            }
            if (destIdx.shape[0] > 0) Place(r2, destIdx, srcIdx, destIdx.shape[0]);
            foreach (var (prefix, records) in prefixes)
            {
                var r1 = records[l];
                if (r1.Layer != r2.Layer) throw new InvalidOperationException($"router records out of step: layer {r1.Layer} vs {r2.Layer}");
                anyActive |= r1.Active is not null;
                long n = prefix.Positions.Length;
                Place(r1, tensor(prefix.Positions.Select(i => prefix.Row * t + i).ToArray(), device: device), null, n);
            }
            merged.Add(new RouterRecord(r2.Layer, logits.view(b, t, e).DetachFromDisposeScope(), experts.view(b, t, k).DetachFromDisposeScope(),
                weights.view(b, t, k).DetachFromDisposeScope(), anyActive ? active.view(b, t, k).DetachFromDisposeScope() : null,
                counted.view(b, t).DetachFromDisposeScope()));
        }
        collector.Replace(merged);
    }
}
