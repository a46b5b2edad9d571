using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// A preallocated key/value cache for every layer: <c>[batch, kv_heads, capacity, head_dim]</c> per layer, filled in
/// place (no per-step concatenation). It also remembers which slots hold real tokens (left padding) and each row's
/// next rotary position, so that incremental decoding continues exactly where the prefix stopped.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly Tensor[] _keys;
    private readonly Tensor[] _values;
    private readonly Tensor _valid;          // bool [B, capacity]
    private readonly long[] _nextPosition;   // per row

    public KvCache(LlamaConfig config, long batchSize, long capacity, Device device, ScalarType dtype)
    {
        if (batchSize <= 0) throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "must be positive");
        if (capacity <= 0) throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "must be positive");
        BatchSize = batchSize;
        Capacity = capacity;
        _keys = new Tensor[config.NumHiddenLayers];
        _values = new Tensor[config.NumHiddenLayers];
        for (int i = 0; i < config.NumHiddenLayers; i++)
        {
            _keys[i] = zeros([batchSize, config.NumKeyValueHeads, capacity, config.HeadDim], dtype: dtype, device: device)
                .DetachFromDisposeScope();
            _values[i] = zeros([batchSize, config.NumKeyValueHeads, capacity, config.HeadDim], dtype: dtype, device: device)
                .DetachFromDisposeScope();
        }
        _valid = zeros([batchSize, capacity], dtype: ScalarType.Bool, device: device).DetachFromDisposeScope();
        _nextPosition = new long[batchSize];
    }

    public long BatchSize { get; }
    public long Capacity { get; }

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

    /// <summary>Forgets everything (slots, positions) so the cache can serve a new sequence.</summary>
    public void Reset()
    {
        Length = 0;
        HasPadding = false;
        Array.Clear(_nextPosition);
        using (no_grad()) _valid.fill_(false);
    }

    public void Dispose()
    {
        foreach (var t in _keys) t.Dispose();
        foreach (var t in _values) t.Dispose();
        _valid.Dispose();
    }
}
