namespace LoraMix.Tokenization;

/// <summary>An added token from tokenizer.json's <c>added_tokens</c> or tokenizer_config.json's <c>added_tokens_decoder</c>.</summary>
internal sealed record AddedToken(string Content, int Id, bool Special, bool LStrip = false, bool RStrip = false,
    bool SingleWord = false);

/// <summary>
/// Finds added tokens in text: leftmost match first, the longest token at that position (as the Hugging Face
/// added-vocabulary splitter and transformers.js do), honouring lstrip/rstrip/single_word.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private readonly Dictionary<char, AddedToken[]> _byFirst = new();

    public AddedTokenMatcher(IEnumerable<AddedToken> tokens)
    {
        foreach (var g in tokens.Where(t => t.Content.Length > 0).GroupBy(t => t.Content[0]))
            _byFirst[g.Key] = g.OrderByDescending(t => t.Content.Length).ThenBy(t => t.Id).ToArray();
    }

    public bool IsEmpty => _byFirst.Count == 0;

    /// <summary>
    /// Finds the next added token at or after <paramref name="from"/>. [start, end) is what it consumes, including
    /// whitespace that lstrip/rstrip swallow.
    /// </summary>
    public bool FindNext(string text, int from, out int start, out int end, out int id)
    {
        for (int i = from; i < text.Length; i++)
        {
            if (!_byFirst.TryGetValue(text[i], out AddedToken[]? candidates)) continue;
            foreach (AddedToken t in candidates)
            {
                if (!text.AsSpan(i).StartsWith(t.Content.AsSpan(), StringComparison.Ordinal)) continue;
                int s = i, e = i + t.Content.Length;
                if (t.SingleWord && ((s > 0 && IsWordChar(text[s - 1])) || (e < text.Length && IsWordChar(text[e]))))
                    continue;
                if (t.LStrip) while (s > from && char.IsWhiteSpace(text[s - 1])) s--;
                if (t.RStrip) while (e < text.Length && char.IsWhiteSpace(text[e])) e++;
                start = s;
                end = e;
                id = t.Id;
                return true;
            }
        }
        start = end = id = 0;
        return false;
    }

    private static bool IsWordChar(char c) => char.IsLetterOrDigit(c) || c == '_';
}
