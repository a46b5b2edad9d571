using System.Buffers;
using System.Text;

namespace LoraMix.Tokenization;

/// <summary>The tokenizer algorithm family.</summary>
public enum TokenizerKind
{
    /// <summary>GPT-2-style byte-level BPE with a split regex (Llama-3, Qwen2/3).</summary>
    ByteLevelBpe,

    /// <summary>SentencePiece BPE with ▁ for spaces and byte fallback (Llama-2, Mistral, TinyLlama).</summary>
    SentencePiece,
}

/// <summary>
/// A Llama-family text tokenizer loaded from a Hugging Face model directory (<c>tokenizer.json</c>, or a SentencePiece
/// <c>tokenizer.model</c>, plus the optional <c>tokenizer_config.json</c>). It reproduces the reference token ids
/// exactly (see tests/LoraMix.Tests/Tokenization) and decodes bytes faithfully, including a streaming decoder.
/// Instances are immutable and thread-safe.
/// </summary>
public sealed partial class TextTokenizer
{
    private const char Metaspace = '\u2581';

    private readonly string[] _pieces;          // id → vocabulary string ("" for an id nothing uses)
    private readonly byte[]?[] _bytes;          // id → the bytes the token decodes to (null for an unused id)
    private readonly bool[] _special;
    private readonly Dictionary<string, int> _vocab;          // model vocabulary
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _vocabSpan;
    private readonly Dictionary<string, int> _tokenToId;      // vocabulary + added tokens
    private readonly MergeTable _merges;
    private readonly AddedTokenMatcher _added;
    private readonly Dictionary<string, int> _addedMap;
    private readonly int[] _byteSymbol;         // byte → id of its symbol (byte-level char, or <0xNN>); -1 if none

    // Byte-level
    private const int MaxCachedWord = 48;           // pre-tokens up to this many bytes are cached...
    private const int MaxCacheEntries = 100_000;    // ...until the cache holds this many
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, int[]>.AlternateLookup<ReadOnlySpan<char>> _cacheSpan;
    private readonly SplitPreTokenizer? _split;
    private readonly bool _nfc;
    private readonly bool _ignoreMerges;

    // SentencePiece
    private readonly PrependMode _prepend;
    private readonly bool _splitOnMetaspace;
    private readonly bool _byteFallback;
    private readonly bool _fuseUnk;
    private readonly bool _removeExtraWhitespaces;

    private TextTokenizer(Definition d)
    {
        Directory = d.Directory;
        Kind = d.Kind;
        _vocab = d.Vocab;
        _vocabSpan = _vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _cacheSpan = _cache.GetAlternateLookup<ReadOnlySpan<char>>();
        _merges = d.Merges;
        _split = d.Split;
        _nfc = d.Nfc;
        _ignoreMerges = d.IgnoreMerges;
        _prepend = d.Prepend;
        _splitOnMetaspace = d.SplitOnMetaspace;
        _byteFallback = d.ByteFallback;
        _fuseUnk = d.FuseUnk;
        _removeExtraWhitespaces = d.RemoveExtraWhitespaces;
        ChatTemplate = d.ChatTemplate;
        AddBosToken = d.AddBos;
        AddEosToken = d.AddEos;

        int max = -1;
        foreach (int id in _vocab.Values) max = Math.Max(max, id);
        foreach (var t in d.Added) max = Math.Max(max, t.Id);
        VocabSize = max + 1;

        _pieces = new string[VocabSize];
        Array.Fill(_pieces, "");
        _bytes = new byte[]?[VocabSize];
        _special = new bool[VocabSize];
        var scratch = new List<byte>(32);
        foreach (var (piece, id) in _vocab)
        {
            _pieces[id] = piece;
            scratch.Clear();
            if (Kind == TokenizerKind.ByteLevelBpe) ByteLevelMap.AppendBytes(piece, scratch);
            else AppendSentencePieceBytes(piece, scratch);
            _bytes[id] = scratch.ToArray();
        }
        _tokenToId = new Dictionary<string, int>(_vocab, StringComparer.Ordinal);
        _addedMap = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in d.Added)
        {
            _pieces[t.Id] = t.Content;
            _bytes[t.Id] = Encoding.UTF8.GetBytes(t.Content);
            _special[t.Id] = t.Special;
            _tokenToId[t.Content] = t.Id;
            _addedMap[t.Content] = t.Id;
        }
        SpecialTokens = _addedMap;
        _added = new AddedTokenMatcher(d.Added);

        _byteSymbol = new int[256];
        for (int b = 0; b < 256; b++)
        {
            string sym = Kind == TokenizerKind.ByteLevelBpe ? ByteLevelMap.ByteToChar[b].ToString() : $"<0x{b:X2}>";
            _byteSymbol[b] = _vocab.TryGetValue(sym, out int id) ? id : -1;
        }

        BosToken = d.BosToken;
        EosToken = d.EosToken;
        PadToken = d.PadToken;
        BosId = IdOf(d.BosToken);
        EosId = IdOf(d.EosToken);
        PadId = IdOf(d.PadToken);
        UnkId = IdOf(d.UnkToken);
    }

    private int? IdOf(string? token) => token is not null && _tokenToId.TryGetValue(token, out int id) ? id : null;

    private static void AppendSentencePieceBytes(string piece, List<byte> output)
    {
        if (piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece[5] == '>'
            && byte.TryParse(piece.AsSpan(3, 2), System.Globalization.NumberStyles.AllowHexSpecifier, null, out byte b))
        {
            output.Add(b);
            return;
        }
        foreach (byte x in Encoding.UTF8.GetBytes(piece.Replace(Metaspace, ' '))) output.Add(x);
    }

    /// <summary>The directory the tokenizer was loaded from.</summary>
    public string Directory { get; }

    /// <summary>The algorithm family.</summary>
    public TokenizerKind Kind { get; }

    /// <summary>Number of ids, including added tokens (the largest id + 1).</summary>
    public int VocabSize { get; }

    /// <summary>Beginning-of-sequence id, when the tokenizer has one.</summary>
    public int? BosId { get; }

    /// <summary>End-of-sequence id, when the tokenizer has one.</summary>
    public int? EosId { get; }

    /// <summary>Padding id, when the tokenizer has one.</summary>
    public int? PadId { get; }

    /// <summary>Unknown-token id, when the tokenizer has one.</summary>
    public int? UnkId { get; }

    /// <summary>Beginning-of-sequence token text.</summary>
    public string? BosToken { get; }

    /// <summary>End-of-sequence token text.</summary>
    public string? EosToken { get; }

    /// <summary>Padding token text.</summary>
    public string? PadToken { get; }

    /// <summary>Whether <see cref="EncodeWithSpecial"/> prepends BOS.</summary>
    public bool AddBosToken { get; }

    /// <summary>Whether <see cref="EncodeWithSpecial"/> appends EOS.</summary>
    public bool AddEosToken { get; }

    /// <summary>The raw Jinja chat template from tokenizer_config.json, or null.</summary>
    public string? ChatTemplate { get; }

    /// <summary>All added tokens (special or not): content → id.</summary>
    public IReadOnlyDictionary<string, int> SpecialTokens { get; }

    /// <summary>
    /// Encodes text without adding BOS/EOS. With <paramref name="parseSpecialTokens"/>, added-token strings in the
    /// text (e.g. "&lt;|eot_id|&gt;", "&lt;s&gt;") become their ids, as Hugging Face does; otherwise all is plain text.
    /// </summary>
    public int[] Encode(string text, bool parseSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var output = new List<int>(text.Length / 3 + 4);
        EncodeInto(text, parseSpecialTokens, output);
        return output.ToArray();
    }

    /// <summary>Encodes like <see cref="Encode"/>, appending the ids to <paramref name="output"/>.</summary>
    public void EncodeInto(string text, bool parseSpecialTokens, List<int> output)
    {
        ArgumentNullException.ThrowIfNull(text);
        ArgumentNullException.ThrowIfNull(output);
        if (!parseSpecialTokens || _added.IsEmpty)
        {
            EncodeSegment(text.AsSpan(), 0, output);
            return;
        }
        int pos = 0;
        while (pos < text.Length)
        {
            if (!_added.FindNext(text, pos, out int start, out int end, out int id))
            {
                EncodeSegment(text.AsSpan(pos), pos, output);
                break;
            }
            if (start > pos) EncodeSegment(text.AsSpan(pos, start - pos), pos, output);
            output.Add(id);
            pos = end;
        }
    }

    /// <summary>
    /// Encodes and adds BOS/EOS as <see cref="AddBosToken"/>/<see cref="AddEosToken"/> say, never twice: a BOS
    /// already at the start (from parsed special-token text) or an EOS already at the end is not added again.
    /// </summary>
    public int[] EncodeWithSpecial(string text, bool parseSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var output = new List<int>(text.Length / 3 + 4);
        EncodeInto(text, parseSpecialTokens, output);
        if (AddBosToken && BosId is int bos && (output.Count == 0 || output[0] != bos)) output.Insert(0, bos);
        if (AddEosToken && EosId is int eos && (output.Count == 0 || output[^1] != eos)) output.Add(eos);
        return output.ToArray();
    }

    /// <summary>
    /// Decodes ids to text. Unknown ids are skipped (as Hugging Face does). SentencePiece tokenizers drop the one
    /// leading space that the dummy prefix produces.
    /// </summary>
    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        int total = 0;
        foreach (int id in ids)
            if (Included(id, skipSpecialTokens)) total += _bytes[id]!.Length;
        byte[] rented = ArrayPool<byte>.Shared.Rent(Math.Max(total, 1));
        try
        {
            int n = 0;
            foreach (int id in ids)
            {
                if (!Included(id, skipSpecialTokens)) continue;
                byte[] b = _bytes[id]!;
                b.CopyTo(rented.AsSpan(n));
                n += b.Length;
            }
            int skip = Kind == TokenizerKind.SentencePiece && n > 0 && rented[0] == (byte)' ' ? 1 : 0;
            return Encoding.UTF8.GetString(rented, skip, n - skip);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(rented);
        }
    }

    internal bool Included(int id, bool skipSpecialTokens) =>
        (uint)id < (uint)VocabSize && _bytes[id] is not null && !(skipSpecialTokens && _special[id]);

    internal byte[] BytesOf(int id) => _bytes[id]!;

    /// <summary>The vocabulary string as stored (e.g. "Ġhello", "▁Hello", "&lt;0x0A&gt;", "&lt;|eot_id|&gt;").</summary>
    public string TokenPiece(int id)
    {
        CheckId(id);
        return _pieces[id];
    }

    /// <summary>The UTF-8 bytes this token contributes when decoding.</summary>
    public byte[] TokenBytes(int id)
    {
        CheckId(id);
        return (byte[])_bytes[id]!.Clone();
    }

    /// <summary>Whether the id is an added token marked special.</summary>
    public bool IsSpecial(int id) => (uint)id < (uint)VocabSize && _special[id];

    /// <summary>The id of a vocabulary string or added token, or null.</summary>
    public int? TokenToId(string token)
    {
        ArgumentNullException.ThrowIfNull(token);
        return _tokenToId.TryGetValue(token, out int id) ? id : null;
    }

    /// <summary>A stateful decoder for streaming generation (see <see cref="Utf8StreamDecoder"/>).</summary>
    public Utf8StreamDecoder CreateStreamDecoder(bool skipSpecialTokens = false) => new(this, skipSpecialTokens);

    private void CheckId(int id)
    {
        if ((uint)id >= (uint)VocabSize || _bytes[id] is null)
            throw new ArgumentOutOfRangeException(nameof(id), id, $"no token has id {id} (vocabulary size {VocabSize})");
    }

    // ---------------------------------------------------------------- encoding

    private void EncodeSegment(ReadOnlySpan<char> text, int offset, List<int> output)
    {
        if (text.IsEmpty) return;
        if (Kind == TokenizerKind.ByteLevelBpe) EncodeByteLevel(text, output);
        else EncodeSentencePiece(text, offset, output);
    }

    private void EncodeByteLevel(ReadOnlySpan<char> text, List<int> output)
    {
        string? normalized = null;
        if (_nfc && NeedsNormalization(text))
        {
            normalized = NormalizeNfc(text);
            text = normalized.AsSpan();
        }
        BpeMerger merger = BpeMerger.Shared;
        byte[] utf8 = ArrayPool<byte>.Shared.Rent(256);
        char[] mapped = ArrayPool<char>.Shared.Rent(256);
        try
        {
            int pos = 0;
            while (pos < text.Length)
            {
                int len = _split!.NextLength(text, pos);
                ReadOnlySpan<char> word = text.Slice(pos, len);
                pos += len;
                int max = Encoding.UTF8.GetMaxByteCount(word.Length);
                if (utf8.Length < max)
                {
                    ArrayPool<byte>.Shared.Return(utf8);
                    ArrayPool<char>.Shared.Return(mapped);
                    utf8 = ArrayPool<byte>.Shared.Rent(max);
                    mapped = ArrayPool<char>.Shared.Rent(max);
                }
                int nb = Encoding.UTF8.GetBytes(word, utf8);
                for (int i = 0; i < nb; i++) mapped[i] = ByteLevelMap.ByteToChar[utf8[i]];
                if (_ignoreMerges && _vocabSpan.TryGetValue(mapped.AsSpan(0, nb), out int whole))
                {
                    output.Add(whole);
                    continue;
                }
                ReadOnlySpan<char> key = mapped.AsSpan(0, nb);
                if (nb <= MaxCachedWord && _cacheSpan.TryGetValue(key, out int[]? cached))
                {
                    output.AddRange(cached);
                    continue;
                }
                Span<int> symbols = merger.Begin(nb);
                for (int i = 0; i < nb; i++)
                {
                    int id = _byteSymbol[utf8[i]];
                    if (id < 0) throw new InvalidOperationException($"the vocabulary has no symbol for byte 0x{utf8[i]:X2}");
                    symbols[i] = id;
                }
                int before = output.Count;
                merger.MergeInto(nb, _merges, output);
                if (nb <= MaxCachedWord && _cache.Count < MaxCacheEntries)
                    _cache.TryAdd(key.ToString(), output.GetRange(before, output.Count - before).ToArray());
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(utf8);
            ArrayPool<char>.Shared.Return(mapped);
        }
    }

    private static bool NeedsNormalization(ReadOnlySpan<char> text)
    {
        foreach (char c in text)
            if (c >= '\u0300') return true;   // below U+0300 nothing composes or decomposes under NFC
        return false;
    }

    /// <summary>NFC that tolerates lone surrogates (left as they are, like JavaScript's String.normalize).</summary>
    private static string NormalizeNfc(ReadOnlySpan<char> text)
    {
        var sb = new StringBuilder(text.Length);
        int start = 0;
        for (int i = 0; i < text.Length; i++)
        {
            char c = text[i];
            if (!char.IsSurrogate(c)) continue;
            if (char.IsHighSurrogate(c) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1])) { i++; continue; }
            sb.Append(text[start..i].ToString().Normalize(NormalizationForm.FormC)).Append(c);
            start = i + 1;
        }
        sb.Append(text[start..].ToString().Normalize(NormalizationForm.FormC));
        return sb.ToString();
    }

    private void EncodeSentencePiece(ReadOnlySpan<char> text, int offset, List<int> output)
    {
        char[] buf = ArrayPool<char>.Shared.Rent(text.Length + 1);
        try
        {
            int n = 0;
            if (_removeExtraWhitespaces)
            {
                // SentencePiece's remove_extra_whitespaces: strip leading/trailing spaces, squeeze inner runs.
                text = text.Trim(' ');
                if (text.IsEmpty) return;
            }
            bool startsWithSpace = text[0] == ' ';
            bool prepend = _prepend switch
            {
                PrependMode.Always => true,
                PrependMode.UnlessSpace => !startsWithSpace,
                PrependMode.First => !startsWithSpace && offset == 0,
                _ => false,
            };
            if (prepend) buf[n++] = Metaspace;
            bool lastSpace = false;
            foreach (char c in text)
            {
                if (c == ' ')
                {
                    if (_removeExtraWhitespaces && lastSpace) continue;
                    buf[n++] = Metaspace;
                    lastSpace = true;
                }
                else
                {
                    buf[n++] = c;
                    lastSpace = false;
                }
            }
            ReadOnlySpan<char> s = buf.AsSpan(0, n);
            if (!_splitOnMetaspace)
            {
                EncodeSentencePieceWord(s, output);
                return;
            }
            int wordStart = 0;
            for (int i = 1; i <= s.Length; i++)
            {
                if (i == s.Length || s[i] == Metaspace)
                {
                    EncodeSentencePieceWord(s[wordStart..i], output);
                    wordStart = i;
                }
            }
        }
        finally
        {
            ArrayPool<char>.Shared.Return(buf);
        }
    }

    private void EncodeSentencePieceWord(ReadOnlySpan<char> word, List<int> output)
    {
        if (word.IsEmpty) return;
        BpeMerger merger = BpeMerger.Shared;
        Span<int> symbols = merger.Begin(word.Length * 3 + 4);
        int count = 0;
        int unk = UnkId ?? -1;
        Span<byte> bytes = stackalloc byte[4];
        for (int i = 0; i < word.Length;)
        {
            int w = char.IsHighSurrogate(word[i]) && i + 1 < word.Length && char.IsLowSurrogate(word[i + 1]) ? 2 : 1;
            ReadOnlySpan<char> ch = word.Slice(i, w);
            i += w;
            if (_vocabSpan.TryGetValue(ch, out int id))
            {
                symbols[count++] = id;
                continue;
            }
            if (_byteFallback)
            {
                int nb = char.IsSurrogate(ch[0]) && w == 1
                    ? WriteReplacementChar(bytes)
                    : Encoding.UTF8.GetBytes(ch, bytes);
                bool all = true;
                for (int k = 0; k < nb; k++) all &= _byteSymbol[bytes[k]] >= 0;
                if (all)
                {
                    if (count + nb > symbols.Length) symbols = Grow(merger, count, symbols.Length * 2);
                    for (int k = 0; k < nb; k++) symbols[count++] = _byteSymbol[bytes[k]];
                    continue;
                }
            }
            if (unk < 0) throw new InvalidOperationException($"'{ch.ToString()}' is not in the vocabulary and the tokenizer has no unknown token");
            if (_fuseUnk && count > 0 && symbols[count - 1] == unk) continue;
            symbols[count++] = unk;
        }
        merger.MergeInto(count, _merges, output);
    }

    private static Span<int> Grow(BpeMerger merger, int count, int size)
    {
        int[] keep = merger.Begin(count).ToArray();
        Span<int> s = merger.Begin(size);
        keep.CopyTo(s);
        return s;
    }

    private static int WriteReplacementChar(Span<byte> bytes)
    {
        bytes[0] = 0xEF;
        bytes[1] = 0xBF;
        bytes[2] = 0xBD;
        return 3;
    }

    internal enum PrependMode
    {
        /// <summary>No dummy prefix.</summary>
        None,

        /// <summary>Always prepend ▁ to a non-empty segment (Prepend normalizer; SentencePiece add_dummy_prefix).</summary>
        Always,

        /// <summary>Metaspace prepend_scheme "always": prepend unless the segment starts with a space.</summary>
        UnlessSpace,

        /// <summary>Metaspace prepend_scheme "first": only for the segment at the start of the text.</summary>
        First,
    }
}
