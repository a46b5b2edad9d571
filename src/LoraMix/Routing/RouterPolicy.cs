using static TorchSharp.torch;

namespace LoraMix.Routing;

/// <summary>What a router policy sees when one mixture-of-experts block routes one forward step.</summary>
/// <remarks>
/// The router is given as a function (<see cref="Router"/>), not as precomputed logits: a policy decides which tokens'
/// hidden states the router reads. <see cref="Logits"/> and <see cref="Probabilities"/> run the router on every token
/// when first read (the free policy does); a policy that must not read some tokens (the privileged policy) never reads
/// them and calls <see cref="Router"/> on the rows it selects.
/// </remarks>
public sealed class RouterStep
{
    private Tensor? _logits, _probabilities;

    /// <summary>Decoder layer index.</summary>
    public required int Layer { get; init; }

    /// <summary>The router's input <c>[B, T, hidden]</c> in the router dtype (the post-attention-norm hidden state,
    /// after jitter in training).</summary>
    public required Tensor Input { get; init; }

    /// <summary>The router: maps router inputs <c>[N, hidden]</c> (rows of <see cref="Input"/>) to logits <c>[N, E]</c>
    /// (fp32, or fp64 for an fp64 model).</summary>
    public required Func<Tensor, Tensor> Router { get; init; }

    /// <summary>The configured strategy (top-k, top-p, switch): turn any probabilities into a decision.</summary>
    public required IRoutingStrategy Strategy { get; init; }

    /// <summary>The forward call being routed (the model's forward context): token mask and
    /// <see cref="IRouterStepContext.Routing"/> (privilege labels, policy state). When a block routes some rows of the call
    /// on their own (a batch that mixes adapters), <see cref="IRouterStepContext.Rows"/> says which rows of the call
    /// <see cref="Input"/>'s rows are.</summary>
    public required IRouterStepContext Context { get; init; }

    /// <summary>The adapter whose router this is (a policy keeps per-adapter state under it), or null.</summary>
    public string? Adapter { get; init; }

    /// <summary>Router logits of every token <c>[B, T, E]</c>, computed from every token's <see cref="Input"/> on first
    /// read.</summary>
    public Tensor Logits
    {
        get
        {
            if (_logits is null)
            {
                long b = Input.shape[0], t = Input.shape[1];
                _logits = Router(Input.reshape(b * t, Input.shape[2])).view(b, t, -1);
            }
            return _logits;
        }
    }

    /// <summary><c>softmax(Logits)</c> over the experts (computed on first read).</summary>
    public Tensor Probabilities => _probabilities ??= nn.functional.softmax(Logits, -1);
}

/// <summary>
/// What a router policy reads of the forward call it routes (the model's forward context implements it, so routing
/// needs nothing of the model).
/// </summary>
public interface IRouterStepContext
{
    /// <summary>Real-token mask <c>[B, T]</c> (bool, true = real token) of this step, or null when nothing is padded.</summary>
    Tensor? TokenMask { get; }

    /// <summary>The rows of the call's batch this step covers, or null for all of them (a block that routes a sub-batch
    /// on its own; policies map their per-row state with it).</summary>
    int[]? Rows { get; }

    /// <summary>The one routing context of the forward call (policy, privilege labels, policy state), or null.</summary>
    RoutingContext? Routing { get; }
}

/// <summary>
/// A sequence store whose calls a routing policy must follow (the model's KV cache implements it): a policy that keeps
/// per-sequence state checks by identity that a call continues the cache its state was filled with, at its length.
/// </summary>
public interface IRoutedSequenceCache
{
    /// <summary>Slots written so far (the next call's first slot).</summary>
    long Length { get; }
}

/// <summary>
/// Decides the experts and weights of every token of a step. The free policy applies the strategy to each token's own
/// probabilities; <see cref="PrivilegedRouterPolicy"/> freezes routing from the first untrusted token on, keeping its
/// snapshot in <see cref="RoutingContext.PolicyState"/>. Policies see every layer through <see cref="RouterStep.Layer"/>.
/// </summary>
public interface IRouterPolicy
{
    /// <summary>A short name for configs and traces (<c>free</c>, <c>privileged</c>, ...).</summary>
    string Name { get; }

    /// <summary>True when the policy freezes routing from a row's first untrusted token on. The model then runs a row's
    /// privileged tokens that precede the freeze in the same call on their own, so that the frozen decision cannot depend
    /// on what follows or on other rows (see <c>LlamaForCausalLM.ForwardEmbeddings</c>). A policy that
    /// wraps another forwards it.</summary>
    bool FreezesOnUntrusted => false;

    RoutingDecision Route(RouterStep step);
}

/// <summary>Helpers over router policies.</summary>
public static class RouterPolicies
{
    /// <summary>The policy as written in traces and notices: <c>free</c>, or <c>privileged, snapshot last|pooled</c>.</summary>
    public static string Describe(this IRouterPolicy policy) => policy is PrivilegedRouterPolicy p
        ? $"{p.Name}, snapshot {p.Snapshot.ToString().ToLowerInvariant()}" : policy.Name;
}

/// <summary>MixLoRA as published: every token is routed on its own hidden state.</summary>
public sealed class FreeRouterPolicy : IRouterPolicy
{
    public static readonly FreeRouterPolicy Instance = new();

    private FreeRouterPolicy() { }

    public string Name => "free";

    public RoutingDecision Route(RouterStep step) => step.Strategy.Select(step.Probabilities);
}
