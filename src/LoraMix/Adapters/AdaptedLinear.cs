using LoraMix.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Adapters;

/// <summary>
/// A linear layer with a frozen base weight and any number of named LoRA deltas. Its own parameters keep the Hugging Face
/// names (<c>weight</c>, <c>bias</c>), so the base model's state dict is unchanged; deltas live under
/// <c>lora.&lt;adapter&gt;.lora_A|lora_B</c>. The forward pass is <c>x·Wᵀ + b + Σ_active delta(x)</c>; merged deltas are
/// folded into W and skipped.
/// </summary>
public sealed class AdaptedLinear : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")] private readonly Parameter _weight;
    [ComponentName(Name = "bias")] private readonly Parameter? _bias;
    [ComponentName(Name = "lora")] private readonly NamedModules<LoraDelta> _deltas = new();
    private readonly HashSet<string> _merged = new(StringComparer.Ordinal);
    private IReadOnlyList<string> _active = [];

    /// <summary>Wraps a dense layer, taking over its weight and bias tensors (no copy).</summary>
    public AdaptedLinear(LinearLayer baseLayer) : base(nameof(AdaptedLinear))
    {
        InFeatures = baseLayer.InFeatures;
        OutFeatures = baseLayer.OutFeatures;
        _weight = baseLayer.Weight;
        _bias = baseLayer.Bias;
        RegisterComponents();
    }

    public long InFeatures { get; }
    public long OutFeatures { get; }
    public Parameter Weight => _weight;
    public Parameter? Bias => _bias;

    /// <summary>Adapter names in insertion order.</summary>
    public IReadOnlyList<string> AdapterNames => _deltas.Names;

    /// <summary>The adapters applied in the forward pass (empty = the base layer alone).</summary>
    public IReadOnlyList<string> ActiveAdapters
    {
        get => _active;
        set
        {
            foreach (var n in value)
                if (!HasAdapter(n)) throw new ArgumentException($"no adapter '{n}' on this layer; have: {string.Join(", ", AdapterNames)}");
            _active = value.ToArray();
        }
    }

    public bool HasAdapter(string name) => _deltas.TryGet(name, out _);

    public LoraDelta GetAdapter(string name) =>
        _deltas.TryGet(name, out var d) ? d : throw new ArgumentException($"no adapter '{name}' on this layer; have: {string.Join(", ", AdapterNames)}");

    /// <summary>Adds a delta under <paramref name="name"/> (a valid module name: no dots).</summary>
    public LoraDelta AddAdapter(string name, int rank, double alpha, double dropout, bool useRsLora, Generator? generator = null)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.')) throw new ArgumentException($"adapter name '{name}' must be non-empty and contain no '.'");
        if (HasAdapter(name)) throw new ArgumentException($"adapter '{name}' already exists on this layer");
        var delta = new LoraDelta(InFeatures, OutFeatures, rank, alpha, dropout, useRsLora, _weight.device, _weight.dtype, generator);
        _deltas.Add(name, delta);
        return delta;
    }

    /// <summary>Removes an adapter (unmerging it first if merged).</summary>
    public void RemoveAdapter(string name)
    {
        if (_merged.Contains(name)) Unmerge(name);
        var delta = GetAdapter(name);
        _deltas.Remove(name);
        _active = _active.Where(n => n != name).ToArray();
        delta.Dispose();
    }

    /// <summary>Folds an adapter into the base weight (W += scale·B·A); it is then skipped in the forward pass.</summary>
    public void Merge(string name)
    {
        if (!_merged.Add(name)) return;
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        _weight.add_(GetAdapter(name).DeltaWeight().to(_weight.dtype));
    }

    /// <summary>Subtracts a merged adapter from the base weight again.</summary>
    public void Unmerge(string name)
    {
        if (!_merged.Remove(name)) return;
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        _weight.sub_(GetAdapter(name).DeltaWeight().to(_weight.dtype));
    }

    public bool IsMerged(string name) => _merged.Contains(name);

    public override Tensor forward(Tensor x)
    {
        if (_active.Count == 0) return nn.functional.linear(x, _weight, _bias);
        using var scope = NewDisposeScope();
        var y = nn.functional.linear(x, _weight, _bias);
        foreach (var name in _active)
            if (!_merged.Contains(name)) y = y + GetAdapter(name).call(x);
        return y.MoveToOuterDisposeScope();
    }
}
