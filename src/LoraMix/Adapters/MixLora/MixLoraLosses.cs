using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Adapters.MixLora;

/// <summary>The weighted auxiliary router losses of one forward pass, kept apart for logging.</summary>
/// <param name="LoadBalancing">Coefficient × load-balancing loss (zero tensor when disabled).</param>
/// <param name="ZLoss">Coefficient × router z-loss (zero tensor when disabled).</param>
/// <param name="Total">Their sum: add it to the language-model loss (scaled by the same accumulation factor).</param>
public sealed record RouterLossTerms(Tensor LoadBalancing, Tensor ZLoss, Tensor Total);

/// <summary>
/// MixLoRA's auxiliary losses from a config and the router logits collected during a forward pass
/// (<see cref="RoutingContext.Collector"/>): the load-balancing loss of the configured strategy (Mixtral top-k, top-p, or
/// Switch top-1) over all layers, <c>router_aux_loss_coef</c> × it when <c>router_loss</c> is on; plus
/// <c>router_z_loss_coef</c> × the z-loss. Padding is masked (the collector's token mask, or the given one).
/// A trainer's objective adds <see cref="RouterLossTerms.Total"/> to the cross-entropy.
/// </summary>
public static class MixLoraLosses
{
    public static RouterLossTerms Compute(MixLoraConfig config, RouterLogitsCollector collector, Tensor? attentionMask = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(collector);
        var records = collector.Records;
        if (records.Count == 0) throw new InvalidOperationException("no router logits were collected: was a MixLoRA adapter active and the collector in the forward's RoutingContext?");
        return Compute(config, records.Select(r => r.Logits).ToList(), attentionMask ?? records[0].TokenMask);
    }

    /// <summary>The same from explicit per-layer logits (<c>[B, T, E]</c>) and a padding mask <c>[B, T]</c>.</summary>
    public static RouterLossTerms Compute(MixLoraConfig config, IReadOnlyList<Tensor> routerLogits, Tensor? attentionMask)
    {
        using var scope = NewDisposeScope();
        var dtype = routerLogits[0].dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var device = routerLogits[0].device;
        Tensor aux = zeros([], dtype: dtype, device: device), z = zeros([], dtype: dtype, device: device);
        if (config.RouterLoss && config.RouterAuxLossCoef > 0)
        {
            var balance = config.RoutingStrategy switch
            {
                MixLoraConfig.TopKStrategy => RouterLosses.LoadBalancing(routerLogits, config.TopK, attentionMask),
                MixLoraConfig.TopPStrategy => RouterLosses.TopPLoadBalancing(routerLogits, config.TopP, config.Temperature, attentionMask),
                _ => RouterLosses.SwitchLoadBalancing(routerLogits, attentionMask),
            };
            aux = balance * config.RouterAuxLossCoef;
        }
        if (config.RouterLoss && config.EffectiveRouterZLossCoef > 0)
            z = RouterLosses.ZLoss(routerLogits, attentionMask) * config.EffectiveRouterZLossCoef;
        var total = aux + z;
        return new RouterLossTerms(aux.MoveToOuterDisposeScope(), z.MoveToOuterDisposeScope(), total.MoveToOuterDisposeScope());
    }
}
