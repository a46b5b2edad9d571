using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>
/// The routing decision of one mixture-of-experts block for one forward step: for every token, up to K expert slots with
/// their combination weights. Shapes are <c>[B, T, K]</c>; the weights are in the router's dtype (fp32, or fp64 for an
/// fp64 model) and carry gradients to the router.
/// </summary>
public sealed class RoutingDecision
{
    /// <summary>Expert index per slot, int64 <c>[B, T, K]</c>.</summary>
    public required Tensor Experts { get; init; }

    /// <summary>Combination weight per slot <c>[B, T, K]</c> (an inactive slot's weight is ignored).</summary>
    public required Tensor Weights { get; init; }

    /// <summary>Which slots run, bool <c>[B, T, K]</c>; null = every slot (top-k). Top-p keeps a variable number of
    /// slots; Switch drops the tokens over an expert's capacity.</summary>
    public Tensor? Active { get; init; }

    /// <summary>
    /// Weight <c>[B, T]</c> with which the block's input is added to its output, or null. Switch routing passes tokens
    /// over capacity through as <c>p_max · x</c> (Switch Transformers / MoE-PEFT semantics).
    /// </summary>
    public Tensor? Passthrough { get; init; }

    /// <summary>
    /// Tokens whose decision is the router's own output on their own hidden state, bool <c>[B, T]</c>; null = every
    /// token. A policy that freezes routing (<see cref="PrivilegedRouterPolicy"/>) sets it false on frozen tokens (and
    /// padding): the auxiliary losses and routing statistics count only these tokens.
    /// </summary>
    public Tensor? Routed { get; init; }

    /// <summary>
    /// The logits to record for this step <c>[B, T, E]</c> (collector, losses), or null for the router's logits of every
    /// token (<see cref="RouterStep.Logits"/>). A policy that does not run the router on some tokens gives here the
    /// effective logits it routed them with (softmax of them = the distribution the strategy was applied to).
    /// </summary>
    public Tensor? Logits { get; init; }
}

/// <summary>
/// How routing probabilities become a decision (the configured <c>routing_strategy</c>). Policies call it on the
/// probabilities they choose (a token's own, a snapshot, a pooled distribution), so a policy never re-implements top-k.
/// </summary>
public interface IRoutingStrategy
{
    /// <summary>The number of experts E.</summary>
    int NumExperts { get; }

    /// <summary>Slots per token in a decision (K).</summary>
    int Slots { get; }

    /// <summary>Selects experts and weights from softmax probabilities <c>[B, T, E]</c>.</summary>
    /// <param name="probabilities">Probabilities <c>[B, T, E]</c>.</param>
    /// <param name="capacityMask">Bool <c>[B, T]</c>: the tokens that count against an expert's capacity (switch), or
    /// null for every token. Tokens outside it are never dropped. Top-k and top-p ignore it.</param>
    RoutingDecision Select(Tensor probabilities, Tensor? capacityMask = null);
}

/// <summary>Mixtral / MixLoRA top-k: the k most probable experts, weights renormalised to sum to one.</summary>
public sealed class TopKRouting : IRoutingStrategy
{
    public TopKRouting(int numExperts, int topK)
    {
        if (numExperts < 1) throw new ArgumentOutOfRangeException(nameof(numExperts), numExperts, "need at least one expert");
        if (topK < 1 || topK > numExperts)
            throw new ArgumentOutOfRangeException(nameof(topK), topK, $"top_k must be in [1, {numExperts}]");
        NumExperts = numExperts;
        TopK = topK;
    }

    public int NumExperts { get; }
    public int TopK { get; }
    public int Slots => TopK;

    public RoutingDecision Select(Tensor probabilities, Tensor? capacityMask = null)
    {
        var (w, idx) = probabilities.topk(TopK, dim: -1);
        return new RoutingDecision { Experts = idx, Weights = w / w.sum(-1, keepdim: true) };
    }
}

/// <summary>
/// MixLoRA-dynamic top-p: probabilities (divided by <c>temperature</c> when it is positive) sorted in descending order;
/// the experts up to and including the first whose cumulative value exceeds <c>top_p</c> are kept, with their
/// (unrenormalised) values as weights, as MoE-PEFT does.
/// </summary>
public sealed class TopPRouting : IRoutingStrategy
{
    public TopPRouting(int numExperts, double topP, double temperature)
    {
        if (numExperts < 1) throw new ArgumentOutOfRangeException(nameof(numExperts), numExperts, "need at least one expert");
        if (!(topP > 0 && topP <= 1)) throw new ArgumentOutOfRangeException(nameof(topP), topP, "top_p must be in (0, 1]");
        if (!(temperature >= 0)) throw new ArgumentOutOfRangeException(nameof(temperature), temperature, "temperature must be >= 0");
        NumExperts = numExperts;
        TopP = topP;
        Temperature = temperature;
    }

    public int NumExperts { get; }
    public double TopP { get; }
    public double Temperature { get; }
    public int Slots => NumExperts;

    public RoutingDecision Select(Tensor probabilities, Tensor? capacityMask = null)
    {
        var q = Temperature > 0 ? probabilities / Temperature : probabilities;
        var (sorted, idx) = q.sort(-1, descending: true);
        var cumulative = sorted.cumsum(-1);
        var before = cumulative - sorted;   // exclusive cumulative sum: what the experts ranked above hold
        var active = before.le(TopP);
        // the first slot always runs, whatever rounding does
        active = active.logical_or(zeros_like(active).index_fill_(-1, tensor(0L, device: active.device), true));
        return new RoutingDecision { Experts = idx, Weights = sorted, Active = active };
    }
}

/// <summary>
/// Switch top-1: the arg-max expert with weight <c>p_max</c> (not renormalised). Each expert takes at most
/// <c>expert_capacity</c> tokens per sequence (in order); the others pass through as <c>p_max · x</c>.
/// </summary>
public sealed class SwitchRouting : IRoutingStrategy
{
    public SwitchRouting(int numExperts, int expertCapacity)
    {
        if (numExperts < 1) throw new ArgumentOutOfRangeException(nameof(numExperts), numExperts, "need at least one expert");
        if (expertCapacity < 1) throw new ArgumentOutOfRangeException(nameof(expertCapacity), expertCapacity, "expert_capacity must be positive");
        NumExperts = numExperts;
        ExpertCapacity = expertCapacity;
    }

    public int NumExperts { get; }
    public int ExpertCapacity { get; }
    public int Slots => 1;

    public RoutingDecision Select(Tensor probabilities, Tensor? capacityMask = null)
    {
        var (w, idx) = probabilities.max(-1, keepdim: true);                         // [B, T, 1]
        var oneHot = nn.functional.one_hot(idx.squeeze(-1), NumExperts);             // [B, T, E]
        if (capacityMask is not null) oneHot = oneHot * capacityMask.unsqueeze(-1).to(oneHot.dtype);   // uncounted: rank 0
        var rank = (oneHot.cumsum(1) * oneHot).sum(-1, keepdim: true);               // position in its expert's queue
        var active = rank.le(ExpertCapacity);
        var passthrough = w.squeeze(-1) * active.logical_not().squeeze(-1).to(w.dtype);
        return new RoutingDecision { Experts = idx, Weights = w, Active = active, Passthrough = passthrough };
    }
}
