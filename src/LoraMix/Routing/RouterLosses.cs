using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>
/// Auxiliary router losses as plain functions of the router logits of all layers (each <c>[B, T, E]</c> or
/// <c>[N, E]</c>, concatenated over layers as MoE-PEFT does) and an optional padding mask <c>[B, T]</c> (1 = real
/// token) shared by all layers. They return unscaled scalars in the logits' dtype; coefficients are applied by the caller
/// (see <c>MixLoraLosses</c>).
/// </summary>
public static class RouterLosses
{
    /// <summary>
    /// Mixtral load-balancing loss: with <c>P = softmax(logits)</c>, <c>f[k,i]</c> = fraction of (masked) tokens whose
    /// k-th choice is expert i and <c>P̄_i</c> = mean probability of expert i, returns <c>E · Σ_k Σ_i f[k,i]·P̄_i</c>
    /// (so a perfectly balanced router gives <c>k</c>).
    /// </summary>
    public static Tensor LoadBalancing(IReadOnlyList<Tensor> routerLogits, int topK, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        var (logits, mask) = Flatten(routerLogits, attentionMask);
        long e = logits.shape[1];
        if (topK < 1 || topK > e) throw new ArgumentOutOfRangeException(nameof(topK), topK, $"top_k must be in [1, {e}]");
        var p = nn.functional.softmax(logits, -1);
        var chosen = p.topk(topK, dim: -1).indexes;
        var counts = zeros_like(p).scatter_(1, chosen, ones_like(chosen, dtype: p.dtype));
        return Balance(p, counts, mask).MoveToOuterDisposeScope();
    }

    /// <summary>The load-balancing loss with MixLoRA-dynamic's top-p selection in place of top-k.</summary>
    public static Tensor TopPLoadBalancing(IReadOnlyList<Tensor> routerLogits, double topP, double temperature, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        var (logits, mask) = Flatten(routerLogits, attentionMask);
        var p = nn.functional.softmax(logits, -1);
        var d = new TopPRouting((int)p.shape[1], topP, temperature).Select(p.detach());
        var counts = zeros_like(p).scatter_(1, d.Experts, d.Active!.to(p.dtype));
        return Balance(p, counts, mask).MoveToOuterDisposeScope();
    }

    /// <summary>Switch Transformers' load-balancing loss: top-1 (arg-max) fractions, <c>E · Σ_i f_i·P̄_i</c>.</summary>
    public static Tensor SwitchLoadBalancing(IReadOnlyList<Tensor> routerLogits, Tensor? attentionMask = null) =>
        LoadBalancing(routerLogits, 1, attentionMask);

    /// <summary>Router z-loss (ST-MoE / Switch): mean over (masked) tokens of <c>logsumexp(logits)²</c>.</summary>
    public static Tensor ZLoss(IReadOnlyList<Tensor> routerLogits, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        var (logits, mask) = Flatten(routerLogits, attentionMask);
        var z = logits.logsumexp(-1).pow(2);
        return MaskedMean(z, mask).MoveToOuterDisposeScope();
    }

    /// <summary>Mean router entropy (nats) over (masked) tokens of all given layers.</summary>
    public static Tensor Entropy(IReadOnlyList<Tensor> routerLogits, Tensor? attentionMask = null)
    {
        using var scope = NewDisposeScope();
        var (logits, mask) = Flatten(routerLogits, attentionMask);
        var logp = nn.functional.log_softmax(logits, -1);
        var h = -(logp.exp() * logp).sum(-1);
        return MaskedMean(h, mask).MoveToOuterDisposeScope();
    }

    private static Tensor Balance(Tensor p, Tensor counts, Tensor? mask)
    {
        long e = p.shape[1];
        Tensor f, pBar;
        if (mask is null)
        {
            f = counts.mean([0L]);
            pBar = p.mean([0L]);
        }
        else
        {
            var m = mask.unsqueeze(1);
            var total = mask.sum();
            f = (counts * m).sum(0L) / total;
            pBar = (p * m).sum(0L) / total;
        }
        return (f * pBar).sum() * e;
    }

    private static Tensor MaskedMean(Tensor values, Tensor? mask) =>
        mask is null ? values.mean() : (values * mask).sum() / mask.sum();

    /// <summary>Concatenates the layers' logits to <c>[L·N, E]</c> (at least fp32) and repeats the mask per layer.</summary>
    internal static (Tensor Logits, Tensor? Mask) Flatten(IReadOnlyList<Tensor> routerLogits, Tensor? attentionMask)
    {
        if (routerLogits.Count == 0) throw new ArgumentException("no router logits (was a mixture-of-experts adapter active?)", nameof(routerLogits));
        long e = routerLogits[0].shape[^1];
        var dtype = routerLogits[0].dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var flat = routerLogits.Select(l =>
        {
            if (l.shape[^1] != e) throw new ArgumentException($"router logits disagree on the number of experts ({l.shape[^1]} vs {e})");
            return l.reshape(-1, e).to(dtype);
        }).ToList();
        var logits = flat.Count == 1 ? flat[0] : cat(flat, 0);
        if (attentionMask is null) return (logits, null);
        var m = attentionMask.reshape(-1).to(dtype, logits.device);
        if (m.shape[0] != flat[0].shape[0])
            throw new ArgumentException($"attention mask has {m.shape[0]} tokens but each layer's router logits have {flat[0].shape[0]}", nameof(attentionMask));
        if (m.sum().to(ScalarType.Float64).item<double>() <= 0) throw new ArgumentException("the attention mask has no real token", nameof(attentionMask));
        var mask = flat.Count == 1 ? m : cat(Enumerable.Repeat(m, flat.Count).ToList(), 0);
        return (logits, mask);
    }
}
