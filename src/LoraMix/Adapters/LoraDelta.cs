using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Adapters;

/// <summary>
/// One low-rank update <c>ΔW = scale · B·A</c> (A: [r, in], B: [out, r]). This is the only place LoRA arithmetic
/// lives: plain LoRA, MixLoRA experts, X-LoRA adapters and LoRI all use it through <see cref="AdaptedLinear"/>.
/// </summary>
public sealed class LoraDelta : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "lora_A")] private readonly Parameter _a;
    [ComponentName(Name = "lora_B")] private readonly Parameter _b;

    /// <summary>Creates A (kaiming-uniform with a = √5, as PEFT) and B (zeros): the delta starts as an exact no-op.</summary>
    public LoraDelta(long inFeatures, long outFeatures, int rank, double alpha, double dropout, bool useRsLora,
        Device? device = null, ScalarType dtype = ScalarType.Float32, Generator? generator = null) : base(nameof(LoraDelta))
    {
        if (rank <= 0) throw new ArgumentOutOfRangeException(nameof(rank), rank, "LoRA rank r must be positive");
        if (dropout is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(dropout), dropout, "lora_dropout must be in [0, 1)");
        Rank = rank;
        Alpha = alpha;
        DropoutP = dropout;
        Scale = useRsLora ? alpha / Math.Sqrt(rank) : alpha / rank;
        var a = empty(rank, inFeatures, dtype: ScalarType.Float32);
        // kaiming_uniform_(a=√5) on [r, in]: bound = gain·√(3/fan_in) with gain = √(2/(1+5)) → bound = 1/√in
        double bound = 1.0 / Math.Sqrt(inFeatures);
        using (no_grad()) a.uniform_(-bound, bound, generator);
        var converted = a.to(dtype, device ?? CPU);
        if (!ReferenceEquals(converted, a)) a.Dispose();   // the fp32 draw is not kept: the adapter frees all it made
        _a = new Parameter(converted);
        _b = new Parameter(zeros(outFeatures, rank, dtype: dtype, device: device));
        RegisterComponents();
    }

    public int Rank { get; }
    public double Alpha { get; }
    public double DropoutP { get; }
    /// <summary>α/r, or α/√r with rsLoRA.</summary>
    public double Scale { get; }

    /// <summary>A: [r, in].</summary>
    public Parameter A => _a;
    /// <summary>B: [out, r].</summary>
    public Parameter B => _b;

    /// <summary><c>dropout(x)·Aᵀ·Bᵀ·scale</c>; dropout only in training mode.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return (Unscaled(x) * Scale).MoveToOuterDisposeScope();
    }

    /// <summary><c>dropout(x)·Aᵀ·Bᵀ</c>, the update before <see cref="Scale"/> (for callers that fold the scale into a
    /// fused add, e.g. <c>index_add</c>'s alpha); dropout only in training mode.</summary>
    public Tensor Unscaled(Tensor x)
    {
        var h = DropoutP > 0 && training ? nn.functional.dropout(x, DropoutP, true) : x;
        return nn.functional.linear(nn.functional.linear(h, _a), _b);
    }

    /// <summary>The dense update <c>scale·B·A</c> [out, in] (for merging).</summary>
    public Tensor DeltaWeight() => _b.matmul(_a) * Scale;
}
