namespace LoraMix.Adapters;

/// <summary>Tells a misspelt config key from an unknown one: the adapter configs refuse a key that looks like one they read
/// (a misspelt key would otherwise fall back silently to its default).</summary>
internal static class ConfigKeyMatch
{
    /// <summary>Lower-case letters and digits of a key (<c>Router-Policy</c> → <c>routerpolicy</c>).</summary>
    public static string Normalize(string key) => new([.. key.ToLowerInvariant().Where(char.IsLetterOrDigit)]);

    /// <summary>The edit distance of two strings, capped: any distance above 2 is returned as 3.</summary>
    public static int Levenshtein(string a, string b)
    {
        if (Math.Abs(a.Length - b.Length) > 2) return 3;
        var prev = new int[b.Length + 1];
        var cur = new int[b.Length + 1];
        for (int j = 0; j <= b.Length; j++) prev[j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            cur[0] = i;
            for (int j = 1; j <= b.Length; j++)
                cur[j] = Math.Min(Math.Min(cur[j - 1] + 1, prev[j] + 1), prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
            (prev, cur) = (cur, prev);
        }
        return Math.Min(prev[b.Length], 3);
    }
}
