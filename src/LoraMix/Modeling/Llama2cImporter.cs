using LoraMix.Checkpoints;
using Microsoft.Win32.SafeHandles;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>The header of a llama2.c legacy (version 0) checkpoint.</summary>
public sealed record Llama2cHeader(int Dim, int HiddenDim, int Layers, int Heads, int KvHeads, int VocabSize, int SeqLen)
{
    /// <summary>True when the classifier shares the token embedding (positive vocab_size in the file).</summary>
    public bool SharedClassifier { get; init; } = true;
}

/// <summary>
/// Converts a llama2.c legacy checkpoint (a 7-int32 header, then fp32 arrays) into a Hugging Face Llama directory.
/// llama2.c rotates adjacent pairs (2i, 2i+1) of each head while Hugging Face rotates halves (i, i + d/2), so the rows of
/// wq and wk are permuted within each head — the permutation transformers' own Llama conversion applies to Meta's weights.
/// </summary>
public static class Llama2cImporter
{
    /// <summary>Reads and validates the header against the file size.</summary>
    public static Llama2cHeader ReadHeader(string path)
    {
        InputFiles.RequireRegular(path, reason => new CheckpointFormatException(path, null, reason));
        if (!File.Exists(path)) throw new CheckpointFormatException(path, null, "file not found");
        long fileLength = new FileInfo(path).Length;
        if (fileLength < 28) throw new CheckpointFormatException(path, null, $"too short for a llama2.c header ({fileLength} bytes < 28)");
        Span<byte> head = stackalloc byte[28];
        using (var fs = File.OpenRead(path)) fs.ReadExactly(head);
        int[] v = new int[7];
        for (int i = 0; i < 7; i++) v[i] = BitConverter.ToInt32(head.Slice(i * 4, 4));
        var h = new Llama2cHeader(v[0], v[1], v[2], v[3], v[4], Math.Abs(v[5]), v[6]) { SharedClassifier = v[5] > 0 };
        string[] names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
        for (int i = 0; i < 7; i++)
            if (v[i] == 0 || (i != 5 && v[i] < 0) || Math.Abs((long)v[i]) > 1_000_000)
                throw new CheckpointFormatException(path, null, $"header field {names[i]} = {v[i]} is out of range; is this a llama2.c legacy (version 0) checkpoint?");
        if (h.Dim % h.Heads != 0 || h.Heads % h.KvHeads != 0 || (h.Dim / h.Heads) % 2 != 0)
            throw new CheckpointFormatException(path, null, $"inconsistent header: dim {h.Dim}, n_heads {h.Heads}, n_kv_heads {h.KvHeads}");
        long expected = ExpectedSize(h);
        if (fileLength != expected && !(h.SharedClassifier && fileLength == expected))
            throw new CheckpointFormatException(path, null,
                $"file is {fileLength} bytes but the header implies {expected} (dim {h.Dim}, hidden {h.HiddenDim}, layers {h.Layers}, " +
                $"vocab {h.VocabSize}{(h.SharedClassifier ? ", shared classifier" : ", separate classifier")}); the file is truncated or not a legacy checkpoint");
        return h;
    }

    /// <summary>The Hugging Face config implied by a header.</summary>
    public static LlamaConfig ToConfig(Llama2cHeader h) => new()
    {
        ModelType = "llama", VocabSize = h.VocabSize, HiddenSize = h.Dim, IntermediateSize = h.HiddenDim,
        NumHiddenLayers = h.Layers, NumAttentionHeads = h.Heads, NumKeyValueHeads = h.KvHeads, HeadDim = h.Dim / h.Heads,
        RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = h.SeqLen, TieWordEmbeddings = h.SharedClassifier,
        BosTokenId = 1, EosTokenIds = [2], TorchDtype = "float32",
    };

    private static long ExpectedSize(Llama2cHeader h)
    {
        long dim = h.Dim, hid = h.HiddenDim, L = h.Layers, kv = (long)h.Dim * h.KvHeads / h.Heads, hs = h.Dim / h.Heads;
        long floats = h.VocabSize * dim + L * dim + L * dim * dim + 2 * L * kv * dim + L * dim * dim + L * dim
                      + 3 * L * hid * dim + dim + 2L * h.SeqLen * (hs / 2);
        if (!h.SharedClassifier) floats += h.VocabSize * dim;
        return 28 + 4 * floats;
    }

    /// <summary>Converts <paramref name="path"/> into <paramref name="outDir"/> (config.json + model.safetensors), streaming.</summary>
    public static LlamaConfig Convert(string path, string outDir)
    {
        var h = ReadHeader(path);
        var cfg = ToConfig(h);
        long dim = h.Dim, hid = h.HiddenDim, L = h.Layers, kv = (long)h.Dim * h.KvHeads / h.Heads, hs = h.Dim / h.Heads;

        // Offsets (in floats, after the header) of each array, in file order.
        long off = 0;
        long Next(long count) { long o = off; off += count; return o; }
        long emb = Next(h.VocabSize * dim), rmsAtt = Next(L * dim), wq = Next(L * dim * dim), wk = Next(L * kv * dim),
             wv = Next(L * kv * dim), wo = Next(L * dim * dim), rmsFfn = Next(L * dim), w1 = Next(L * hid * dim),
             w2 = Next(L * dim * hid), w3 = Next(L * hid * dim), rmsFinal = Next(dim);
        Next(2L * h.SeqLen * (hs / 2));   // freq_cis_real/imag (unused)
        long wcls = h.SharedClassifier ? emb : Next(h.VocabSize * dim);

        var sources = new Dictionary<string, (long Offset, long[] Shape, int PermuteHeads)>
        {
            ["model.embed_tokens.weight"] = (emb, [h.VocabSize, dim], 0),
            ["model.norm.weight"] = (rmsFinal, [dim], 0),
        };
        if (!h.SharedClassifier) sources["lm_head.weight"] = (wcls, [h.VocabSize, dim], 0);
        for (int i = 0; i < L; i++)
        {
            string p = $"model.layers.{i}.";
            sources[p + "self_attn.q_proj.weight"] = (wq + i * dim * dim, [dim, dim], h.Heads);
            sources[p + "self_attn.k_proj.weight"] = (wk + i * kv * dim, [kv, dim], h.KvHeads);
            sources[p + "self_attn.v_proj.weight"] = (wv + i * kv * dim, [kv, dim], 0);
            sources[p + "self_attn.o_proj.weight"] = (wo + i * dim * dim, [dim, dim], 0);
            sources[p + "mlp.gate_proj.weight"] = (w1 + i * hid * dim, [hid, dim], 0);
            sources[p + "mlp.up_proj.weight"] = (w3 + i * hid * dim, [hid, dim], 0);
            sources[p + "mlp.down_proj.weight"] = (w2 + i * dim * hid, [dim, hid], 0);
            sources[p + "input_layernorm.weight"] = (rmsAtt + i * dim, [dim], 0);
            sources[p + "post_attention_layernorm.weight"] = (rmsFfn + i * dim, [dim], 0);
        }

        var layout = ModelPresets.Layout(cfg).Select(e => new SafetensorsTensorSpec(e.Name, SafetensorsDType.F32, e.Shape)).ToList();
        using SafeFileHandle file = File.OpenHandle(path);
        Directory.CreateDirectory(outDir);
        cfg.Save(Path.Combine(outDir, "config.json"));
        SafetensorsCheckpoint.WriteDirectory(outDir, layout, spec =>
        {
            var (offset, shape, heads) = sources[spec.Name];
            var t = empty(shape, dtype: ScalarType.Float32);
            ReadFloats(file, 28 + 4 * offset, t);
            if (heads == 0) return t;
            // [heads, d/2, 2, in] (adjacent pairs) -> [heads, 2, d/2, in] (halves)
            using (t)
                return t.view(heads, shape[0] / heads / 2, 2, shape[1]).transpose(1, 2).reshape(shape[0], shape[1]).contiguous();
        }, metadata: new Dictionary<string, string> { ["format"] = "pt", ["source"] = "llama2.c legacy checkpoint" });
        return cfg;
    }

    private static unsafe void ReadFloats(SafeFileHandle file, long byteOffset, Tensor destination)
    {
        long total = destination.NumberOfElements * 4;
        byte* ptr = (byte*)destination.data_ptr();
        long done = 0;
        while (done < total)
        {
            int chunk = (int)Math.Min(total - done, 1 << 26);
            int read = RandomAccess.Read(file, new Span<byte>(ptr + done, chunk), byteOffset + done);
            if (read <= 0) throw new CheckpointFormatException(file.ToString() ?? "llama2.c file", null, "unexpected end of file");
            done += read;
        }
    }
}
