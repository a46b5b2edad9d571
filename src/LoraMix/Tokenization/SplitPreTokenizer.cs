using System.Globalization;
using System.Runtime.CompilerServices;
using System.Text;

namespace LoraMix.Tokenization;

/// <summary>
/// A hand-written matcher for the GPT-4-style split regex that Llama-3 and Qwen2/3 tokenizer.json files use:
/// <code>(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+</code>
/// (K = 3 for Llama-3, <c>\p{N}</c> alone for Qwen). It works on code points, as the reference implementations do
/// (Rust <c>regex</c>/<c>fancy-regex</c> and JavaScript <c>/u</c> regexes); .NET's Regex works on UTF-16 code
/// units, which splits astral letters (𝐀, 𠀀) and emoji differently, so it is not used.
/// </summary>
/// <remarks>
/// Semantics follow transformers.js, the reference encoder used for the goldens: <c>\s</c> is JavaScript's
/// whitespace set (it includes U+FEFF and excludes U+0085) and the contraction group is ASCII-case-insensitive
/// (transformers.js rewrites <c>(?i:...)</c> to explicit <c>[sS]</c> classes).
/// </remarks>
internal sealed class SplitPreTokenizer
{
    private const string Prefix = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|";
    private const string Suffix = @"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    private readonly int _maxDigits;

    private SplitPreTokenizer(int maxDigits) => _maxDigits = maxDigits;

    /// <summary>The longest run of digits one pre-token may hold.</summary>
    public int MaxDigits => _maxDigits;

    /// <summary>Recognises a supported split pattern; null when the pattern is not one this matcher implements.</summary>
    public static SplitPreTokenizer? TryCreate(string pattern)
    {
        if (!pattern.StartsWith(Prefix, StringComparison.Ordinal) || !pattern.EndsWith(Suffix, StringComparison.Ordinal))
            return null;
        string digits = pattern[Prefix.Length..^Suffix.Length];
        if (digits == @"\p{N}") return new SplitPreTokenizer(1);
        if (digits == @"\p{N}+") return new SplitPreTokenizer(int.MaxValue);
        if (digits.StartsWith(@"\p{N}{1,", StringComparison.Ordinal) && digits.EndsWith('}')
            && int.TryParse(digits.AsSpan(8, digits.Length - 9), NumberStyles.None, CultureInfo.InvariantCulture, out int k) && k >= 1)
            return new SplitPreTokenizer(k);
        return null;
    }

    // Character classes.
    private const byte Other = 0, Letter = 1, Number = 2, Space = 3;

    private static readonly byte[] s_bmp = BuildBmp();

    private static byte[] BuildBmp()
    {
        var t = new byte[65536];
        for (int c = 0; c < 65536; c++)
        {
            if (c >= 0xD800 && c <= 0xDFFF) { t[c] = Other; continue; }
            t[c] = Classify(CharUnicodeInfo.GetUnicodeCategory(c), c);
        }
        return t;
    }

    private static byte Classify(UnicodeCategory cat, int cp)
    {
        if (IsJsWhitespace(cp)) return Space;
        switch (cat)
        {
            case UnicodeCategory.UppercaseLetter:
            case UnicodeCategory.LowercaseLetter:
            case UnicodeCategory.TitlecaseLetter:
            case UnicodeCategory.ModifierLetter:
            case UnicodeCategory.OtherLetter:
                return Letter;
            case UnicodeCategory.DecimalDigitNumber:
            case UnicodeCategory.LetterNumber:
            case UnicodeCategory.OtherNumber:
                return Number;
            default:
                return Other;
        }
    }

    /// <summary>JavaScript's <c>\s</c>: WhiteSpace (Zs, TAB, VT, FF, U+FEFF) and LineTerminator.</summary>
    private static bool IsJsWhitespace(int cp) => cp switch
    {
        '\t' or '\n' or '\v' or '\f' or '\r' or ' ' or '\u00A0' or '\u1680' or '\u2028' or '\u2029' or '\u202F'
            or '\u205F' or '\u3000' or '\uFEFF' => true,
        >= 0x2000 and <= 0x200A => true,
        _ => false,
    };

    /// <summary>The class of the code point at <paramref name="i"/> and its length in UTF-16 units.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static byte ClassAt(ReadOnlySpan<char> s, int i, out int width)
    {
        char c = s[i];
        if (!char.IsHighSurrogate(c) || i + 1 >= s.Length || !char.IsLowSurrogate(s[i + 1]))
        {
            width = 1;
            return s_bmp[c];
        }
        width = 2;
        int cp = char.ConvertToUtf32(c, s[i + 1]);
        return Classify(CharUnicodeInfo.GetUnicodeCategory(cp), cp);
    }

    private static bool IsCrLf(char c) => c == '\r' || c == '\n';

    /// <summary>Length (UTF-16 units) of the pre-token that starts at <paramref name="i"/>; always ≥ 1.</summary>
    public int NextLength(ReadOnlySpan<char> s, int i)
    {
        int n = s.Length;
        char c0 = s[i];
        // 1. contractions
        if (c0 == '\'' && i + 1 < n)
        {
            char a = (char)(s[i + 1] | 0x20);
            if (a is 's' or 't' or 'm' or 'd') return 2;
            if (i + 2 < n)
            {
                char b = (char)(s[i + 2] | 0x20);
                if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
            }
        }
        byte k0 = ClassAt(s, i, out int w0);
        // 2. [^\r\n\p{L}\p{N}]?\p{L}+
        if (k0 == Letter) return LetterRun(s, i + w0) - i;
        if (k0 != Number && !IsCrLf(c0) && i + w0 < n && ClassAt(s, i + w0, out _) == Letter)
            return LetterRun(s, i + w0) - i;
        // 3. \p{N}{1,K}
        if (k0 == Number)
        {
            int j = i + w0, count = 1;
            while (count < _maxDigits && j < n && ClassAt(s, j, out int w) == Number) { j += w; count++; }
            return j - i;
        }
        // 4. ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        int start = -1;
        if (k0 == Other) start = i;
        else if (c0 == ' ' && i + 1 < n && ClassAt(s, i + 1, out _) == Other) start = i + 1;
        if (start >= 0)
        {
            int j = start;
            while (j < n)
            {
                if (ClassAt(s, j, out int w) != Other) break;
                j += w;
            }
            while (j < n && IsCrLf(s[j])) j++;
            return j - i;
        }
        // 5-7. whitespace (all whitespace code points are BMP)
        int e = i, lastCrLf = -1, lastStart = i;
        while (e < n && s_bmp[s[e]] == Space && !char.IsSurrogate(s[e]))
        {
            if (IsCrLf(s[e])) lastCrLf = e;
            lastStart = e;
            e++;
        }
        if (lastCrLf >= 0) return lastCrLf + 1 - i;     // \s*[\r\n]+
        if (e == n) return e - i;                        // \s+(?!\S) at the end
        if (lastStart > i) return lastStart - i;         // \s+(?!\S): leave the last space for the next word
        return e - i;                                    // \s+
    }

    private static int LetterRun(ReadOnlySpan<char> s, int j)
    {
        while (j < s.Length)
        {
            if (ClassAt(s, j, out int w) != Letter) break;
            j += w;
        }
        return j;
    }
}

/// <summary>GPT-2's reversible byte ↔ printable-character map used by byte-level BPE vocabularies.</summary>
internal static class ByteLevelMap
{
    /// <summary>byte → the character that stands for it in vocabulary strings.</summary>
    public static readonly char[] ByteToChar = BuildByteToChar();

    /// <summary>character → byte, or -1 for a character that is not one of the 256.</summary>
    public static readonly short[] CharToByte = BuildCharToByte();

    private static char[] BuildByteToChar()
    {
        var map = new char[256];
        int extra = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)(256 + extra++);
        }
        return map;
    }

    private static short[] BuildCharToByte()
    {
        var inv = new short[512];
        Array.Fill(inv, (short)-1);
        char[] map = BuildByteToChar();
        for (int b = 0; b < 256; b++) inv[map[b]] = (short)b;
        return inv;
    }

    /// <summary>Appends the bytes a byte-level vocabulary string stands for (characters outside the map: their UTF-8).</summary>
    public static void AppendBytes(string piece, List<byte> output)
    {
        Span<byte> tmp = stackalloc byte[4];
        for (int i = 0; i < piece.Length; i++)
        {
            char c = piece[i];
            if (c < 512 && CharToByte[c] >= 0) { output.Add((byte)CharToByte[c]); continue; }
            int len = char.IsHighSurrogate(c) && i + 1 < piece.Length && char.IsLowSurrogate(piece[i + 1])
                ? Encoding.UTF8.GetBytes(piece.AsSpan(i++, 2), tmp)
                : Encoding.UTF8.GetBytes(piece.AsSpan(i, 1), tmp);
            for (int k = 0; k < len; k++) output.Add(tmp[k]);
        }
    }
}
