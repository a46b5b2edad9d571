using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>One layer's choice for one token: the experts that ran and their weights, in slot order.</summary>
public sealed record LayerRoute(int[] Experts, float[] Weights);

/// <summary>One real token's routing in every MoE layer.</summary>
/// <param name="Row">Batch row.</param>
/// <param name="Position">Index of the token among the row's real tokens, counted over all forward calls.</param>
/// <param name="Step">The forward call (0 = first, e.g. the prefill) that processed it.</param>
/// <param name="Layers">Routes by layer, in the order the layers ran.</param>
public sealed record TokenRoute(int Row, int Position, int Step, IReadOnlyList<LayerRoute> Layers);

/// <summary>
/// Records routing decisions across forward calls — a prefill and then each KV-cached decoding step — as host arrays,
/// per token and per layer. Padding is skipped. This is what tests and <c>inspect-routing</c> read.
/// </summary>
public sealed class RoutingTrace
{
    private sealed class Step
    {
        public required long Batch, Length;
        public required bool[] Real;                  // [B*T]
        public required int Index;                    // the forward call it belongs to
        public int[]? Rows;                           // batch row of each local row; null: the rows are the batch's
        public readonly List<(int Layer, long K, long[] Experts, float[] Weights, bool[]? Active, int[]? Rows)> Layers = [];
    }

    private readonly List<Step> _steps = [];
    private int _calls;

    /// <summary>Number of forward calls recorded.</summary>
    public int StepCount => _calls;

    internal void BeginStep(long batch, long length, Tensor? tokenMask)
    {
        bool[] real;
        if (tokenMask is null) { real = new bool[batch * length]; Array.Fill(real, true); }
        else real = tokenMask.to(ScalarType.Bool).cpu().reshape(-1).data<bool>().ToArray();
        _steps.Add(new Step { Batch = batch, Length = length, Real = real, Index = _calls++ });
    }

    /// <summary>Takes the steps of <paramref name="rowTrace"/> (a batch-1 trace of row <paramref name="row"/>'s tokens,
    /// run on their own) as part of the next forward call of this trace, before its batched step.</summary>
    internal void AbsorbRow(RoutingTrace rowTrace, int row)
    {
        foreach (var s in rowTrace._steps)
        {
            if (s.Batch != 1 || s.Rows is not null) throw new ArgumentException("expected a batch-1 trace", nameof(rowTrace));
            s.Index = _calls;
            s.Rows = [row];
            _steps.Add(s);
        }
        rowTrace._steps.Clear();
        rowTrace._calls = 0;
    }

    /// <summary>Records one layer's decision of the current step; <paramref name="rows"/>: the step's rows it covers (a
    /// block that routed a sub-batch), or null for all.</summary>
    internal void Add(int layer, RoutingDecision d, int[]? rows = null)
    {
        if (_steps.Count == 0) throw new InvalidOperationException("routing trace: a layer reported before the forward call began");
        using var scope = NewDisposeScope();
        long k = d.Experts.shape[^1];
        var experts = d.Experts.detach().to(ScalarType.Int64).cpu().reshape(-1).data<long>().ToArray();
        var weights = d.Weights.detach().to(ScalarType.Float32).cpu().reshape(-1).data<float>().ToArray();
        var active = d.Active?.detach().cpu().reshape(-1).data<bool>().ToArray();
        _steps[^1].Layers.Add((layer, k, experts, weights, active, rows));
    }

    /// <summary>The routed real tokens of a batch row, in order, across every recorded step.</summary>
    public IReadOnlyList<TokenRoute> Row(int row)
    {
        var tokens = new List<TokenRoute>();
        int position = 0;
        for (int s = 0; s < _steps.Count; s++)
        {
            var step = _steps[s];
            long local = row;
            if (step.Rows is not null)
            {
                local = Array.IndexOf(step.Rows, row);
                if (local < 0) continue;
            }
            else if (row < 0 || row >= step.Batch) throw new ArgumentOutOfRangeException(nameof(row), row, $"step {step.Index} has {step.Batch} rows");
            for (long t = 0; t < step.Length; t++)
            {
                long n = local * step.Length + t;
                if (!step.Real[n]) continue;
                var layers = new List<LayerRoute>(step.Layers.Count);
                foreach (var (_, k, experts, weights, active, rows) in step.Layers)
                {
                    long m = n;
                    if (rows is not null)
                    {
                        int sub = Array.IndexOf(rows, (int)local);
                        if (sub < 0) continue;   // the row ran another adapter (or none) in this layer
                        m = sub * step.Length + t;
                    }
                    var e = new List<int>((int)k);
                    var w = new List<float>((int)k);
                    for (long j = 0; j < k; j++)
                    {
                        long i = m * k + j;
                        if (active is not null && !active[i]) continue;
                        e.Add((int)experts[i]);
                        w.Add(weights[i]);
                    }
                    layers.Add(new LayerRoute(e.ToArray(), w.ToArray()));
                }
                tokens.Add(new TokenRoute(row, position++, step.Index, layers));
            }
        }
        return tokens;
    }

    /// <summary>The layer indices in the order they reported (from the first step).</summary>
    public IReadOnlyList<int> LayerIndices => _steps.Count == 0 ? [] : _steps[0].Layers.Select(l => l.Layer).ToList();

    public void Clear()
    {
        _steps.Clear();
        _calls = 0;
    }
}
