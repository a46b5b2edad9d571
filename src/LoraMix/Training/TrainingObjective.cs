using LoraMix.Modeling;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>What an objective computed for one micro-batch.</summary>
/// <param name="TargetLossSum">The token loss summed over the batch's target tokens (a 0-d fp32 tensor with a graph when
/// training). The trainer divides it by the number of target tokens of the whole optimizer step, so gradient accumulation
/// equals a larger batch.</param>
/// <param name="AuxiliaryLoss">An optional per-batch auxiliary loss (e.g. MixLoRA's load-balancing loss, already multiplied
/// by its coefficient), added to the mean token loss with the batch's share of the step's target tokens as weight.</param>
/// <param name="Metrics">Named extra values (e.g. <c>aux_loss</c>, <c>router_entropy</c>), logged apart; averaged over the
/// step's micro-batches weighted by target tokens.</param>
public sealed record ObjectiveOutput(Tensor TargetLossSum, Tensor? AuxiliaryLoss = null, IReadOnlyDictionary<string, double>? Metrics = null);

/// <summary>
/// The training objective: the extension point for methods whose loss is more than next-token cross-entropy. It runs the
/// forward pass itself (so it can set a routing context or capture router statistics) and returns the summed token loss,
/// an optional auxiliary loss and extra metrics. <see cref="CausalLmObjective"/> is the default.
/// </summary>
public interface ITrainingObjective
{
    /// <summary>Computes the loss of one collated micro-batch. <paramref name="training"/> is false during evaluation
    /// (which runs under <c>no_grad</c> with the model in eval mode).</summary>
    ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training);
}

/// <summary>
/// Next-token cross-entropy on the labelled positions: logits at position t−1 against <c>Labels[t]</c>, computed in fp32,
/// summed (positions labelled -100 are ignored). When the batch has privilege labels they go to the forward's routing
/// context, so a mixture adapter with <c>router_policy: privileged</c> trains under its policy here too.
/// </summary>
public sealed class CausalLmObjective : ITrainingObjective
{
    /// <summary>Routes with each adapter's configured <c>router_policy</c>.</summary>
    public static CausalLmObjective Instance { get; } = new();

    /// <param name="routerPolicy">Route mixture adapters with this policy instead of their configured one (null: theirs).</param>
    public CausalLmObjective(IRouterPolicy? routerPolicy = null) => RouterPolicy = routerPolicy;

    /// <summary>The policy override, or null.</summary>
    public IRouterPolicy? RouterPolicy { get; }

    public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
    {
        if (batch.Privileges is null && RouterPolicy is null)
            return new(ShiftedCrossEntropySum(model.Forward(batch.InputIds, adapters: batch.Adapters), batch.Labels));
        using var routing = new RoutingContext { Policy = RouterPolicy };
        batch.ApplyPrivileges(routing);
        return new(ShiftedCrossEntropySum(model.Forward(batch.InputIds, routing: routing, adapters: batch.Adapters), batch.Labels));
    }

    /// <summary>Σ CE(logits[:, t−1], labels[:, t]) over labels ≠ -100, in fp32 (a 0-d tensor).</summary>
    public static Tensor ShiftedCrossEntropySum(Tensor logits, Tensor labels)
    {
        using var scope = NewDisposeScope();
        long t = logits.shape[1];
        var l = logits.narrow(1, 0, t - 1).to(ScalarType.Float32).reshape(-1, logits.shape[2]);
        var y = labels.narrow(1, 1, t - 1).reshape(-1);
        return nn.functional.cross_entropy(l, y, ignore_index: CollatedBatch.IgnoreIndex, reduction: nn.Reduction.Sum)
            .MoveToOuterDisposeScope();
    }
}
