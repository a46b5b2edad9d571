using LoraMix.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Modeling;

/// <summary>
/// A deliberately plain float64 Llama forward for one sequence, written from the Hugging Face equations: explicit
/// per-head attention with a materialised causal (and sliding-window) mask, rotary embeddings from closed-form double
/// trigonometry, no cache, no SDPA. It shares no code with LoraMix's modules.
/// </summary>
internal static class NaiveLlama
{
    public static double[] InverseFrequencies(LlamaConfig c)
    {
        int half = c.HeadDim / 2;
        var inv = new double[half];
        for (int j = 0; j < half; j++)
        {
            double f = 1.0 / Math.Pow(c.RopeTheta, 2.0 * j / c.HeadDim);
            if (c.RopeScaling is { Type: "linear" } lin) f /= lin.Factor;
            else if (c.RopeScaling is { Type: "llama3" } s)
            {
                double wavelen = 2 * Math.PI / f;
                double lowWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
                double highWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
                if (wavelen > lowWavelen) f /= s.Factor;                       // long wavelengths: fully scaled
                else if (wavelen >= highWavelen)                               // the band in between: interpolate
                {
                    double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
                    f = (1 - smooth) * f / s.Factor + smooth * f;
                }
            }
            inv[j] = f;
        }
        return inv;
    }

    /// <summary>Logits [T, V] (float64) for token ids at positions 0..T-1.</summary>
    public static Tensor Forward(LlamaConfig c, IReadOnlyDictionary<string, Tensor> weights, long[] ids) =>
        ForwardWithHidden(c, weights, ids).Logits;

    /// <summary>Logits [T, V] and the post-final-norm hidden states [T, hidden] (float64); <paramref name="delta"/>, when
    /// given, adds <c>delta(modulePath, x)</c> to every linear projection's output (x its float64 input [T, in]).</summary>
    public static (Tensor Logits, Tensor Hidden) ForwardWithHidden(LlamaConfig c, IReadOnlyDictionary<string, Tensor> weights, long[] ids,
        Func<string, Tensor, Tensor?>? delta = null)
    {
        Tensor W(string name) => weights[name].to(ScalarType.Float64);
        Tensor? B(string name) => weights.TryGetValue(name, out var b) ? b.to(ScalarType.Float64) : null;
        Tensor Lin(Tensor x, string p)
        {
            var y = x.matmul(W(p + ".weight").t());
            var b = B(p + ".bias");
            if (b is not null) y = y + b;
            return delta?.Invoke(p, x) is { } d ? y + d : y;
        }
        Tensor Norm(Tensor x, string p) => W(p + ".weight") * (x / (x.pow(2).mean([-1L], keepdim: true) + c.RmsNormEps).sqrt());

        int T = ids.Length, D = c.HeadDim, H = c.NumAttentionHeads, KV = c.NumKeyValueHeads;
        var inv = InverseFrequencies(c);
        var cos = new double[T * D];
        var sin = new double[T * D];
        for (int t = 0; t < T; t++)
            for (int j = 0; j < D / 2; j++)
            {
                double a = t * inv[j];
                cos[t * D + j] = cos[t * D + j + D / 2] = Math.Cos(a);
                sin[t * D + j] = sin[t * D + j + D / 2] = Math.Sin(a);
            }
        var cosT = tensor(cos, [T, D], ScalarType.Float64);
        var sinT = tensor(sin, [T, D], ScalarType.Float64);
        Tensor Rope(Tensor x) // [T, D]
        {
            var x1 = x.narrow(1, 0, D / 2);
            var x2 = x.narrow(1, D / 2, D / 2);
            return x * cosT + cat([-x2, x1], 1) * sinT;
        }

        var mask = new double[T * T];
        for (int i = 0; i < T; i++)
            for (int j = 0; j < T; j++)
            {
                bool ok = j <= i && (c.SlidingWindow is not int w || i - j < w);
                mask[i * T + j] = ok ? 0 : double.NegativeInfinity;
            }
        var maskT = tensor(mask, [T, T], ScalarType.Float64);

        var h = W("model.embed_tokens.weight").index_select(0, tensor(ids));
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var x = Norm(h, p + "input_layernorm");
            var q = Lin(x, p + "self_attn.q_proj");
            var k = Lin(x, p + "self_attn.k_proj");
            var v = Lin(x, p + "self_attn.v_proj");
            var heads = new List<Tensor>();
            for (int hd = 0; hd < H; hd++)
            {
                int g = hd / (H / KV);
                var qh = Rope(q.narrow(1, hd * D, D));
                var kh = Rope(k.narrow(1, g * D, D));
                var vh = v.narrow(1, g * D, D);
                var scores = qh.matmul(kh.t()) / Math.Sqrt(D) + maskT;
                heads.Add(scores.softmax(-1).matmul(vh));
            }
            h = h + Lin(cat(heads, 1), p + "self_attn.o_proj");
            var y = Norm(h, p + "post_attention_layernorm");
            var gate = Lin(y, p + "mlp.gate_proj");
            var act = gate * gate.sigmoid();
            h = h + Lin(act * Lin(y, p + "mlp.up_proj"), p + "mlp.down_proj");
        }
        h = Norm(h, "model.norm");
        var head = c.TieWordEmbeddings ? W("model.embed_tokens.weight") : W("lm_head.weight");
        return (h.matmul(head.t()), h);
    }
}
