using System.Runtime.CompilerServices;

namespace LoraMix.Tokenization;

/// <summary>
/// A BPE merge table: (left id, right id) → (rank, merged id). Lower rank merges first; equal ranks merge
/// leftmost first. This is the Hugging Face <c>tokenizers</c> BPE rule and, with ranks derived from piece scores,
/// SentencePiece's BPE rule as well.
/// </summary>
internal sealed class MergeTable
{
    private readonly Dictionary<long, long> _map;

    public MergeTable(int capacity) => _map = new Dictionary<long, long>(capacity);

    public int Count => _map.Count;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static long Key(int left, int right) => ((long)left << 32) | (uint)right;

    /// <summary>Adds a merge; an existing pair keeps its first (lowest) rank, as a merges list read in order does.</summary>
    public void TryAdd(int left, int right, int rank, int merged) =>
        _map.TryAdd(Key(left, right), ((long)rank << 32) | (uint)merged);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryGet(int left, int right, out int rank, out int merged)
    {
        if (_map.TryGetValue(Key(left, right), out long v))
        {
            rank = (int)(v >> 32);
            merged = (int)v;
            return true;
        }
        rank = 0;
        merged = 0;
        return false;
    }
}

/// <summary>
/// Applies a <see cref="MergeTable"/> to a sequence of symbol ids with a priority queue keyed by (rank, original
/// position), which gives "lowest rank first, leftmost first on ties" in O(n log n). Not thread-safe: use one
/// instance per thread (see <see cref="Shared"/>).
/// </summary>
internal sealed class BpeMerger
{
    [ThreadStatic] private static BpeMerger? t_shared;

    /// <summary>A per-thread instance whose buffers are reused across calls.</summary>
    public static BpeMerger Shared => t_shared ??= new BpeMerger();

    private int[] _ids = new int[64];
    private int[] _prev = new int[64];
    private int[] _next = new int[64];
    private long[] _heap = new long[128];
    private int _heapCount;

    /// <summary>Gives the symbol buffer to fill with <paramref name="count"/> initial ids.</summary>
    public Span<int> Begin(int count)
    {
        if (_ids.Length < count)
        {
            int n = Math.Max(count, _ids.Length * 2);
            _ids = new int[n];
            _prev = new int[n];
            _next = new int[n];
        }
        return _ids.AsSpan(0, count);
    }

    /// <summary>Merges the <paramref name="count"/> ids given to <see cref="Begin"/> and appends the result.</summary>
    public void MergeInto(int count, MergeTable merges, List<int> output)
    {
        int[] ids = _ids, prev = _prev, next = _next;
        if (count == 1)
        {
            output.Add(ids[0]);
            return;
        }
        _heapCount = 0;
        for (int i = 0; i < count; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < count ? i + 1 : -1;
        }
        for (int i = 0; i + 1 < count; i++)
            if (merges.TryGet(ids[i], ids[i + 1], out int rank, out _))
                Push(((long)rank << 32) | (uint)i);

        while (_heapCount > 0)
        {
            long top = Pop();
            int pos = (int)top;
            int rank = (int)(top >> 32);
            if (ids[pos] < 0) continue;              // the symbol was merged into its left neighbour
            int right = next[pos];
            if (right < 0) continue;
            if (!merges.TryGet(ids[pos], ids[right], out int r, out int merged) || r != rank) continue; // stale
            ids[pos] = merged;
            ids[right] = -1;
            int after = next[right];
            next[pos] = after;
            if (after >= 0) prev[after] = pos;
            int before = prev[pos];
            if (before >= 0 && merges.TryGet(ids[before], merged, out int rb, out _))
                Push(((long)rb << 32) | (uint)before);
            if (after >= 0 && merges.TryGet(merged, ids[after], out int ra, out _))
                Push(((long)ra << 32) | (uint)pos);
        }
        for (int i = 0; i >= 0; i = next[i]) output.Add(ids[i]);
    }

    private void Push(long v)
    {
        if (_heapCount == _heap.Length) Array.Resize(ref _heap, _heap.Length * 2);
        long[] h = _heap;
        int i = _heapCount++;
        while (i > 0)
        {
            int parent = (i - 1) >> 1;
            if (h[parent] <= v) break;
            h[i] = h[parent];
            i = parent;
        }
        h[i] = v;
    }

    private long Pop()
    {
        long[] h = _heap;
        long top = h[0];
        long last = h[--_heapCount];
        int n = _heapCount, i = 0;
        while (true)
        {
            int c = 2 * i + 1;
            if (c >= n) break;
            if (c + 1 < n && h[c + 1] < h[c]) c++;
            if (h[c] >= last) break;
            h[i] = h[c];
            i = c;
        }
        if (n > 0) h[i] = last;
        return top;
    }
}
