using System.Text;

namespace LoraMix.Tokenization;

/// <summary>
/// Decodes a stream of token ids to text incrementally: each <see cref="Push"/> returns the text that became
/// complete, holding back the bytes of a character split across tokens (so no U+FFFD appears for a valid
/// multi-byte character). <see cref="Flush"/> returns what is left (incomplete bytes become U+FFFD). The
/// concatenation of all results equals <see cref="TextTokenizer.Decode"/> of all the ids. Not thread-safe.
/// </summary>
public sealed class Utf8StreamDecoder
{
    private readonly TextTokenizer _tokenizer;
    private readonly bool _skipSpecial;
    private readonly Decoder _decoder = new UTF8Encoding(false, false).GetDecoder();
    private readonly bool _stripLeadingSpace;
    private bool _started;
    private char[] _chars = new char[64];

    internal Utf8StreamDecoder(TextTokenizer tokenizer, bool skipSpecialTokens)
    {
        _tokenizer = tokenizer;
        _skipSpecial = skipSpecialTokens;
        _stripLeadingSpace = tokenizer.Kind == TokenizerKind.SentencePiece;
    }

    /// <summary>Adds one token; returns the newly completed text (possibly empty).</summary>
    public string Push(int id)
    {
        if (!_tokenizer.Included(id, _skipSpecial)) return "";
        return Convert(_tokenizer.BytesOf(id), flush: false);
    }

    /// <summary>Ends the stream: returns any held-back bytes (as U+FFFD when they do not form a character) and resets.</summary>
    public string Flush()
    {
        string s = Convert(ReadOnlySpan<byte>.Empty, flush: true);
        _decoder.Reset();
        _started = false;
        return s;
    }

    private string Convert(ReadOnlySpan<byte> bytes, bool flush)
    {
        int max = _decoder.GetCharCount(bytes, flush);
        if (_chars.Length < max) _chars = new char[Math.Max(max, _chars.Length * 2)];
        int n = _decoder.GetChars(bytes, _chars, flush);
        int start = 0;
        if (!_started && n > 0)
        {
            _started = true;
            if (_stripLeadingSpace && _chars[0] == ' ') start = 1;
        }
        return n - start == 0 ? "" : new string(_chars, start, n - start);
    }
}
