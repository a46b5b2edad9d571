using TorchSharp;
using TorchSharp.Utils;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>Root-mean-square layer norm as in Hugging Face Llama: normalise in fp32, cast back, then scale.</summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    private readonly double _eps;

    public RmsNorm(long size, double eps, Device? device = null, ScalarType dtype = ScalarType.Float32) : base(nameof(RmsNorm))
    {
        _weight = new Parameter(ones(size, dtype: dtype, device: device));
        _eps = eps;
        RegisterComponents();
    }

    /// <summary>The learned scale.</summary>
    public Parameter Weight => _weight;

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        var normed = x32 * rsqrt(x32.pow(2).mean([-1L], keepdim: true) + _eps);
        return (_weight * normed.to(x.dtype)).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// A projection slot of the decoder (<c>q_proj</c> ... <c>down_proj</c>): a linear map that receives the forward context,
/// so that a slot holding adapters can read which rows run which adapter (<see cref="ForwardContext.Adapters"/>). The
/// context may be null outside a model forward (the base map alone).
/// </summary>
public abstract class LinearSlot : nn.Module<Tensor, ForwardContext?, Tensor>
{
    protected LinearSlot(string name) : base(name) { }

    public abstract long InFeatures { get; }
    public abstract long OutFeatures { get; }

    /// <summary>The frozen base weight [out, in].</summary>
    public abstract Parameter Weight { get; }

    /// <summary>The base bias [out], or null.</summary>
    public abstract Parameter? Bias { get; }
}

/// <summary>
/// A dense linear layer <c>y = x·Wᵀ + b</c> with Hugging Face parameter names (<c>weight</c> [out, in], <c>bias</c> [out]).
/// This is the base of every projection slot; adapters wrap or replace it.
/// </summary>
public sealed class LinearLayer : LinearSlot
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    [ComponentName(Name = "bias")]
    private readonly Parameter? _bias;

    /// <summary>Creates an uninitialised layer (weights are loaded or initialised by the caller).</summary>
    public LinearLayer(long inFeatures, long outFeatures, bool hasBias, Device? device = null,
        ScalarType dtype = ScalarType.Float32) : base(nameof(LinearLayer))
    {
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        _weight = new Parameter(empty(outFeatures, inFeatures, dtype: dtype, device: device));
        if (hasBias) _bias = new Parameter(zeros(outFeatures, dtype: dtype, device: device));
        RegisterComponents();
    }

    public override long InFeatures { get; }
    public override long OutFeatures { get; }
    public override Parameter Weight => _weight;
    public override Parameter? Bias => _bias;

    public override Tensor forward(Tensor x, ForwardContext? ctx) => nn.functional.linear(x, _weight, _bias);

    /// <summary><c>x·Wᵀ + b</c> (no context: the layer holds no adapters).</summary>
    public Tensor forward(Tensor x) => nn.functional.linear(x, _weight, _bias);
}

/// <summary>
/// Rotary position embeddings in Hugging Face's rotate-half convention, with <c>linear</c> and <c>llama3</c>
/// frequency scaling. cos/sin tables are computed once in fp32 and grown on demand; they are not in the state dict.
/// </summary>
public sealed class RotaryEmbedding : IDisposable
{
    private readonly int _headDim;
    private readonly Tensor _invFreq;   // [headDim/2] fp32, cpu
    private Tensor? _cos, _sin;         // [maxPos, headDim] fp32 on the model device
    private readonly Device _device;

    public RotaryEmbedding(LlamaConfig config, Device device)
    {
        _headDim = config.HeadDim;
        _device = device;
        _invFreq = InverseFrequencies(config);
        EnsureLength(Math.Min(config.MaxPositionEmbeddings, 4096));
    }

    /// <summary>The per-pair inverse frequencies (fp32), after scaling, exactly as transformers computes them.</summary>
    public static Tensor InverseFrequencies(LlamaConfig config)
    {
        using var scope = NewDisposeScope();
        int dim = config.HeadDim;
        var exponent = arange(0, dim, 2, dtype: ScalarType.Int64).to(ScalarType.Float32) / dim;
        var inv = 1.0f / pow(tensor((float)config.RopeTheta), exponent);
        if (config.RopeScaling is { Type: "linear" } lin)
            inv = inv / (float)lin.Factor;
        else if (config.RopeScaling is { Type: "llama3" } s)
        {
            double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
            double highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
            var wavelen = 2 * Math.PI / inv;
            var scaled = where(wavelen > lowWavelen, inv / (float)s.Factor, inv);
            var smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
            var smoothed = (1 - smooth) * scaled / (float)s.Factor + smooth * scaled;
            var isMedium = (wavelen < highWavelen).logical_not().logical_and((wavelen > lowWavelen).logical_not());
            inv = where(isMedium, smoothed, scaled);
        }
        return inv.to(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    private void EnsureLength(long needed)
    {
        if (_cos is not null && _cos.shape[0] >= needed) return;
        long length = Math.Max(needed, _cos is null ? 0 : _cos.shape[0] * 2);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var positions = arange(length, dtype: ScalarType.Int64).to(ScalarType.Float32);
        var freqs = positions.unsqueeze(1) * _invFreq.unsqueeze(0);      // [len, d/2]
        var emb = cat([freqs, freqs], 1);                                 // [len, d]
        _cos?.Dispose();
        _sin?.Dispose();
        _cos = emb.cos().to(_device).DetachFromDisposeScope();
        _sin = emb.sin().to(_device).DetachFromDisposeScope();
    }

    /// <summary>Returns cos and sin for <paramref name="positionIds"/> [B, T] as [B, 1, T, headDim] in <paramref name="dtype"/>.</summary>
    public (Tensor Cos, Tensor Sin) Lookup(Tensor positionIds, ScalarType dtype, long maxPosition)
    {
        EnsureLength(maxPosition + 1);
        var flat = positionIds.reshape(-1);
        var shape = new long[] { positionIds.shape[0], 1, positionIds.shape[1], _headDim };
        var cos = _cos!.index_select(0, flat).view(shape).to(dtype);
        var sin = _sin!.index_select(0, flat).view(shape).to(dtype);
        return (cos, sin);
    }

    /// <summary>Applies the rotation to <paramref name="x"/> [B, H, T, D].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        long half = x.shape[^1] / 2;
        var x1 = x.narrow(-1, 0, half);
        var x2 = x.narrow(-1, half, half);
        var rotated = cat([-x2, x1], -1);
        return x * cos + rotated * sin;
    }

    public void Dispose()
    {
        _invFreq.Dispose();
        _cos?.Dispose();
        _sin?.Dispose();
    }
}
