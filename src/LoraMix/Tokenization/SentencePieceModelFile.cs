using System.Text;

namespace LoraMix.Tokenization;

/// <summary>
/// A minimal reader for SentencePiece <c>tokenizer.model</c> files (the <c>ModelProto</c> protobuf): pieces with
/// scores and types, the trainer's model type, byte fallback and special ids, and the normalizer flags.
/// </summary>
internal sealed class SentencePieceModelFile
{
    public enum PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 }

    public readonly record struct Piece(string Text, float Score, PieceType Type);

    public List<Piece> Pieces { get; } = new();
    public int ModelType { get; private set; } = 1;        // UNIGRAM=1, BPE=2, WORD=3, CHAR=4
    public bool ByteFallback { get; private set; }
    public int UnkId { get; private set; }
    public int BosId { get; private set; } = 1;
    public int EosId { get; private set; } = 2;
    public int PadId { get; private set; } = -1;
    public string NormalizerName { get; private set; } = "nmt_nfkc";
    public bool HasPrecompiledCharsMap { get; private set; }
    public bool AddDummyPrefix { get; private set; } = true;
    public bool RemoveExtraWhitespaces { get; private set; } = true;
    public bool EscapeWhitespaces { get; private set; } = true;
    public bool TreatWhitespaceAsSuffix { get; private set; }

    public static SentencePieceModelFile Read(string path)
    {
        byte[] data;
        try { data = InputFiles.ReadAllBytes(path, InputFiles.MaxTokenizerFileBytes, reason => new TokenizerFileException(path, null, reason)); }
        catch (IOException e) { throw new TokenizerFileException(path, null, $"cannot read the SentencePiece model: {e.Message}", e); }
        var m = new SentencePieceModelFile();
        try
        {
            var r = new Reader(data, 0, data.Length);
            while (!r.End)
            {
                (int field, int wire) = r.Tag();
                switch (field)
                {
                    case 1 when wire == 2:
                        if (m.Pieces.Count >= TextTokenizer.MaxVocabSize)
                            throw new TokenizerFileException(path, "pieces",
                                $"the model has more than {TextTokenizer.MaxVocabSize} pieces, the limit on a tokenizer's vocabulary");
                        m.Pieces.Add(ReadPiece(r.Sub()));
                        break;
                    case 2 when wire == 2: m.ReadTrainer(r.Sub()); break;
                    case 3 when wire == 2: m.ReadNormalizer(r.Sub()); break;
                    default: r.Skip(wire); break;
                }
            }
        }
        catch (Exception e) when (e is FormatException or IndexOutOfRangeException or ArgumentException or OverflowException)
        {
            throw new TokenizerFileException(path, null,
                $"not a valid SentencePiece model (ModelProto protobuf expected): {e.Message}", e);
        }
        if (m.Pieces.Count == 0)
            throw new TokenizerFileException(path, null, "not a valid SentencePiece model: it has no pieces");
        return m;
    }

    private static Piece ReadPiece(Reader r)
    {
        string text = "";
        float score = 0;
        var type = PieceType.Normal;
        while (!r.End)
        {
            (int field, int wire) = r.Tag();
            switch (field)
            {
                case 1 when wire == 2: text = r.String(); break;
                case 2 when wire == 5: score = r.Float(); break;
                case 3 when wire == 0: type = (PieceType)(int)r.Varint(); break;
                default: r.Skip(wire); break;
            }
        }
        return new Piece(text, score, type);
    }

    private void ReadTrainer(Reader r)
    {
        while (!r.End)
        {
            (int field, int wire) = r.Tag();
            switch (field)
            {
                case 3 when wire == 0: ModelType = (int)r.Varint(); break;
                case 24 when wire == 0: TreatWhitespaceAsSuffix = r.Varint() != 0; break;
                case 35 when wire == 0: ByteFallback = r.Varint() != 0; break;
                case 40 when wire == 0: UnkId = (int)r.Varint(); break;
                case 41 when wire == 0: BosId = (int)r.Varint(); break;
                case 42 when wire == 0: EosId = (int)r.Varint(); break;
                case 43 when wire == 0: PadId = (int)r.Varint(); break;
                default: r.Skip(wire); break;
            }
        }
    }

    private void ReadNormalizer(Reader r)
    {
        while (!r.End)
        {
            (int field, int wire) = r.Tag();
            switch (field)
            {
                case 1 when wire == 2: NormalizerName = r.String(); break;
                case 2 when wire == 2: HasPrecompiledCharsMap = r.Sub().Length > 0; break;
                case 3 when wire == 0: AddDummyPrefix = r.Varint() != 0; break;
                case 4 when wire == 0: RemoveExtraWhitespaces = r.Varint() != 0; break;
                case 5 when wire == 0: EscapeWhitespaces = r.Varint() != 0; break;
                default: r.Skip(wire); break;
            }
        }
    }

    private sealed class Reader(byte[] data, int pos, int end)
    {
        private int _pos = pos;

        public bool End => _pos >= end;
        public int Length => end - _pos;

        public (int Field, int Wire) Tag()
        {
            ulong t = Varint();
            return ((int)(t >> 3), (int)(t & 7));
        }

        public ulong Varint()
        {
            ulong v = 0;
            for (int shift = 0; shift < 64; shift += 7)
            {
                if (_pos >= end) throw new FormatException("truncated varint");
                byte b = data[_pos++];
                v |= (ulong)(b & 0x7F) << shift;
                if (b < 0x80) return v;
            }
            throw new FormatException("varint longer than 10 bytes");
        }

        public Reader Sub()
        {
            int len = checked((int)Varint());
            if (len < 0 || _pos + len > end) throw new FormatException("length-delimited field runs past its end");
            var sub = new Reader(data, _pos, _pos + len);
            _pos += len;
            return sub;
        }

        public string String()
        {
            Reader s = Sub();
            return Encoding.UTF8.GetString(data, s._pos, s.Length);
        }

        public float Float()
        {
            if (_pos + 4 > end) throw new FormatException("truncated fixed32");
            float f = BitConverter.ToSingle(data, _pos);
            _pos += 4;
            return f;
        }

        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: _pos += 8; break;
                case 2: Sub(); break;
                case 5: _pos += 4; break;
                default: throw new FormatException($"unsupported protobuf wire type {wire}");
            }
            if (_pos > end) throw new FormatException("field runs past its end");
        }
    }
}
