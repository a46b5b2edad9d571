using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// An adapter whose rows need a first, "scaling" pass before the real one (X-LoRA): the model runs the rows that select
/// it once with <see cref="ScalingPassChoice"/>, hands the post-final-norm hidden states to <see cref="Scalings"/>, and then
/// runs the scaled pass in which every wrapped linear layer mixes <see cref="Experts"/> with those per-token scalings
/// (<see cref="ForwardContext.Scalings"/>). Registered on the model under its name
/// (<see cref="LlamaForCausalLM.RegisterScalingAdapter"/>).
/// </summary>
public interface IScalingPassAdapter
{
    /// <summary>The adapter's name (what a forward call selects).</summary>
    string Name { get; }

    /// <summary>The experts: names of LoRA adapters attached to the model, in adapter-index order.</summary>
    IReadOnlyList<string> Experts { get; }

    /// <summary>Number of wrapped modules L (the scalings' third axis).</summary>
    int NumModules { get; }

    /// <summary>g: multiplies every expert's update in the scaled pass.</summary>
    double GlobalScalingWeight { get; }

    /// <summary>What the scaling pass runs for this adapter's rows: the base model (scaling_pass_value 0: no LoRA matmul
    /// at all) or every expert at weight <c>scaling_pass_value · g</c>.</summary>
    AdapterChoice ScalingPassChoice { get; }

    /// <summary>The adapter's router policy for its scalings (<c>free</c> or <c>privileged</c>).</summary>
    Routing.IRouterPolicy Policy { get; }

    /// <summary>Number of experts N.</summary>
    int NumExperts => Experts.Count;

    /// <summary>The module index l of <paramref name="slot"/>, or -1 when the adapter does not wrap it.</summary>
    int ModuleIndex(LinearSlot slot);

    /// <summary>Scalings <c>[R, T, L, N]</c> from scaling-pass hidden states <c>[R, T, hidden]</c>, with every per-module
    /// step applied (softmax with temperature, top-k mask, softmax over the kept entries).</summary>
    Tensor Scalings(Tensor hidden);
}

/// <summary>The scalings of one forward call: for each scaling-pass adapter some row selects, a tensor
/// <c>[B, T, L, N]</c> over the whole batch (rows that do not select it hold zeros, never read).</summary>
public sealed class ScalingSet
{
    private readonly Dictionary<string, (IScalingPassAdapter Adapter, Tensor Scalings)> _items;

    internal ScalingSet(Dictionary<string, (IScalingPassAdapter, Tensor)> items) => _items = items;

    /// <summary>The adapter and its scalings, or null when no row of the call selects <paramref name="name"/>.</summary>
    public (IScalingPassAdapter Adapter, Tensor Scalings)? Get(string name) => _items.TryGetValue(name, out var v) ? v : null;

    /// <summary>Every adapter of the call with its scalings.</summary>
    public IEnumerable<(string Name, IScalingPassAdapter Adapter, Tensor Scalings)> Items =>
        _items.Select(kv => (kv.Key, kv.Value.Adapter, kv.Value.Scalings));

    /// <summary>The set restricted to rows <paramref name="rowIndex"/> (a sub-batch).</summary>
    internal ScalingSet Select(Tensor rowIndex) =>
        new(_items.ToDictionary(kv => kv.Key, kv => (kv.Value.Adapter, kv.Value.Scalings.index_select(0, rowIndex))));
}

/// <summary>
/// What a KV cache keeps for scaling-pass adapters (X-LoRA), per sequence: the second cache of the scaling pass (the
/// scaled pass uses the main one: mistral.rs's dual cache), and the non-granular state — after
/// <see cref="NonGranularIndex"/> decode steps a row's scalings are frozen and its scaling pass is skipped.
/// </summary>
public sealed class ScalingPassCacheState : IDisposable
{
    internal ScalingPassCacheState(long batch)
    {
        DecodeSteps = new int[batch];
        Frozen = new Tensor?[batch];
        NonGranularIndex = new int?[batch];
    }

    /// <summary>The scaling pass's own KV cache (created on the first call), or null.</summary>
    public KvCache? ScalingCache { get; internal set; }

    /// <summary>Per row: the decode step (a one-token call) after which its scalings freeze, or null (never: every token
    /// gets its own scalings). mistral.rs's <c>tgt_non_granular_index</c>, kept per sequence.</summary>
    public int?[] NonGranularIndex { get; }

    /// <summary>Per row: decode steps seen so far.</summary>
    internal int[] DecodeSteps { get; }

    /// <summary>Per row: the frozen scalings <c>[1, L, N]</c>, or null while the row still runs its scaling pass.</summary>
    internal Tensor?[] Frozen { get; }

    /// <summary>True when row <paramref name="row"/>'s scalings are frozen (non-granular).</summary>
    public bool IsFrozen(int row) => Frozen[row] is not null;

    internal void Reset()
    {
        ScalingCache?.Reset();
        Array.Clear(DecodeSteps);
        for (int i = 0; i < Frozen.Length; i++)
        {
            Frozen[i]?.Dispose();
            Frozen[i] = null;
        }
    }

    public void Dispose()
    {
        ScalingCache?.Dispose();
        foreach (var f in Frozen) f?.Dispose();
    }
}
