using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// A preallocated key/value cache for every layer: <c>[batch, kv_heads, capacity, head_dim]</c> per layer, filled in
/// place (no per-step concatenation). It also remembers which slots hold real tokens (left padding) and each row's
/// next rotary position, so that incremental decoding continues exactly where the prefix stopped.
/// </summary>
public sealed class KvCache : IRoutedSequenceCache, IDisposable
{
    private readonly Tensor[] _keys;
    private readonly Tensor[] _values;
    private Tensor _valid;                   // bool [B, capacity]
    private readonly long[] _nextPosition;   // per row

    public KvCache(LlamaConfig config, long batchSize, long capacity, Device device, ScalarType dtype)
        : this(config.NumHiddenLayers, batchSize, config.NumKeyValueHeads, capacity, config.HeadDim, device, dtype)
    {
    }

    private KvCache(int layers, long batchSize, long kvHeads, long capacity, long headDim, Device device, ScalarType dtype)
    {
        if (batchSize <= 0) throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "must be positive");
        if (capacity <= 0) throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "must be positive");
        BatchSize = batchSize;
        Capacity = capacity;
        _keys = new Tensor[layers];
        _values = new Tensor[layers];
        for (int i = 0; i < layers; i++)
        {
            _keys[i] = zeros([batchSize, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
            _values[i] = zeros([batchSize, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
        }
        _valid = zeros([batchSize, capacity], dtype: ScalarType.Bool, device: device).DetachFromDisposeScope();
        _nextPosition = new long[batchSize];
    }

    public long BatchSize { get; }
    public long Capacity { get; private set; }

    /// <summary>Number of slots written so far (the same for every row; padding occupies slots too).</summary>
    public long Length { get; private set; }

    /// <summary>True once any row has a padding slot, so attention needs an explicit mask.</summary>
    public bool HasPadding { get; private set; }

    /// <summary>The next rotary position of each row (number of real tokens seen).</summary>
    public IReadOnlyList<long> NextPositions => _nextPosition;

    /// <summary>Slot validity [B, Length] (true = real token).</summary>
    internal Tensor ValidSlots(long length) => _valid.narrow(1, 0, length);

    /// <summary>Reserves <paramref name="count"/> slots, records their validity, and returns the first slot index.</summary>
    internal long Reserve(long count, Tensor? realMask, long[] realCounts)
    {
        if (Length + count > Capacity)
            throw new InvalidOperationException(
                $"KV cache overflow: {Length} slots used + {count} new > capacity {Capacity}. Create the cache with a larger capacity.");
        long start = Length;
        using (no_grad())
        {
            var dst = _valid.narrow(1, start, count);
            if (realMask is null) dst.fill_(true);
            else
            {
                dst.copy_(realMask.to(ScalarType.Bool));
                HasPadding = true;
            }
        }
        for (int b = 0; b < BatchSize; b++) _nextPosition[b] += realCounts[b];
        Length += count;
        return start;
    }

    /// <summary>Writes this step's keys/values [B, KV, T, D] at <paramref name="start"/> and returns views of slots [0, start+T).</summary>
    internal (Tensor Keys, Tensor Values) Append(int layer, long start, Tensor k, Tensor v)
    {
        long t = k.shape[2];
        using (no_grad())
        {
            _keys[layer].narrow(2, start, t).copy_(k);
            _values[layer].narrow(2, start, t).copy_(v);
        }
        return (_keys[layer].narrow(2, 0, start + t), _values[layer].narrow(2, 0, start + t));
    }

    /// <summary>Grows the capacity by <paramref name="extra"/> slots (a copy of the slots in use): a call that needs more
    /// slots than its tokens (a split privileged prefill) keeps the room its caller planned for later steps.</summary>
    internal void Grow(long extra)
    {
        if (extra <= 0) return;
        long capacity = Capacity + extra;
        using (no_grad())
        {
            for (int l = 0; l < _keys.Length; l++)
            {
                _keys[l] = Resized(_keys[l], 2, capacity);
                _values[l] = Resized(_values[l], 2, capacity);
            }
            _valid = Resized(_valid, 1, capacity);
        }
        Capacity = capacity;

        Tensor Resized(Tensor old, int dim, long size)
        {
            var shape = old.shape;
            shape[dim] = size;
            var grown = zeros(shape, dtype: old.dtype, device: old.device).DetachFromDisposeScope();
            if (Length > 0) grown.narrow(dim, 0, Length).copy_(old.narrow(dim, 0, Length));
            old.Dispose();
            return grown;
        }
    }

    /// <summary>A batch-1 cache holding row <paramref name="row"/>'s real slots only, compacted in order (its padding
    /// slots dropped), with room for <paramref name="extra"/> more: the row's own history, independent of how the batch
    /// was padded.</summary>
    internal KvCache ExtractRow(int row, long extra)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(row);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(row, BatchSize);
        using var scope = NewDisposeScope();
        long[] slots;
        using (no_grad())
            slots = Length == 0 ? [] : _valid[row].narrow(0, 0, Length).nonzero().reshape(-1).cpu().data<long>().ToArray();
        long n = slots.Length;
        var copy = new KvCache(_keys.Length, 1, _keys[0].shape[1], Math.Max(1, n + extra), _keys[0].shape[3], _keys[0].device, _keys[0].dtype);
        if (n > 0)
        {
            var index = tensor(slots, device: _keys[0].device);
            using (no_grad())
            {
                for (int l = 0; l < _keys.Length; l++)
                {
                    copy._keys[l].narrow(2, 0, n).copy_(_keys[l].narrow(0, row, 1).index_select(2, index));
                    copy._values[l].narrow(2, 0, n).copy_(_values[l].narrow(0, row, 1).index_select(2, index));
                }
                copy._valid.narrow(1, 0, n).fill_(true);
            }
        }
        copy.Length = n;
        copy._nextPosition[0] = _nextPosition[row];
        return copy;
    }

    /// <summary>Copies <paramref name="count"/> slots of batch-1 <paramref name="source"/> (from
    /// <paramref name="sourceStart"/>) into row <paramref name="row"/> at <paramref name="slot"/>, every layer. The slots
    /// must already be reserved.</summary>
    internal void WriteRow(int row, long slot, KvCache source, long sourceStart, long count)
    {
        if (source.BatchSize != 1 || source._keys.Length != _keys.Length)
            throw new ArgumentException("the source must be a batch-1 cache of the same model", nameof(source));
        if (slot + count > Length || sourceStart + count > source.Length)
            throw new InvalidOperationException($"KV cache row write out of range: slots [{slot}, {slot + count}) of {Length}, source [{sourceStart}, {sourceStart + count}) of {source.Length}");
        using (no_grad())
            for (int l = 0; l < _keys.Length; l++)
            {
                _keys[l].narrow(0, row, 1).narrow(2, slot, count).copy_(source._keys[l].narrow(2, sourceStart, count));
                _values[l].narrow(0, row, 1).narrow(2, slot, count).copy_(source._values[l].narrow(2, sourceStart, count));
            }
    }

    /// <summary>What scaling-pass adapters (X-LoRA) keep with this sequence: the scaling pass's own cache and the
    /// non-granular state (created on first use).</summary>
    public ScalingPassCacheState ScalingPass => _scalingPass ??= new ScalingPassCacheState(BatchSize);
    private ScalingPassCacheState? _scalingPass;

    /// <summary>True once <see cref="ScalingPass"/> has been created.</summary>
    internal bool HasScalingPassState => _scalingPass is not null;

    /// <summary>A cache shaped like this one (same layers, heads, capacity), empty.</summary>
    internal KvCache CreateCompanion() =>
        new(_keys.Length, BatchSize, _keys[0].shape[1], Capacity, _keys[0].shape[3], _keys[0].device, _keys[0].dtype);

    /// <summary>Freezes X-LoRA scalings after <paramref name="decodeSteps"/> decode steps, for every row (null: never).</summary>
    public void SetNonGranular(int? decodeSteps)
    {
        if (decodeSteps is < 1) throw new ArgumentOutOfRangeException(nameof(decodeSteps), decodeSteps, "the non-granular index counts decode steps: at least 1");
        Array.Fill(ScalingPass.NonGranularIndex, decodeSteps);
    }

    /// <summary>Forgets everything (slots, positions) so the cache can serve a new sequence.</summary>
    public void Reset()
    {
        _scalingPass?.Reset();
        Length = 0;
        HasPadding = false;
        Array.Clear(_nextPosition);
        using (no_grad()) _valid.fill_(false);
    }

    public void Dispose()
    {
        _scalingPass?.Dispose();
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
        _valid.Dispose();
    }
}
