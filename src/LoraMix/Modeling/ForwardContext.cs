using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// Everything a forward pass shares across layers: rotary tables for this step's positions, the attention mask
/// (or the causal flag), the KV cache and its write position. One object travels through every layer, so later
/// features (routing policies, privilege labels, traces) extend it rather than every forward signature.
/// </summary>
public sealed class ForwardContext : IRouterStepContext
{
    /// <summary>cos table [B, 1, T, D] in the compute dtype.</summary>
    public required Tensor Cos { get; init; }
    /// <summary>sin table [B, 1, T, D] in the compute dtype.</summary>
    public required Tensor Sin { get; init; }
    /// <summary>Boolean mask [B, 1, T, L] (true = attend), or null when <see cref="IsCausal"/> or a single unpadded query.</summary>
    public Tensor? AttentionMask { get; init; }
    /// <summary>True for a plain causal prefill (T == L, no padding): attention uses the fused causal kernel.</summary>
    public bool IsCausal { get; init; }
    /// <summary>The cache being filled, or null for a cache-free forward.</summary>
    public KvCache? Cache { get; init; }
    /// <summary>The first cache slot of this step's tokens.</summary>
    public long Start { get; init; }
    /// <summary>Real-token mask [B, T] (bool, true = real token) of this step, or null when nothing is padded.</summary>
    public Tensor? TokenMask { get; init; }
    /// <summary>
    /// The one routing context of this forward call (router policy, privilege labels, router-logit collector, routing
    /// trace), or null: mixture-of-experts blocks then route freely and record nothing.
    /// </summary>
    public RoutingContext? Routing { get; init; }

    /// <summary>The adapters each row runs (resolved per call), or null when every row runs the base model. Every slot
    /// that holds adapters (projections, feed-forward, embedding) reads it; none keeps an "active adapter" of its own.</summary>
    public AdapterBatch? Adapters { get; init; }

    /// <summary>The scalings of the call's scaling-pass adapters (X-LoRA), computed by the scaling pass, or null. Linear
    /// layers wrapped by such an adapter read their module's slice; nothing about them is kept on the layers.</summary>
    public ScalingSet? Scalings { get; init; }

    /// <summary>The rows of the call's batch this context covers, or null for all of them (a block that runs a sub-batch
    /// on its own passes a context for its rows, <see cref="ForRows"/>; router policies map their per-row state with it).</summary>
    public int[]? Rows { get; init; }

    /// <summary>A context for rows <paramref name="rows"/> (indices into this context's batch) of this call: rotary
    /// tables, masks and adapters restricted to them; same cache position and routing context.</summary>
    public ForwardContext ForRows(int[] rows, Tensor rowIndex) => new()
    {
        Cos = Cos.index_select(0, rowIndex),
        Sin = Sin.index_select(0, rowIndex),
        AttentionMask = AttentionMask?.index_select(0, rowIndex),
        IsCausal = IsCausal,
        Cache = null,
        Start = Start,
        TokenMask = TokenMask?.index_select(0, rowIndex),
        Routing = Routing,
        Adapters = Adapters?.Subset(rows, rowIndex.device),
        Scalings = Scalings?.Select(rowIndex),
        Rows = Rows is null ? rows : rows.Select(r => Rows[r]).ToArray(),
    };
}
