using LoraMix.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Adapters;

/// <summary>
/// A linear layer with a frozen base weight and any number of named LoRA deltas. Its own parameters keep the Hugging Face
/// names (<c>weight</c>, <c>bias</c>), so the base model's state dict is unchanged; deltas live under
/// <c>lora.&lt;adapter&gt;.lora_A|lora_B</c>. Which deltas run is not state of the layer: it reads the forward call's
/// per-row selection (<see cref="ForwardContext.Adapters"/>). The forward pass is <c>x·Wᵀ + b</c> plus, for each adapter
/// some row selects, <c>weight · delta(x)</c> on the rows that select it: the adapter's two matmuls run once per call
/// over its rows (gathered with <c>index_select</c>, added back with <c>index_add</c>; no gather when every row selects
/// it). Merged deltas are folded into W, for every row, and skipped.
/// </summary>
/// <remarks>Not thread-safe for structural changes (adding, removing, merging); forward calls with different selections
/// share nothing mutable.</remarks>
public sealed class AdaptedLinear : LinearSlot
{
    [ComponentName(Name = "weight")] private readonly Parameter _weight;
    [ComponentName(Name = "bias")] private readonly Parameter? _bias;
    [ComponentName(Name = "lora")] private readonly NamedModules<LoraDelta> _deltas = new();
    private readonly HashSet<string> _merged = new(StringComparer.Ordinal);

    /// <summary>Wraps a dense layer, taking over its weight and bias tensors (no copy).</summary>
    public AdaptedLinear(LinearLayer baseLayer) : base(nameof(AdaptedLinear))
    {
        InFeatures = baseLayer.InFeatures;
        OutFeatures = baseLayer.OutFeatures;
        _weight = baseLayer.Weight;
        _bias = baseLayer.Bias;
        RegisterComponents();
    }

    public override long InFeatures { get; }
    public override long OutFeatures { get; }
    public override Parameter Weight => _weight;
    public override Parameter? Bias => _bias;

    /// <summary>Adapter names in insertion order.</summary>
    public IReadOnlyList<string> AdapterNames => _deltas.Names;

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
        InvalidateStacks();
        return delta;
    }

    /// <summary>Removes an adapter (unmerging it first if merged) and frees its tensors.</summary>
    public void RemoveAdapter(string name)
    {
        if (_merged.Contains(name)) Unmerge(name);
        var delta = GetAdapter(name);
        _deltas.Remove(name);
        delta.Dispose();
        InvalidateStacks();
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

    /// <summary><c>x·Wᵀ + b</c> plus the selected deltas; <paramref name="x"/>'s first dimension is the batch row of
    /// <paramref name="ctx"/>'s selection. A null context (or one without adapters) runs the base layer alone.</summary>
    public override Tensor forward(Tensor x, ForwardContext? ctx)
    {
        var y = nn.functional.linear(x, _weight, _bias);
        if (ctx?.Adapters is not { } adapters) return y;
        Tensor? result = null;
        using var scope = NewDisposeScope();
        foreach (var use in adapters.Uses)
        {
            if (ctx.Scalings?.Get(use.Name) is { } scaled)
            {
                result = AddScaledExperts(result ?? y, x, use, scaled.Adapter, scaled.Scalings);
                continue;
            }
            if (!_deltas.TryGet(use.Name, out var delta) || _merged.Contains(use.Name)) continue;
            result ??= y;
            if (use.AllRows)
                result = result + use.Scale(delta.call(x));
            else
            {
                // Punica-style segment: this adapter's rows gathered, its two matmuls once over them, added back with
                // the scale (and a common weight) folded into index_add's alpha
                if (x.shape[0] != adapters.Batch)
                    throw new InvalidOperationException($"adapted layer: input has {x.shape[0]} rows but the adapter selection has {adapters.Batch}");
                var rows = delta.Unscaled(x.index_select(0, use.Index!));
                double alpha = delta.Scale;
                if (use.UniformWeight is double w) alpha *= w;
                else rows = use.Scale(rows);
                if (rows.dtype != result.dtype) rows = rows.to(result.dtype);
                if (!result.requires_grad) result.index_add_(0, use.Index!, rows, alpha);   // our own fresh tensor, no graph
                else result = result.index_add(0, use.Index!, rows, alpha);
            }
        }
        return result is null || ReferenceEquals(result, y) ? y : result.MoveToOuterDisposeScope();
    }

    private sealed record ExpertStack(Tensor A, Tensor B, Tensor ColumnExpert, Tensor ColumnScale, Tensor[] Sources) : IDisposable
    {
        public void Dispose()
        {
            A.Dispose();
            B.Dispose();
            ColumnExpert.Dispose();
            ColumnScale.Dispose();
        }
    }

    private readonly Dictionary<string, ExpertStack> _stacks = new(StringComparer.Ordinal);

    /// <summary>
    /// The experts of a scaling-pass adapter present at this layer, concatenated (A: [Σr, in], B: [out, Σr]) with each rank
    /// column's expert index and <c>scale_i · g</c>; built on first use and kept while the experts are frozen and unchanged
    /// (the same tensors, none trainable, no dropout in training). Null when stacking does not apply (trainable experts,
    /// active dropout): the per-expert loop runs instead.
    /// </summary>
    private ExpertStack? Stacked(IScalingPassAdapter adapter, int[] present)
    {
        var deltas = present.Select(i => { _deltas.TryGet(adapter.Experts[i], out var d); return d; }).ToArray();
        if (deltas.Any(d => d.A.requires_grad || d.B.requires_grad || (training && d.DropoutP > 0)))
            return null;
        var sources = deltas.SelectMany(d => new Tensor[] { d.A, d.B }).ToArray();
        if (_stacks.TryGetValue(adapter.Name, out var cached))
        {
            if (cached.Sources.Length == sources.Length && cached.Sources.Zip(sources).All(p => ReferenceEquals(p.First, p.Second)) &&
                cached.Sources.All(t => !t.IsInvalid))
                return cached;
            _stacks.Remove(adapter.Name);
            cached.Dispose();
        }
        using var noGrad = no_grad();
        var columns = new List<long>();
        var scales = new List<double>();
        for (int j = 0; j < deltas.Length; j++)
            for (int k = 0; k < deltas[j].Rank; k++)
            {
                columns.Add(present[j]);
                scales.Add(deltas[j].Scale * adapter.GlobalScalingWeight);
            }
        var stack = new ExpertStack(
            cat(deltas.Select(d => d.A).ToArray(), 0).DetachFromDisposeScope(),
            cat(deltas.Select(d => d.B).ToArray(), 1).DetachFromDisposeScope(),
            tensor(columns.ToArray(), device: _weight.device).DetachFromDisposeScope(),
            tensor(scales.ToArray(), device: _weight.device).to(deltas[0].A.dtype).DetachFromDisposeScope(),
            sources);
        _stacks[adapter.Name] = stack;
        return stack;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) InvalidateStacks();
        base.Dispose(disposing);
    }

    /// <summary>Drops the cached expert stacks (after changing an expert's weights in place).</summary>
    public void InvalidateStacks()
    {
        foreach (var s in _stacks.Values) s.Dispose();
        _stacks.Clear();
    }

    /// <summary>
    /// X-LoRA on the rows of <paramref name="use"/>: <c>Σ_i s[b,t,l,i] · g · scale_i · B_i A_i x</c> over the experts this
    /// layer holds (an expert that does not target it adds nothing; its scaling is unused, as in PEFT), with l this
    /// layer's module index and s the call's scalings <c>[B, T, L, N]</c>. The scaling multiplies the input, as PEFT does.
    /// </summary>
    private Tensor AddScaledExperts(Tensor result, Tensor x, AdapterRows use, IScalingPassAdapter adapter, Tensor scalings)
    {
        int l = adapter.ModuleIndex(this);
        if (l < 0) return result;
        if (x.dim() != 3)
            throw new InvalidOperationException($"X-LoRA needs [batch, seq, features] inputs at its layers, got [{string.Join(", ", x.shape)}]");
        var s = scalings.select(2, l);                                              // [B, T, N]
        var xr = use.AllRows ? x : x.index_select(0, use.Index!);
        if (!use.AllRows) s = s.index_select(0, use.Index!);
        var experts = adapter.Experts;
        var present = Enumerable.Range(0, experts.Count).Where(i => _deltas.TryGet(experts[i], out _)).ToArray();
        if (present.Length == 0) return result;
        if (present.FirstOrDefault(i => _merged.Contains(experts[i]), -1) is int merged and >= 0)
            throw new InvalidOperationException($"expert '{experts[merged]}' of X-LoRA adapter '{adapter.Name}' is merged into the base weights, where it " +
                                                "would act at weight 1 for every row; unmerge it before running the X-LoRA adapter");
        Tensor? sum = null;
        if (Stacked(adapter, present) is { } stack)
        {
            // one low-rank product for every expert: x·A_catᵀ, each rank column times its expert's scaling · scale_i · g,
            // then ·B_catᵀ (mathematically PEFT's Σ_i B_i A_i (x·s_i) · scale_i · g)
            var h = nn.functional.linear(xr, stack.A);                                           // [R, T, Σr]
            var m = s.index_select(-1, stack.ColumnExpert).to(h.dtype) * stack.ColumnScale;       // [R, T, Σr]
            sum = nn.functional.linear(h * m, stack.B);
        }
        else
            foreach (int i in present)
            {
                _deltas.TryGet(experts[i], out var delta);
                var update = delta.Unscaled(xr * s.select(-1, i).unsqueeze(-1).to(xr.dtype)) * (delta.Scale * adapter.GlobalScalingWeight);
                sum = sum is null ? update : sum + update;
            }
        if (sum is null) return result;
        if (sum.dtype != result.dtype) sum = sum.to(result.dtype);
        if (use.AllRows) return result + sum;
        if (!result.requires_grad && !sum.requires_grad && !ReferenceEquals(result, x)) return result.index_add_(0, use.Index!, sum, 1.0);
        return result.index_add(0, use.Index!, sum, 1.0);
    }
}
