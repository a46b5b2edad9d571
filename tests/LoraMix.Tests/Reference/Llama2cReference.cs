using System.Buffers.Binary;

namespace LoraMix.Tests.Reference;

/// <summary>
/// An independent, deliberately plain (float[] + loops, no TorchSharp) implementation of a Llama model stored in the
/// llama2.c "legacy" (version 0) checkpoint format, used as a test oracle. Written from the format description in
/// shared/models/stories260K/README.md; the numerics follow llama2.c: float32 everywhere with sequential float
/// accumulation, RMSNorm eps 1e-5, rotary embeddings on adjacent pairs (2i, 2i+1) of each head with
/// freq = 1 / 10000^(2i / head_size), grouped-query attention, SwiGLU FFN, classifier shared with the token
/// embedding when the header's vocab_size is positive. Single-sequence, one token per <see cref="Forward"/> call,
/// with its own KV cache.
/// </summary>
internal sealed class Llama2cReference
{
    public int Dim, HiddenDim, Layers, Heads, KvHeads, Vocab, SeqLen;

    /// <summary>True when the header's vocab_size was positive (classifier = token embedding).</summary>
    public bool SharedClassifier { get; private set; }

    private int _headSize, _kvDim;

    // Weights, row-major [out, in] per matrix; per-layer tensors are stored back to back.
    private float[] _tokEmb = [];   // [Vocab, Dim]
    private float[] _rmsAtt = [];   // [L, Dim]
    private float[] _wq = [];       // [L, Dim, Dim]
    private float[] _wk = [];       // [L, KvDim, Dim]
    private float[] _wv = [];       // [L, KvDim, Dim]
    private float[] _wo = [];       // [L, Dim, Dim]
    private float[] _rmsFfn = [];   // [L, Dim]
    private float[] _w1 = [];       // [L, Hidden, Dim]
    private float[] _w2 = [];       // [L, Dim, Hidden]
    private float[] _w3 = [];       // [L, Hidden, Dim]
    private float[] _rmsFinal = []; // [Dim]
    private float[] _wcls = [];     // [Vocab, Dim]

    // KV cache: [L, SeqLen, KvDim].
    private float[] _keyCache = [], _valueCache = [];

    // Scratch buffers.
    private float[] _x = [], _xb = [], _xb2 = [], _q = [], _k = [], _v = [], _hb = [], _hb2 = [], _att = [], _logits = [];

    private Llama2cReference() { }

    public static Llama2cReference Load(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        if (bytes.Length < 28) throw new InvalidDataException($"{path}: too short for a llama2.c header");
        int ReadInt(int index) => BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(index * 4, 4));

        var m = new Llama2cReference
        {
            Dim = ReadInt(0),
            HiddenDim = ReadInt(1),
            Layers = ReadInt(2),
            Heads = ReadInt(3),
            KvHeads = ReadInt(4),
            SeqLen = ReadInt(6),
        };
        int rawVocab = ReadInt(5);
        m.SharedClassifier = rawVocab > 0;
        m.Vocab = Math.Abs(rawVocab);
        if (m.Dim <= 0 || m.HiddenDim <= 0 || m.Layers <= 0 || m.Heads <= 0 || m.KvHeads <= 0 || m.Vocab <= 0 || m.SeqLen <= 0
            || m.Dim % m.Heads != 0 || m.Heads % m.KvHeads != 0 || (m.Dim / m.Heads) % 2 != 0)
            throw new InvalidDataException($"{path}: implausible llama2.c header");
        m._headSize = m.Dim / m.Heads;
        m._kvDim = m.Dim * m.KvHeads / m.Heads;

        int L = m.Layers, d = m.Dim, h = m.HiddenDim, kv = m._kvDim;
        long offset = 28;
        float[] Next(long count)
        {
            long byteCount = count * 4;
            if (offset + byteCount > bytes.Length) throw new InvalidDataException($"{path}: truncated weights");
            var arr = new float[count];
            ReadOnlySpan<byte> src = bytes.AsSpan(checked((int)offset), checked((int)byteCount));
            for (int i = 0; i < arr.Length; i++)
                arr[i] = BinaryPrimitives.ReadSingleLittleEndian(src.Slice(i * 4, 4));
            offset += byteCount;
            return arr;
        }

        m._tokEmb = Next((long)m.Vocab * d);
        m._rmsAtt = Next((long)L * d);
        m._wq = Next((long)L * d * d);
        m._wk = Next((long)L * kv * d);
        m._wv = Next((long)L * kv * d);
        m._wo = Next((long)L * d * d);
        m._rmsFfn = Next((long)L * d);
        m._w1 = Next((long)L * h * d);
        m._w2 = Next((long)L * d * h);
        m._w3 = Next((long)L * h * d);
        m._rmsFinal = Next(d);
        // Legacy freq_cis_real / freq_cis_imag tables: present in the file, not used (RoPE is computed on the fly).
        _ = Next((long)m.SeqLen * m._headSize / 2);
        _ = Next((long)m.SeqLen * m._headSize / 2);
        m._wcls = m.SharedClassifier ? m._tokEmb : Next((long)m.Vocab * d);
        if (offset != bytes.Length)
            throw new InvalidDataException($"{path}: {bytes.Length - offset} unexpected trailing bytes");

        m._keyCache = new float[(long)L * m.SeqLen * kv];
        m._valueCache = new float[(long)L * m.SeqLen * kv];
        m._x = new float[d];
        m._xb = new float[d];
        m._xb2 = new float[d];
        m._q = new float[d];
        m._k = new float[kv];
        m._v = new float[kv];
        m._hb = new float[h];
        m._hb2 = new float[h];
        m._att = new float[m.SeqLen];
        m._logits = new float[m.Vocab];
        return m;
    }

    /// <summary>
    /// Runs one token at position <paramref name="pos"/> (positions 0..pos-1 must already be in the KV cache,
    /// i.e. call with pos = 0, 1, 2, ...) and returns a fresh copy of the logits over the vocabulary.
    /// </summary>
    public float[] Forward(int token, int pos)
    {
        if ((uint)token >= (uint)Vocab) throw new ArgumentOutOfRangeException(nameof(token));
        if ((uint)pos >= (uint)SeqLen) throw new ArgumentOutOfRangeException(nameof(pos));
        int d = Dim, hd = HiddenDim, kv = _kvDim, hs = _headSize;
        int groupSize = Heads / KvHeads;
        float invSqrtHs = 1.0f / MathF.Sqrt(hs);

        Array.Copy(_tokEmb, (long)token * d, _x, 0, d);

        for (int l = 0; l < Layers; l++)
        {
            // ---- attention block ----
            RmsNorm(_xb, _x, _rmsAtt, l * d, d);
            MatVec(_q, _xb, _wq, (long)l * d * d, d, d);
            MatVec(_k, _xb, _wk, (long)l * kv * d, kv, d);
            MatVec(_v, _xb, _wv, (long)l * kv * d, kv, d);

            // Rotary embedding on adjacent pairs within each head.
            ApplyRope(_q, d, pos);
            ApplyRope(_k, kv, pos);

            long cacheLayer = (long)l * SeqLen * kv;
            Array.Copy(_k, 0, _keyCache, cacheLayer + (long)pos * kv, kv);
            Array.Copy(_v, 0, _valueCache, cacheLayer + (long)pos * kv, kv);

            for (int head = 0; head < Heads; head++)
            {
                int qOff = head * hs;
                int kvOff = (head / groupSize) * hs;
                // scores
                for (int t = 0; t <= pos; t++)
                {
                    long kBase = cacheLayer + (long)t * kv + kvOff;
                    float s = 0f;
                    for (int i = 0; i < hs; i++) s += _q[qOff + i] * _keyCache[kBase + i];
                    _att[t] = s * invSqrtHs;
                }
                // softmax over 0..pos
                float max = _att[0];
                for (int t = 1; t <= pos; t++) if (_att[t] > max) max = _att[t];
                float sum = 0f;
                for (int t = 0; t <= pos; t++) { _att[t] = MathF.Exp(_att[t] - max); sum += _att[t]; }
                for (int t = 0; t <= pos; t++) _att[t] /= sum;
                // weighted sum of values
                for (int i = 0; i < hs; i++) _xb[qOff + i] = 0f;
                for (int t = 0; t <= pos; t++)
                {
                    long vBase = cacheLayer + (long)t * kv + kvOff;
                    float a = _att[t];
                    for (int i = 0; i < hs; i++) _xb[qOff + i] += a * _valueCache[vBase + i];
                }
            }
            MatVec(_xb2, _xb, _wo, (long)l * d * d, d, d);
            for (int i = 0; i < d; i++) _x[i] += _xb2[i];

            // ---- SwiGLU feed-forward block: w2(silu(w1 x) * w3 x) ----
            RmsNorm(_xb, _x, _rmsFfn, l * d, d);
            MatVec(_hb, _xb, _w1, (long)l * hd * d, hd, d);
            MatVec(_hb2, _xb, _w3, (long)l * hd * d, hd, d);
            for (int i = 0; i < hd; i++)
            {
                float g = _hb[i];
                g *= 1.0f / (1.0f + MathF.Exp(-g));
                _hb[i] = g * _hb2[i];
            }
            MatVec(_xb, _hb, _w2, (long)l * d * hd, d, hd);
            for (int i = 0; i < d; i++) _x[i] += _xb[i];
        }

        RmsNorm(_x, _x, _rmsFinal, 0, d);
        MatVec(_logits, _x, _wcls, 0, Vocab, d);
        return (float[])_logits.Clone();
    }

    /// <summary>
    /// Greedy decoding like llama2.c's generate loop with an empty prompt: feed <paramref name="firstToken"/> at pos 0,
    /// then each argmax (lowest index on ties) at the next position, for at most <paramref name="steps"/> forward
    /// passes (clamped to SeqLen). Returns the generated ids (not including <paramref name="firstToken"/>); when
    /// <paramref name="stopOnBos"/> is set, generation ends (without emitting it) as soon as BOS (id 1) is produced.
    /// </summary>
    public List<int> GenerateGreedy(int firstToken, int steps, bool stopOnBos)
    {
        if (steps <= 0 || steps > SeqLen) steps = SeqLen;
        var result = new List<int>(steps);
        int token = firstToken;
        for (int pos = 0; pos < steps; pos++)
        {
            float[] logits = Forward(token, pos);
            int next = 0;
            for (int i = 1; i < logits.Length; i++) if (logits[i] > logits[next]) next = i;
            if (stopOnBos && next == 1) break;
            result.Add(next);
            token = next;
        }
        return result;
    }

    private void ApplyRope(float[] vec, int length, int pos)
    {
        int hs = _headSize;
        for (int i = 0; i < length; i += 2)
        {
            int pairInHead = i % hs; // = 2j for pair j of the head
            float freq = 1.0f / MathF.Pow(10000.0f, pairInHead / (float)hs);
            float angle = pos * freq;
            float c = MathF.Cos(angle), s = MathF.Sin(angle);
            float a = vec[i], b = vec[i + 1];
            vec[i] = a * c - b * s;
            vec[i + 1] = a * s + b * c;
        }
    }

    private static void RmsNorm(float[] output, float[] input, float[] weight, int weightOffset, int size)
    {
        float ss = 0f;
        for (int i = 0; i < size; i++) ss += input[i] * input[i];
        ss /= size;
        ss += 1e-5f;
        ss = 1.0f / MathF.Sqrt(ss);
        for (int i = 0; i < size; i++) output[i] = weight[weightOffset + i] * (ss * input[i]);
    }

    /// <summary>output[r] = sum_c W[r, c] * input[c], W row-major [rows, cols] starting at <paramref name="wOffset"/>.</summary>
    private static void MatVec(float[] output, float[] input, float[] w, long wOffset, int rows, int cols)
    {
        for (int r = 0; r < rows; r++)
        {
            long rowBase = wOffset + (long)r * cols;
            float acc = 0f;
            for (int c = 0; c < cols; c++) acc += w[rowBase + c] * input[c];
            output[r] = acc;
        }
    }
}
