using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>What a router policy sees when one mixture-of-experts block routes one forward step.</summary>
public sealed class RouterStep
{
    /// <summary>Decoder layer index.</summary>
    public required int Layer { get; init; }

    /// <summary>The router's input <c>[B, T, hidden]</c> in the router dtype (the post-attention-norm hidden state,
    /// after jitter in training).</summary>
    public required Tensor Input { get; init; }

    /// <summary>Router logits <c>[B, T, E]</c> (fp32, or fp64 for an fp64 model).</summary>
    public required Tensor Logits { get; init; }

    /// <summary><c>softmax(Logits)</c> over the experts.</summary>
    public required Tensor Probabilities { get; init; }

    /// <summary>The configured strategy (top-k, top-p, switch): turn any probabilities into a decision.</summary>
    public required IRoutingStrategy Strategy { get; init; }

    /// <summary>The forward context: token mask, cache position, and <see cref="ForwardContext.Routing"/>
    /// (privilege labels, policy state).</summary>
    public required ForwardContext Context { get; init; }
}

/// <summary>
/// Decides the experts and weights of every token of a step. The free policy applies the strategy to each token's own
/// probabilities; other policies (e.g. routing frozen from the first untrusted token) replace decisions from
/// <see cref="RoutingContext"/> state. Policies see every layer through <see cref="RouterStep.Layer"/>.
/// </summary>
public interface IRouterPolicy
{
    /// <summary>A short name for configs and traces (<c>free</c>, ...).</summary>
    string Name { get; }

    RoutingDecision Route(RouterStep step);
}

/// <summary>MixLoRA as published: every token is routed on its own hidden state.</summary>
public sealed class FreeRouterPolicy : IRouterPolicy
{
    public static readonly FreeRouterPolicy Instance = new();

    private FreeRouterPolicy() { }

    public string Name => "free";

    public RoutingDecision Route(RouterStep step) => step.Strategy.Select(step.Probabilities);
}
