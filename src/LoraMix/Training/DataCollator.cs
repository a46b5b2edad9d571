using LoraMix.Routing;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>A padded batch on the model's device: ids [B, T], labels [B, T] (-100 where no loss is taken) and, when an
/// example carries them, privilege labels [B, T].</summary>
public sealed class CollatedBatch : IDisposable
{
    /// <summary>The label value that cross-entropy ignores (PyTorch's and Hugging Face's convention).</summary>
    public const long IgnoreIndex = -100;

    /// <summary>The adapters the batch's rows run in the forward pass (set by the trainer from its target), or null for
    /// the base model. Objectives pass it to <see cref="Modeling.LlamaForCausalLM.Forward"/>.</summary>
    public Modeling.AdapterSelection? Adapters { get; set; }

    internal CollatedBatch(Tensor inputIds, Tensor labels, int targetTokens, int realTokens, int[] lengths, Tensor? privileges = null)
    {
        Privileges = privileges;
        Lengths = lengths;
        InputIds = inputIds;
        Labels = labels;
        TargetTokens = targetTokens;
        RealTokens = realTokens;
    }

    /// <summary>[B, T] int64, right-padded with the pad id.</summary>
    public Tensor InputIds { get; }

    /// <summary>[B, T] int64, aligned with <see cref="InputIds"/> (not shifted): <c>Labels[b, t]</c> is the target predicted
    /// from positions &lt; t, or <see cref="IgnoreIndex"/>. Position 0 is always ignored.</summary>
    public Tensor Labels { get; }

    /// <summary>[B, T] uint8 values of <see cref="Privilege"/>, aligned with <see cref="InputIds"/> (right-padded like them),
    /// or null when no example of the batch has privilege labels. Padding, and the rows of examples without labels, are
    /// <see cref="Privilege.System"/> (never frozen; padding is excluded from the losses anyway).</summary>
    public Tensor? Privileges { get; }

    /// <summary>Gives <paramref name="routing"/> this batch's privilege labels (for <c>router_policy: privileged</c>),
    /// when it has any; the batch keeps ownership.</summary>
    public void ApplyPrivileges(RoutingContext routing)
    {
        ArgumentNullException.ThrowIfNull(routing);
        if (Privileges is not null) routing.PrivilegeLabels = Privileges;
    }

    /// <summary>Number of labels that are not <see cref="IgnoreIndex"/> (the loss is averaged over these).</summary>
    public int TargetTokens { get; }

    /// <summary>Number of non-padding tokens (for throughput).</summary>
    public int RealTokens { get; }

    /// <summary>The real (unpadded) length of each row; row b is padded from position <c>Lengths[b]</c> on.</summary>
    public IReadOnlyList<int> Lengths { get; }

    /// <summary>[B, T] int64 on the batch's device, 1 for real tokens and 0 for right padding (for losses that must skip
    /// padding, e.g. MixLoRA's load-balancing loss). The caller owns the tensor.</summary>
    public Tensor PaddingMask()
    {
        long t = SequenceLength;
        var mask = new long[Lengths.Count * t];
        for (int b = 0; b < Lengths.Count; b++)
            for (int i = 0; i < Lengths[b]; i++) mask[b * t + i] = 1;
        return tensor(mask, [Lengths.Count, t], ScalarType.Int64).to(InputIds.device);
    }

    public long BatchSize => InputIds.shape[0];
    public long SequenceLength => InputIds.shape[1];

    public void Dispose()
    {
        InputIds.Dispose();
        Labels.Dispose();
        Privileges?.Dispose();
    }
}

/// <summary>
/// Turns <see cref="TrainingExample"/>s into model batches: truncation to <c>cutoff_len</c>, optional packing, right
/// padding with a pad id and labels of -100 where no loss is taken.
/// </summary>
/// <remarks>
/// Right padding needs no attention mask with a causal model: a real token only attends to earlier positions, which are
/// all real, and padded positions carry no label — so a padded batch's loss equals the sum of its examples' losses
/// (tested). Packing concatenates consecutive examples (after truncation) while they fit in <c>cutoff_len</c>; tokens
/// of a packed sequence can attend to earlier examples of the same sequence (as LLaMA-Factory's <c>packing</c> and
/// axolotl without flash-attention varlen), and the first token of each example is never a target. Privilege labels are
/// truncated and concatenated with the ids (examples without labels count as <see cref="Privilege.System"/>); note that
/// under <c>router_policy: privileged</c> an untrusted token freezes the routing of the rest of its packed sequence, so
/// the trainer refuses packing with that policy when the data has untrusted tokens.
/// </remarks>
public sealed class DataCollator
{
    public DataCollator(int cutoffLength, int padTokenId = 0, bool packing = false)
    {
        if (cutoffLength < 2) throw new LoraMixException($"cutoff_len must be at least 2, got {cutoffLength}");
        if (padTokenId < 0) throw new LoraMixException($"pad token id must be non-negative, got {padTokenId}");
        CutoffLength = cutoffLength;
        PadTokenId = padTokenId;
        Packing = packing;
    }

    public int CutoffLength { get; }
    public int PadTokenId { get; }
    public bool Packing { get; }

    /// <summary>
    /// Truncates every example to <see cref="CutoffLength"/>, drops those left without a target token (counted in
    /// <paramref name="dropped"/>) and, with packing, concatenates consecutive examples in the given order.
    /// </summary>
    public IReadOnlyList<TrainingExample> Prepare(IEnumerable<TrainingExample> examples, out int dropped)
    {
        dropped = 0;
        var kept = new List<TrainingExample>();
        foreach (var e in examples)
        {
            var t = e.InputIds.Length <= CutoffLength ? e
                : new TrainingExample(e.InputIds[..CutoffLength], e.LossMask[..CutoffLength], e.Privileges?[..CutoffLength]);
            if (t.TargetCount == 0) { dropped++; continue; }
            kept.Add(t);
        }
        if (!Packing) return kept;

        var packed = new List<TrainingExample>();
        var ids = new List<int>();
        var mask = new List<bool>();
        var privileges = new List<Privilege>();
        bool anyPrivileges = false;
        void Flush()
        {
            packed.Add(new TrainingExample(ids.ToArray(), mask.ToArray(), anyPrivileges ? privileges.ToArray() : null));
            ids.Clear();
            mask.Clear();
            privileges.Clear();
            anyPrivileges = false;
        }
        foreach (var e in kept)
        {
            if (ids.Count > 0 && ids.Count + e.InputIds.Length > CutoffLength) Flush();
            ids.AddRange(e.InputIds);
            mask.Add(false);   // the first token of an example is not predicted from the previous example
            mask.AddRange(e.LossMask.Skip(1));
            if (e.Privileges is not null) anyPrivileges = true;
            privileges.AddRange(e.Privileges ?? Enumerable.Repeat(Privilege.System, e.InputIds.Length));
        }
        if (ids.Count > 0) Flush();
        return packed;
    }

    /// <summary>Pads <paramref name="examples"/> on the right to the longest one and builds labels (and privilege labels
    /// when an example has them).</summary>
    public CollatedBatch Collate(IReadOnlyList<TrainingExample> examples, Device? device = null)
    {
        if (examples.Count == 0) throw new ArgumentException("cannot collate an empty batch", nameof(examples));
        int len = examples.Max(e => e.InputIds.Length);
        if (len > CutoffLength)
            throw new ArgumentException($"an example has {len} tokens, more than cutoff_len {CutoffLength}; call Prepare first", nameof(examples));
        var ids = new long[examples.Count * len];
        var labels = new long[examples.Count * len];
        bool withPrivileges = examples.Any(e => e.Privileges is not null);
        var privileges = withPrivileges ? new byte[examples.Count * len] : null;
        if (privileges is not null) Array.Fill(privileges, (byte)Privilege.System);   // padding and unlabelled rows
        int targets = 0, real = 0;
        for (int b = 0; b < examples.Count; b++)
        {
            var e = examples[b];
            if (e.InputIds.Length != e.LossMask.Length) throw new ArgumentException($"example {b}: ids and loss mask differ in length", nameof(examples));
            if (e.Privileges is { } p)
            {
                if (p.Length != e.InputIds.Length) throw new ArgumentException($"example {b}: ids and privilege labels differ in length", nameof(examples));
                for (int t = 0; t < p.Length; t++) privileges![b * len + t] = (byte)p[t];
            }
            int o = b * len;
            for (int t = 0; t < len; t++)
            {
                bool isReal = t < e.InputIds.Length;
                ids[o + t] = isReal ? e.InputIds[t] : PadTokenId;
                bool target = isReal && t > 0 && e.LossMask[t];
                labels[o + t] = target ? e.InputIds[t] : CollatedBatch.IgnoreIndex;
                if (target) targets++;
                if (isReal) real++;
            }
        }
        var dev = device ?? CPU;
        return new CollatedBatch(tensor(ids, [examples.Count, len], ScalarType.Int64).to(dev),
            tensor(labels, [examples.Count, len], ScalarType.Int64).to(dev), targets, real, [.. examples.Select(e => e.InputIds.Length)],
            privileges is null ? null : tensor(privileges, [examples.Count, len], ScalarType.Byte).to(dev));
    }
}

/// <summary>
/// The order in which examples are visited: a permutation per epoch that is a pure function of (seed, epoch, count),
/// identical on every platform and run, so a resumed run sees exactly the data an uninterrupted run would.
/// </summary>
public static class DataOrder
{
    /// <summary>A permutation of 0..count-1 for <paramref name="epoch"/> (Fisher–Yates over SplitMix64).</summary>
    public static int[] Permutation(int count, long seed, long epoch)
    {
        var p = new int[count];
        for (int i = 0; i < count; i++) p[i] = i;
        ulong state = (ulong)seed * 0x9E3779B97F4A7C15UL ^ ((ulong)epoch + 0x632BE59BD9B4E019UL) * 0xD1B54A32D192ED03UL;
        for (int i = count - 1; i > 0; i--)
        {
            ulong r = SplitMix64(ref state);
            int j = (int)(r % (ulong)(i + 1));
            (p[i], p[j]) = (p[j], p[i]);
        }
        return p;
    }

    private static ulong SplitMix64(ref ulong s)
    {
        ulong z = s += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
