using System.Text;

namespace LoraMix.Tokenization;

/// <summary>What <see cref="BpeTrainer"/> learns: the vocabulary size to reach and the rarest pair worth a merge.</summary>
/// <param name="VocabSize">The size of the written vocabulary: 256 bytes + merges + the ChatML specials
/// (<see cref="ByteLevelTokenizerFiles.VocabSize"/>). At least <c>ByteLevelTokenizerFiles.VocabSize(0)</c>.</param>
/// <param name="MinFrequency">A pair seen fewer times than this in the corpus is never merged (training then stops
/// short of <paramref name="VocabSize"/>).</param>
/// <param name="SpaceApart">When true, a space never merges with the text after it: <c>" cat"</c> encodes as
/// <c>[" ", "cat"]</c>, so a word is the same token at the start of a text and after a space (a small model then copies
/// words between positions as the identity, instead of learning <c>"Ġcat"</c> ↔ <c>"cat"</c> for every word). The
/// written file is an ordinary merges list; only the trainer's choice differs.</param>
public sealed record BpeTrainerOptions(int VocabSize, int MinFrequency = 2, bool SpaceApart = false)
{
    /// <summary>The most merges the vocabulary size allows.</summary>
    public int MaxMerges => VocabSize - ByteLevelTokenizerFiles.VocabSize(0);

    /// <summary>Checks the ranges.</summary>
    /// <exception cref="ArgumentOutOfRangeException">VocabSize below the byte alphabet + specials, or MinFrequency below 1.</exception>
    public void Validate()
    {
        if (VocabSize < ByteLevelTokenizerFiles.VocabSize(0) || VocabSize > 1 << 20)
            throw new ArgumentOutOfRangeException(nameof(VocabSize), VocabSize,
                $"vocab_size must be in [{ByteLevelTokenizerFiles.VocabSize(0)}, {1 << 20}] (256 bytes + {ByteLevelTokenizerFiles.SpecialTokens.Count} specials + merges)");
        if (MinFrequency < 1) throw new ArgumentOutOfRangeException(nameof(MinFrequency), MinFrequency, "min_frequency must be at least 1");
    }
}

/// <summary>
/// Learns byte-level BPE merges from a corpus, as Hugging Face <c>tokenizers</c>' <c>BpeTrainer</c> does with a
/// <c>ByteLevel</c> pre-tokenizer: the text is cut into pre-tokens by the split regex that
/// <see cref="ByteLevelTokenizerFiles"/> writes (so merges never cross a pre-token, and training sees exactly what
/// encoding will), each pre-token becomes its UTF-8 bytes, and the most frequent adjacent pair is merged until the
/// vocabulary is full or no pair reaches <see cref="BpeTrainerOptions.MinFrequency"/>.
/// </summary>
/// <remarks>
/// Deterministic: ties on frequency go to the ordinally smallest (left, right) pair of byte-level strings, and nothing
/// depends on hash order, so the same corpus gives the same merges (and ids) on every run and machine. A pair whose
/// concatenation is already a token (reached by another merge path) is skipped, so every merge adds one id. Every
/// byte stays in the vocabulary, so any string encodes (no unknown token). The next pair comes from a lazily updated
/// heap, so a merge costs the words that hold the merged pair (times their length) plus a heap push per changed pair.
/// </remarks>
public static class BpeTrainer
{
    /// <summary>Learns merges from <paramref name="texts"/> (pieces of text that encoding sees apart, e.g. the runs
    /// between special tokens of rendered chats).</summary>
    public static IReadOnlyList<(string Left, string Right)> Train(IEnumerable<string> texts, BpeTrainerOptions options,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(texts);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        var split = SplitPreTokenizer.TryCreate(ByteLevelTokenizerFiles.SplitPattern)
                    ?? throw new InvalidOperationException("the byte-level split pattern is not recognised");

        // ---- distinct pre-tokens (as byte strings) with their counts
        var counts = new Dictionary<string, long>(StringComparer.Ordinal);
        foreach (string text in texts)
        {
            if (string.IsNullOrEmpty(text)) continue;
            for (int i = 0; i < text.Length;)
            {
                int len = split.NextLength(text, i);
                string pre = text.Substring(i, len);
                counts[pre] = counts.GetValueOrDefault(pre) + 1;
                i += len;
            }
        }
        var words = new List<List<int>>(counts.Count);
        var freq = new List<long>(counts.Count);
        foreach (var (pre, n) in counts.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            byte[] b = Encoding.UTF8.GetBytes(pre);
            var w = new List<int>(b.Length);
            foreach (byte x in b) w.Add(x);
            words.Add(w);
            freq.Add(n);
        }

        // ---- symbols: 0..255 the bytes; each merge appends one
        var pieces = new List<string>(256 + options.MaxMerges);
        for (int b = 0; b < 256; b++) pieces.Add(ByteLevelMap.ByteToChar[b].ToString());
        var known = new HashSet<string>(pieces, StringComparer.Ordinal);

        var pairCount = new Dictionary<long, long>();
        var changed = new HashSet<long>();
        var banned = new HashSet<long>();   // pairs never to merge (space_apart, or their result is already a token)
        var pairWords = new Dictionary<long, HashSet<int>>();
        static long Key(int a, int b) => ((long)a << 32) | (uint)b;
        void AddWord(int wi, int sign)
        {
            var w = words[wi];
            for (int i = 0; i + 1 < w.Count; i++)
            {
                long k = Key(w[i], w[i + 1]);
                long c = pairCount.GetValueOrDefault(k) + sign * freq[wi];
                if (c == 0) pairCount.Remove(k); else pairCount[k] = c;
                changed.Add(k);
                if (sign > 0)
                {
                    if (!pairWords.TryGetValue(k, out var set)) pairWords[k] = set = [];
                    set.Add(wi);
                }
            }
        }
        for (int wi = 0; wi < words.Count; wi++) AddWord(wi, +1);

        // A max-heap of (count, pair) with lazy deletion: every pair whose count changed is pushed again with its new
        // count, and an entry whose count is no longer the pair's current count is dropped when it surfaces. The order
        // (count descending, then the pair's strings ordinally) is total, so the result does not depend on heap internals.
        var heap = new PriorityQueue<long, (long Count, long Key)>(Comparer<(long Count, long Key)>.Create((a, b) =>
            a.Count != b.Count ? b.Count.CompareTo(a.Count) : ComparePairs(pieces, a.Key, b.Key)));
        void PushChanged()
        {
            foreach (long k in changed)
                if (!banned.Contains(k) && pairCount.TryGetValue(k, out long c) && c >= options.MinFrequency) heap.Enqueue(k, (c, k));
            changed.Clear();
        }
        PushChanged();

        var merges = new List<(string, string)>(options.MaxMerges);
        while (merges.Count < options.MaxMerges && heap.TryDequeue(out long best, out var top))
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (pairCount.GetValueOrDefault(best) != top.Count) continue;                    // stale entry
            if (banned.Contains(best)) continue;
            if (options.SpaceApart && Joins(pieces, best)) { banned.Add(best); continue; }
            int left = (int)(best >> 32), right = (int)(best & 0xFFFFFFFF);
            string merged = pieces[left] + pieces[right];
            // reached by another merge path already: never merged (so every merge adds one id)
            if (!known.Add(merged)) { banned.Add(best); continue; }
            int id = pieces.Count;
            pieces.Add(merged);
            merges.Add((pieces[left], pieces[right]));

            foreach (int wi in pairWords[best].ToArray())
            {
                var w = words[wi];
                bool has = false;
                for (int i = 0; i + 1 < w.Count && !has; i++) has = w[i] == left && w[i + 1] == right;
                if (!has) continue;
                AddWord(wi, -1);
                var next = new List<int>(w.Count);
                for (int i = 0; i < w.Count; i++)
                {
                    if (i + 1 < w.Count && w[i] == left && w[i + 1] == right) { next.Add(id); i++; }
                    else next.Add(w[i]);
                }
                words[wi] = next;
                AddWord(wi, +1);
            }
            pairWords.Remove(best);
            PushChanged();
        }
        return merges;
    }

    /// <summary>Whether the pair glues a trailing space to something other than more spaces (refused with SpaceApart).</summary>
    private static bool Joins(List<string> pieces, long pair)
    {
        string left = pieces[(int)(pair >> 32)], right = pieces[(int)(pair & 0xFFFFFFFF)];
        char space = ByteLevelMap.ByteToChar[' '];
        return left[^1] == space && right[0] != space;
    }

    private static int ComparePairs(List<string> pieces, long a, long b)
    {
        int c = string.CompareOrdinal(pieces[(int)(a >> 32)], pieces[(int)(b >> 32)]);
        return c != 0 ? c : string.CompareOrdinal(pieces[(int)(a & 0xFFFFFFFF)], pieces[(int)(b & 0xFFFFFFFF)]);
    }

    /// <summary>The runs of text between special tokens in token ids of a byte-level tokenizer without merges (ids below
    /// 256 are bytes): what a tokenizer trained on rendered chats must encode.</summary>
    public static IEnumerable<string> TextRuns(IEnumerable<int[]> byteLevelIds)
    {
        ArgumentNullException.ThrowIfNull(byteLevelIds);
        var run = new List<byte>();
        foreach (int[] ids in byteLevelIds)
        {
            foreach (int id in ids)
            {
                if (id is >= 0 and < 256) { run.Add((byte)id); continue; }
                if (run.Count > 0) { yield return Encoding.UTF8.GetString(run.ToArray()); run.Clear(); }
            }
            if (run.Count > 0) { yield return Encoding.UTF8.GetString(run.ToArray()); run.Clear(); }
        }
    }
}
