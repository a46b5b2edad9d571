using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>
/// MixLoRA's training objective: next-token cross-entropy plus the router losses (<see cref="MixLoraLosses"/>: the
/// strategy's load-balancing loss and the z-loss, each with its coefficient) over every layer's router logits, collected
/// through a <see cref="RoutingContext"/> with padding masked. The batch's privilege labels (<see cref="CollatedBatch.Privileges"/>)
/// go to that context, so <c>router_policy: privileged</c> applies in training and evaluation as in inference; the router
/// losses and statistics then count only the tokens the router routed itself (frozen tokens are excluded, as in
/// <see cref="MixLoraLosses"/>). The trainer adds the total as the auxiliary loss (logged as
/// <c>aux_loss</c>); the parts are logged apart as <c>load_balance_loss</c> and <c>z_loss</c>, with the routing statistics
/// <c>router_entropy</c> (nats, mean over layers) and <c>expert_load_max</c> (the busiest expert's share of assignments,
/// mean over layers; 1/num_experts is perfectly balanced).
/// </summary>
/// <remarks>
/// During evaluation the per-layer statistics are also accumulated in <see cref="EvalStatistics"/> (reset when an
/// evaluation pass begins, i.e. on the first evaluation call after a training call), so the caller can report per-layer
/// expert load after training.
/// </remarks>
public sealed class MixLoraObjective(MixLoraConfig config) : ITrainingObjective
{
    private bool _lastWasTraining = true;

    /// <summary>The config whose coefficients and strategy the losses use.</summary>
    public MixLoraConfig Config { get; } = config ?? throw new ArgumentNullException(nameof(config));

    /// <summary>Per-layer routing statistics of the latest evaluation pass.</summary>
    public RoutingStatistics EvalStatistics { get; } = new();

    public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
    {
        if (!training && _lastWasTraining) EvalStatistics.Clear();
        _lastWasTraining = training;
        using var routing = new RoutingContext { Collector = new RouterLogitsCollector() };
        batch.ApplyPrivileges(routing);
        var padding = batch.PaddingMask();
        var logits = model.Forward(batch.InputIds, routing: routing, adapters: batch.Adapters);
        var ce = CausalLmObjective.ShiftedCrossEntropySum(logits, batch.Labels);
        var collector = routing.Collector!;
        if (collector.Records.Count == 0)
            throw new LoraMixException("the MixLoRA objective saw no router output: is a MixLoRA adapter attached and selected (TrainingTarget.Adapters, CollatedBatch.Adapters)?");
        // Real tokens the router routed on their own hidden state (the record's mask excludes frozen tokens; null: all).
        Tensor Counted(RouterRecord r) => r.TokenMask is null ? padding : padding * r.TokenMask.to(ScalarType.Int64);
        var terms = MixLoraLosses.Compute(Config, collector, Counted(collector.Records[0]));
        var stats = new RoutingStatistics();
        foreach (var r in collector.Records)
        {
            var masked = r with { TokenMask = Counted(r) };
            stats.Add(masked);
            if (!training) EvalStatistics.Add(masked);
        }
        var layers = stats.Result();
        var metrics = new Dictionary<string, double>(StringComparer.Ordinal)
        {
            ["load_balance_loss"] = terms.LoadBalancing.to(ScalarType.Float64).item<double>(),
            ["z_loss"] = terms.ZLoss.to(ScalarType.Float64).item<double>(),
            ["router_entropy"] = layers.Average(l => l.Entropy),
            ["expert_load_max"] = layers.Average(l => l.ExpertLoad.Max()),
        };
        return new ObjectiveOutput(ce, training ? terms.Total : null, metrics);
    }
}
