using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>One layer's routing statistics over the tokens seen.</summary>
/// <param name="Layer">Decoder layer index.</param>
/// <param name="Tokens">Real tokens counted.</param>
/// <param name="ExpertLoad">Per expert: its share of the active (token, slot) assignments; sums to 1.</param>
/// <param name="MeanProbability">Per expert: the mean router probability.</param>
/// <param name="Entropy">Mean router entropy in nats (0 = always certain, ln E = uniform).</param>
public sealed record LayerRoutingStatistics(int Layer, long Tokens, double[] ExpertLoad, double[] MeanProbability, double Entropy);

/// <summary>
/// Accumulates per-layer expert load and router entropy over forward calls (training logging, evaluation). Padding is
/// excluded through the records' token masks.
/// </summary>
public sealed class RoutingStatistics
{
    private sealed class Acc
    {
        public long Tokens;
        public double[] Assignments = [], Probability = [];
        public double EntropySum;
    }

    private readonly SortedDictionary<int, Acc> _layers = [];

    /// <summary>Adds every layer of the latest forward call.</summary>
    public void Add(RouterLogitsCollector collector)
    {
        ArgumentNullException.ThrowIfNull(collector);
        foreach (var r in collector.Records) Add(r);
    }

    /// <summary>Adds one layer's record.</summary>
    public void Add(RouterRecord record)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long e = record.Logits.shape[^1];
        var logits = record.Logits.detach().reshape(-1, e).to(ScalarType.Float64);
        var real = record.TokenMask?.reshape(-1).to(ScalarType.Float64) ?? ones(logits.shape[0], dtype: ScalarType.Float64);
        var logp = nn.functional.log_softmax(logits, -1);
        var p = logp.exp();
        var entropy = -(p * logp).sum(-1);
        long k = record.Experts.shape[^1];
        var experts = record.Experts.reshape(-1, k);
        var slotWeight = (record.Active?.reshape(-1, k).to(ScalarType.Float64) ?? ones(experts.shape, dtype: ScalarType.Float64))
                         * real.unsqueeze(1);
        var assignments = zeros(experts.shape[0], e, dtype: ScalarType.Float64).scatter_add_(1, experts, slotWeight).sum(0L);

        if (!_layers.TryGetValue(record.Layer, out var acc))
            _layers[record.Layer] = acc = new Acc { Assignments = new double[e], Probability = new double[e] };
        acc.Tokens += (long)real.sum().item<double>();
        acc.EntropySum += (entropy * real).sum().item<double>();
        var a = assignments.data<double>().ToArray();
        var pr = (p * real.unsqueeze(1)).sum(0L).data<double>().ToArray();
        for (int i = 0; i < e; i++)
        {
            acc.Assignments[i] += a[i];
            acc.Probability[i] += pr[i];
        }
    }

    /// <summary>The statistics so far, by layer.</summary>
    public IReadOnlyList<LayerRoutingStatistics> Result() => _layers.Select(kv =>
    {
        var acc = kv.Value;
        double total = acc.Assignments.Sum();
        return new LayerRoutingStatistics(kv.Key, acc.Tokens,
            acc.Assignments.Select(x => total > 0 ? x / total : 0).ToArray(),
            acc.Probability.Select(x => acc.Tokens > 0 ? x / acc.Tokens : 0).ToArray(),
            acc.Tokens > 0 ? acc.EntropySum / acc.Tokens : 0);
    }).ToList();

    /// <summary>Statistics of one forward call.</summary>
    public static IReadOnlyList<LayerRoutingStatistics> Compute(RouterLogitsCollector collector)
    {
        var s = new RoutingStatistics();
        s.Add(collector);
        return s.Result();
    }

    public void Clear() => _layers.Clear();
}
