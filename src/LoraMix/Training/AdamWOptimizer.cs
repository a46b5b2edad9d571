using System.Globalization;
using System.Text.Json;
using LoraMix.Checkpoints;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>A parameter the optimizer updates, under a stable name (its key in optimizer.safetensors).</summary>
/// <param name="Name">The key of its state in optimizer.safetensors (PEFT or Hugging Face name).</param>
/// <param name="Parameter">The live parameter.</param>
/// <param name="Decay">Whether weight decay applies (false for biases and norm weights, as transformers does).</param>
public sealed record TrainableParameter(string Name, Parameter Parameter, bool Decay);

/// <summary>
/// AdamW with decoupled weight decay and bias correction — the update of PyTorch's <c>torch.optim.AdamW</c>
/// (single-tensor path, <c>amsgrad=False</c>):
/// <code>
/// p  ← p·(1 − lr·λ)
/// m  ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
/// p  ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
/// </code>
/// Moments are fp32. When a parameter is not fp32 (bf16 training) the optimizer keeps an fp32 master copy, updates it
/// and writes it back rounded; the master copies are part of the saved state so a resumed run continues exactly.
/// </summary>
public sealed class AdamWOptimizer : IDisposable
{
    private sealed class Slot(TrainableParameter p, Tensor expAvg, Tensor expAvgSq, Tensor? master)
    {
        public TrainableParameter P { get; } = p;
        public Tensor ExpAvg { get; } = expAvg;
        public Tensor ExpAvgSq { get; } = expAvgSq;
        public Tensor? Master { get; } = master;
    }

    private readonly List<Slot> _slots = [];

    public AdamWOptimizer(IReadOnlyList<TrainableParameter> parameters, double beta1 = 0.9, double beta2 = 0.999, double epsilon = 1e-8, double weightDecay = 0)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var tp in parameters)
        {
            if (!names.Add(tp.Name)) throw new ArgumentException($"parameter name '{tp.Name}' is given twice", nameof(parameters));
            var p = tp.Parameter;
            var m = zeros(p.shape, dtype: ScalarType.Float32, device: p.device).DetachFromDisposeScope();
            var v = zeros(p.shape, dtype: ScalarType.Float32, device: p.device).DetachFromDisposeScope();
            Tensor? master = null;
            if (p.dtype != ScalarType.Float32)
                using (no_grad()) master = p.detach().to(ScalarType.Float32).clone().DetachFromDisposeScope();
            _slots.Add(new Slot(tp, m, v, master));
        }
        Beta1 = beta1;
        Beta2 = beta2;
        Epsilon = epsilon;
        WeightDecay = weightDecay;
    }

    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Epsilon { get; }
    public double WeightDecay { get; }

    /// <summary>Number of updates applied so far (t in the bias correction).</summary>
    public long StepCount { get; private set; }

    /// <summary>The parameters in optimizer order.</summary>
    public IReadOnlyList<TrainableParameter> Parameters => _slots.Select(s => s.P).ToList();

    /// <summary>The first moment of a parameter (fp32; for tests and inspection).</summary>
    public Tensor ExpAvg(string name) => _slots.Single(s => s.P.Name == name).ExpAvg;

    /// <summary>The second moment of a parameter (fp32).</summary>
    public Tensor ExpAvgSq(string name) => _slots.Single(s => s.P.Name == name).ExpAvgSq;

    /// <summary>Applies one update with learning rate <paramref name="lr"/> to every parameter that has a gradient.</summary>
    public void Step(double lr)
    {
        StepCount++;
        double bc1 = 1 - Math.Pow(Beta1, StepCount);
        double bc2Sqrt = Math.Sqrt(1 - Math.Pow(Beta2, StepCount));
        double stepSize = lr / bc1;
        using var noGrad = no_grad();
        foreach (var s in _slots)
        {
            using var scope = NewDisposeScope();
            var grad = s.P.Parameter.grad;
            if (grad is null) continue;
            var g = grad.dtype == ScalarType.Float32 ? grad : grad.to(ScalarType.Float32);
            var w = s.Master ?? s.P.Parameter;
            if (s.P.Decay && WeightDecay != 0) w.mul_(1 - lr * WeightDecay);
            s.ExpAvg.mul_(Beta1).add_(g, alpha: 1 - Beta1);
            s.ExpAvgSq.mul_(Beta2).addcmul_(g, g, value: 1 - Beta2);
            var denom = (s.ExpAvgSq.sqrt() / bc2Sqrt).add_(Epsilon);
            w.addcdiv_(s.ExpAvg, denom, value: -stepSize);
            if (s.Master is not null) s.P.Parameter.copy_(s.Master);
        }
    }

    /// <summary>Zeroes every gradient in place (the buffers are kept, so memory stays flat).</summary>
    public void ZeroGrad()
    {
        foreach (var s in _slots)
        {
            using var g = s.P.Parameter.grad;
            g?.zero_();
        }
    }

    /// <summary>
    /// Writes the state as safetensors (atomically): <c>NAME.exp_avg</c>, <c>NAME.exp_avg_sq</c> and, in mixed precision,
    /// <c>NAME.master</c> (all fp32), with the step count and hyper-parameters in the metadata.
    /// </summary>
    public void Save(string path)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var s in _slots)
        {
            tensors.Add(new(s.P.Name + ".exp_avg", s.ExpAvg));
            tensors.Add(new(s.P.Name + ".exp_avg_sq", s.ExpAvgSq));
            if (s.Master is not null) tensors.Add(new(s.P.Name + ".master", s.Master));
        }
        var meta = new Dictionary<string, string>
        {
            ["format"] = "loramix-adamw",
            ["step"] = StepCount.ToString(CultureInfo.InvariantCulture),
            ["betas"] = JsonSerializer.Serialize(new[] { Beta1, Beta2 }),
            ["eps"] = Epsilon.ToString("R", CultureInfo.InvariantCulture),
            ["weight_decay"] = WeightDecay.ToString("R", CultureInfo.InvariantCulture),
            ["param_names"] = JsonSerializer.Serialize(_slots.Select(s => s.P.Name)),
        };
        SafetensorsWriter.Write(path, tensors, meta);
    }

    /// <summary>
    /// Validates a state file written by <see cref="Save"/> without reading its tensors: the metadata (<c>format</c>
    /// <c>loramix-adamw</c>, a non-negative integer <c>step</c>, equal to <paramref name="expectedStep"/> when given), and
    /// exactly the tensors this optimizer has (<c>NAME.exp_avg</c>, <c>NAME.exp_avg_sq</c>, and <c>NAME.master</c> in mixed
    /// precision), each F32 with its parameter's shape. Returns the step.
    /// </summary>
    /// <exception cref="CheckpointFormatException">The file is missing, malformed, not an AdamW state, or of another step.</exception>
    /// <exception cref="StateDictMismatchException">Missing, unexpected, mis-shaped or non-F32 tensors (all listed).</exception>
    public long Check(string path, long? expectedStep = null)
    {
        using var reader = OpenState(path);
        return Check(reader, expectedStep);
    }

    private long Check(SafetensorsReader reader, long? expectedStep)
    {
        string path = reader.FilePath;
        if (!reader.Metadata.TryGetValue("format", out var fmt) || fmt != "loramix-adamw" || !reader.Metadata.TryGetValue("step", out var stepText))
            throw new CheckpointFormatException(path, null, "not a LoraMix AdamW state (metadata 'format' must be 'loramix-adamw' with a 'step')");
        if (!long.TryParse(stepText, NumberStyles.None, CultureInfo.InvariantCulture, out long step))
            throw new CheckpointFormatException(path, null, $"metadata 'step' is '{Clip(stepText)}', expected a non-negative integer (the number of updates applied)");
        if (expectedStep is long want && step != want)
            throw new CheckpointFormatException(path, null, $"metadata 'step' is {step} but the checkpoint is at global_step {want}; the files do not belong together");
        var expected = Expected();
        var names = reader.Entries.Select(e => e.Name).ToHashSet(StringComparer.Ordinal);
        var missing = expected.Keys.Where(k => !names.Contains(k)).ToList();
        var unexpected = names.Where(n => !expected.ContainsKey(n)).Order(StringComparer.Ordinal).ToList();
        var misshaped = new List<string>();
        foreach (var (name, t) in expected)
        {
            if (!reader.TryGetEntry(name, out var entry)) continue;
            if (!entry.Shape.SequenceEqual(t.shape))
                misshaped.Add($"{name}: file {Safetensors.FormatShape(entry.Shape)} vs optimizer {Safetensors.FormatShape(t.shape)}");
            else if (entry.DType != SafetensorsDType.F32)
                misshaped.Add($"{name}: file dtype {SafetensorsDTypes.ToName(entry.DType)} vs optimizer F32");
        }
        if (missing.Count + unexpected.Count + misshaped.Count > 0)
            throw new StateDictMismatchException(path, missing, unexpected, misshaped);
        return step;
    }

    /// <summary>Restores the state written by <see cref="Save"/>, validated first as <see cref="Check(string, long?)"/> does;
    /// every value must be finite and second moments non-negative. In mixed precision the parameters are set from the
    /// restored master copies, only once every tensor has been read and checked. If this throws, the optimizer's moments
    /// are unspecified (discard the optimizer) but the parameters are untouched.</summary>
    public void Load(string path, long? expectedStep = null)
    {
        using var reader = OpenState(path);
        long step = Check(reader, expectedStep);
        using var noGrad = no_grad();
        foreach (var (name, t) in Expected())
        {
            reader.ReadInto(name, t);
            using var finite = t.isfinite().all();
            if (!finite.item<bool>())
                throw new CheckpointFormatException(path, name, "holds NaN or infinite values; the optimizer state is corrupt");
            if (name.EndsWith(".exp_avg_sq", StringComparison.Ordinal))
            {
                using var negative = t.lt(0).any();
                if (negative.item<bool>())
                    throw new CheckpointFormatException(path, name, "holds negative values; a second moment (a mean of squared gradients) cannot be negative");
            }
        }
        foreach (var s in _slots)
            if (s.Master is not null) s.P.Parameter.copy_(s.Master);
        StepCount = step;
    }

    private Dictionary<string, Tensor> Expected()
    {
        var expected = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var s in _slots)
        {
            expected[s.P.Name + ".exp_avg"] = s.ExpAvg;
            expected[s.P.Name + ".exp_avg_sq"] = s.ExpAvgSq;
            if (s.Master is not null) expected[s.P.Name + ".master"] = s.Master;
        }
        return expected;
    }

    private static SafetensorsReader OpenState(string path)
    {
        if (!File.Exists(path)) throw new CheckpointFormatException(path, null, "not found; is this a complete checkpoint directory?");
        try
        {
            return SafetensorsReader.Open(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointFormatException(path, null, $"cannot be read: {e.Message}", e);
        }
    }

    private static string Clip(string s) => s.Length <= 40 ? s : s[..40] + "...";

    public void Dispose()
    {
        foreach (var s in _slots)
        {
            s.ExpAvg.Dispose();
            s.ExpAvgSq.Dispose();
            s.Master?.Dispose();
        }
        _slots.Clear();
    }
}
