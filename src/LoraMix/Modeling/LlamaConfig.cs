using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraMix.Modeling;

/// <summary>Rotary-embedding frequency scaling (Hugging Face <c>rope_scaling</c>).</summary>
/// <param name="Type"><c>linear</c> or <c>llama3</c>.</param>
/// <param name="Factor">The scaling factor (&gt; 0).</param>
/// <param name="LowFreqFactor">llama3 only.</param>
/// <param name="HighFreqFactor">llama3 only.</param>
/// <param name="OriginalMaxPositionEmbeddings">llama3 only: the pre-training context length.</param>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor = 1, double HighFreqFactor = 4,
    int OriginalMaxPositionEmbeddings = 8192);

/// <summary>
/// The architecture of a Llama-family decoder, read from and written to a Hugging Face <c>config.json</c>
/// (<c>model_type</c> <c>llama</c>, <c>mistral</c> or <c>qwen2</c>). Unsupported features are rejected with
/// <see cref="ModelConfigException"/>, never ignored.
/// </summary>
public sealed record LlamaConfig
{
    /// <summary>The model types LoraMix runs.</summary>
    public static readonly IReadOnlyList<string> SupportedModelTypes = ["llama", "mistral", "qwen2"];

    /// <summary>The rope_scaling types LoraMix implements (besides none / "default").</summary>
    public static readonly IReadOnlyList<string> SupportedRopeScalings = ["linear", "llama3"];

    // Upper bounds on the sizes of a config (see Validate). Each is several times the largest released Llama-family
    // model's (in brackets), so no real config is refused, while a config that would make LoraMix allocate or loop
    // beyond reason (hidden_size 10^9, num_hidden_layers 10^6) is refused before anything is built.

    /// <summary>Largest <c>vocab_size</c>: 4,194,304 = 2^22 (largest released: 262,144).</summary>
    public const int MaxVocabSize = 1 << 22;
    /// <summary>Largest <c>hidden_size</c>: 65,536 (largest released: 16,384, Llama-3.1-405B).</summary>
    public const int MaxHiddenSize = 1 << 16;
    /// <summary>Largest <c>intermediate_size</c>: 262,144 (largest released: 53,248, Llama-3.1-405B).</summary>
    public const int MaxIntermediateSize = 1 << 18;
    /// <summary>Largest <c>num_hidden_layers</c>: 1,024 (largest released: 126, Llama-3.1-405B).</summary>
    public const int MaxHiddenLayers = 1024;
    /// <summary>Largest <c>num_attention_heads</c> (and so <c>num_key_value_heads</c>): 1,024 (largest released: 128).</summary>
    public const int MaxAttentionHeads = 1024;
    /// <summary>Largest <c>head_dim</c>: 1,024 (released: 64 to 256).</summary>
    public const int MaxHeadDim = 1024;
    /// <summary>Largest <c>num_attention_heads × head_dim</c> (the q projection's width): 262,144.</summary>
    public const int MaxAttentionWidth = 1 << 18;
    /// <summary>Largest <c>max_position_embeddings</c>, <c>sliding_window</c> and
    /// <c>rope_scaling.original_max_position_embeddings</c>: 16,777,216 = 2^24 (largest released: 10,485,760).</summary>
    public const int MaxPositions = 1 << 24;

    public string ModelType { get; init; } = "llama";
    public int VocabSize { get; init; }
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int NumHiddenLayers { get; init; }
    public int NumAttentionHeads { get; init; }
    public int NumKeyValueHeads { get; init; }
    /// <summary>Per-head dimension; defaults to hidden_size / num_attention_heads when the config omits it.</summary>
    public int HeadDim { get; init; }
    public double RmsNormEps { get; init; } = 1e-6;
    public double RopeTheta { get; init; } = 10000;
    public RopeScaling? RopeScaling { get; init; }
    public int MaxPositionEmbeddings { get; init; } = 2048;
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Bias on q/k/v/o (Llama <c>attention_bias</c>).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>Bias on q/k/v only (always true for qwen2).</summary>
    public bool QkvBias { get; init; }
    /// <summary>Sliding-window attention span (Mistral), or null for full attention.</summary>
    public int? SlidingWindow { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public int? PadTokenId { get; init; }
    /// <summary>The checkpoint's dtype as written by transformers (<c>float32</c>, <c>bfloat16</c>, <c>float16</c>), if any.</summary>
    public string? TorchDtype { get; init; }
    public double InitializerRange { get; init; } = 0.02;

    /// <summary>Number of weights in the model (embeddings counted once when tied).</summary>
    public long ParameterCount()
    {
        long h = HiddenSize, q = (long)NumAttentionHeads * HeadDim, kv = (long)NumKeyValueHeads * HeadDim;
        long attn = h * q + 2 * h * kv + q * h;
        if (AttentionBias) attn += q + 2 * kv + h;
        else if (QkvBias) attn += q + 2 * kv;
        long mlp = 3 * h * IntermediateSize;
        long layer = attn + mlp + 2 * h;
        long total = NumHiddenLayers * layer + (long)VocabSize * h + h;
        if (!TieWordEmbeddings) total += (long)VocabSize * h;
        return total;
    }

    // Keys that carry no architecture (bookkeeping written by transformers or training tools).
    private static readonly HashSet<string> MetadataKeys = new(StringComparer.Ordinal)
    {
        "architectures", "transformers_version", "use_cache", "_name_or_path", "pretraining_tp", "attention_dropout",
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_return_dict", "is_decoder",
        "is_encoder_decoder", "tokenizer_class", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
        "task_specific_params", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
        "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "bad_words_ids", "begin_suppress_tokens",
        "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "forced_bos_token_id",
        "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
        "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
        "return_dict_in_generate", "suppress_tokens", "temperature", "top_k", "top_p", "typical_p", "cross_attention_hidden_size",
        "exponential_decay_length_penalty", "tf_legacy_loss", "use_bfloat16", "max_window_layers", "initializer_range",
        "torch_dtype", "dtype", "loramix",
    };

    private static readonly HashSet<string> ArchitectureKeys = new(StringComparer.Ordinal)
    {
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "sliding_window", "use_sliding_window",
        "bos_token_id", "eos_token_id", "pad_token_id", "layer_types",
    };

    /// <summary>Reads a Hugging Face <c>config.json</c>: a regular file of at most
    /// <see cref="InputFiles.MaxConfigJsonBytes"/> bytes, a JSON object without duplicate keys.</summary>
    /// <exception cref="ModelConfigException">A key is missing, mistyped, repeated, inconsistent, out of bounds or unsupported.</exception>
    public static LlamaConfig Load(string path)
    {
        InputFiles.RequireRegular(path, reason => new ModelConfigException(path, "(file)", reason));
        if (!File.Exists(path))
            throw new ModelConfigException(path, "config.json", "file not found; a model directory needs a Hugging Face config.json");
        JsonNode? root;
        try
        {
            byte[] bytes = InputFiles.ReadAllBytes(path, InputFiles.MaxConfigJsonBytes, reason => new ModelConfigException(path, "(file)", reason));
            InputFiles.ValidateJson(bytes, new JsonReaderOptions { MaxDepth = InputFiles.MaxJsonDepth },
                key => new ModelConfigException(path, key, "appears twice; a key may be given once (which one counts is ambiguous)"));
            root = JsonNode.Parse(bytes, documentOptions: new JsonDocumentOptions { MaxDepth = InputFiles.MaxJsonDepth });
        }
        catch (JsonException e)
        {
            throw new ModelConfigException(path, "(json)", $"not valid JSON: {e.Message}");
        }
        catch (InvalidOperationException e)
        {
            throw new ModelConfigException(path, "(json)", $"not valid JSON text (invalid UTF-8 or a lone surrogate escape): {e.Message}");
        }
        catch (ArgumentException e)
        {
            throw new ModelConfigException(path, "(json)", $"not valid JSON text (invalid UTF-8 or a lone surrogate escape): {e.Message}");
        }
        if (root is not JsonObject obj)
            throw new ModelConfigException(path, "(root)", "expected a JSON object");
        return Parse(obj, path);
    }

    /// <summary>Parses a config object (see <see cref="Load"/>); <paramref name="source"/> names it in errors.</summary>
    public static LlamaConfig Parse(JsonObject obj, string source)
    {
        var r = new Reader(obj, source);
        string modelType = r.String("model_type") ?? throw new ModelConfigException(source, "model_type",
            $"missing; supported: {string.Join(", ", SupportedModelTypes)}");
        if (!SupportedModelTypes.Contains(modelType))
            throw new ModelConfigException(source, "model_type",
                $"'{modelType}' is not supported; supported: {string.Join(", ", SupportedModelTypes)}");

        foreach (var kv in obj)
        {
            if (!ArchitectureKeys.Contains(kv.Key) && !MetadataKeys.Contains(kv.Key))
                throw new ModelConfigException(source, kv.Key,
                    $"unknown key for a {modelType} model; LoraMix interprets: {string.Join(", ", ArchitectureKeys.Order())} " +
                    "(and ignores transformers' bookkeeping keys such as architectures or transformers_version)");
        }

        string act = r.String("hidden_act") ?? "silu";
        if (act != "silu")
            throw new ModelConfigException(source, "hidden_act", $"'{act}' is not supported; supported: silu");
        if (r.Bool("mlp_bias") == true)
            throw new ModelConfigException(source, "mlp_bias", "true is not supported; supported: false");

        int hidden = r.RequiredInt("hidden_size");
        int heads = r.RequiredInt("num_attention_heads");
        CheckRange(source, "hidden_size", hidden, 1, MaxHiddenSize);
        CheckRange(source, "num_attention_heads", heads, 1, MaxAttentionHeads);
        int kvHeads = r.Int("num_key_value_heads") ?? heads;
        int headDim = r.Int("head_dim") ?? (hidden % heads == 0 ? hidden / heads
            : throw new ModelConfigException(source, "head_dim", $"missing, and hidden_size {hidden} is not divisible by num_attention_heads {heads}"));
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ModelConfigException(source, "num_key_value_heads",
                $"expected a positive divisor of num_attention_heads {heads}, got {kvHeads}");

        RopeScaling? scaling = ParseRopeScaling(obj["rope_scaling"], source);

        int? window = null;
        if (modelType == "qwen2")
        {
            if (r.Bool("use_sliding_window") == true)
                throw new ModelConfigException(source, "use_sliding_window", "true is not supported for qwen2; supported: false");
        }
        else
        {
            window = r.Int("sliding_window");
            if (window is <= 0)
                throw new ModelConfigException(source, "sliding_window", $"{window} must be positive or null");
        }
        if (obj["layer_types"] is JsonArray layerTypes)
        {
            foreach (var t in layerTypes)
                if (!(t is JsonValue tv && tv.TryGetValue(out string? layerType) && layerType == "full_attention"))
                    throw new ModelConfigException(source, "layer_types",
                        $"'{t}' is not supported; supported: full_attention (use_sliding_window false)");
        }

        bool attentionBias = r.Bool("attention_bias") ?? false;
        if (modelType == "qwen2" && attentionBias)
            throw new ModelConfigException(source, "attention_bias", "qwen2 has q/k/v biases only; attention_bias must be absent or false");

        var cfg = new LlamaConfig
        {
            ModelType = modelType,
            VocabSize = r.RequiredInt("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = r.RequiredInt("intermediate_size"),
            NumHiddenLayers = r.RequiredInt("num_hidden_layers"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = r.Double("rms_norm_eps") ?? 1e-6,
            RopeTheta = r.Double("rope_theta") ?? 10000,
            RopeScaling = scaling,
            MaxPositionEmbeddings = r.Int("max_position_embeddings") ?? 2048,
            TieWordEmbeddings = r.Bool("tie_word_embeddings") ?? (modelType == "qwen2" ? false : false),
            AttentionBias = attentionBias,
            QkvBias = modelType == "qwen2",
            SlidingWindow = window,
            BosTokenId = r.Int("bos_token_id"),
            EosTokenIds = r.IntOrList("eos_token_id"),
            PadTokenId = r.Int("pad_token_id"),
            TorchDtype = r.String("torch_dtype") ?? r.String("dtype"),
            InitializerRange = r.Double("initializer_range") ?? 0.02,
        };
        cfg.Validate(source);
        return cfg;
    }

    /// <summary>
    /// Checks sizes and ranges, including the upper bounds (<see cref="MaxVocabSize"/>, <see cref="MaxHiddenSize"/>,
    /// <see cref="MaxIntermediateSize"/>, <see cref="MaxHiddenLayers"/>, <see cref="MaxAttentionHeads"/>,
    /// <see cref="MaxHeadDim"/>, <see cref="MaxAttentionWidth"/>, <see cref="MaxPositions"/>) that keep every size product
    /// within 64-bit arithmetic; throws <see cref="ModelConfigException"/> naming the key, the accepted range and the value.
    /// </summary>
    public void Validate(string source = "config")
    {
        void PositiveFinite(string key, double v)
        {
            if (!(v > 0) || !double.IsFinite(v))
                throw new ModelConfigException(source, key, $"expected a positive finite number, got {v.ToString(CultureInfo.InvariantCulture)}");
        }
        CheckRange(source, "vocab_size", VocabSize, 1, MaxVocabSize);
        CheckRange(source, "hidden_size", HiddenSize, 1, MaxHiddenSize);
        CheckRange(source, "intermediate_size", IntermediateSize, 1, MaxIntermediateSize);
        CheckRange(source, "num_hidden_layers", NumHiddenLayers, 1, MaxHiddenLayers);
        CheckRange(source, "num_attention_heads", NumAttentionHeads, 1, MaxAttentionHeads);
        CheckRange(source, "num_key_value_heads", NumKeyValueHeads, 1, NumAttentionHeads);
        CheckRange(source, "head_dim", HeadDim, 2, MaxHeadDim);
        CheckRange(source, "max_position_embeddings", MaxPositionEmbeddings, 1, MaxPositions);
        if (SlidingWindow is int w) CheckRange(source, "sliding_window", w, 1, MaxPositions);
        PositiveFinite("rms_norm_eps", RmsNormEps);
        PositiveFinite("rope_theta", RopeTheta);
        if (!(InitializerRange >= 0) || !double.IsFinite(InitializerRange))
            throw new ModelConfigException(source, "initializer_range", $"expected a finite number >= 0, got {InitializerRange.ToString(CultureInfo.InvariantCulture)}");
        if (HeadDim % 2 != 0) throw new ModelConfigException(source, "head_dim", $"must be even for rotary embeddings, got {HeadDim}");
        if ((long)NumAttentionHeads * HeadDim > MaxAttentionWidth)
            throw new ModelConfigException(source, "num_attention_heads",
                $"expected num_attention_heads × head_dim <= {MaxAttentionWidth}, got {NumAttentionHeads} × {HeadDim} = {(long)NumAttentionHeads * HeadDim}");
        if (NumAttentionHeads % NumKeyValueHeads != 0)
            throw new ModelConfigException(source, "num_key_value_heads", $"{NumKeyValueHeads} must divide num_attention_heads {NumAttentionHeads}");
        if (!SupportedModelTypes.Contains(ModelType))
            throw new ModelConfigException(source, "model_type", $"'{ModelType}' is not supported; supported: {string.Join(", ", SupportedModelTypes)}");
        if (RopeScaling is { } rs)
        {
            PositiveFinite("rope_scaling.factor", rs.Factor);
            if (rs.Type == "llama3")
            {
                PositiveFinite("rope_scaling.low_freq_factor", rs.LowFreqFactor);
                PositiveFinite("rope_scaling.high_freq_factor", rs.HighFreqFactor);
                CheckRange(source, "rope_scaling.original_max_position_embeddings", rs.OriginalMaxPositionEmbeddings, 1, MaxPositions);
            }
        }
        foreach (int id in EosTokenIds.Concat(BosTokenId is int b ? [b] : []).Concat(PadTokenId is int p ? [p] : []))
            if (id < 0 || id >= VocabSize)
                throw new ModelConfigException(source, "bos/eos/pad_token_id", $"token id {id} is outside the vocabulary [0, {VocabSize})");
    }

    private static void CheckRange(string source, string key, long value, long min, long max)
    {
        if (value < min || value > max)
            throw new ModelConfigException(source, key, value < min
                ? $"expected an integer in [{min}, {max}], got {value}"
                : $"expected an integer in [{min}, {max}], got {value}; LoraMix bounds this size (several times the largest released model's) so that a bad config.json cannot make it allocate without limit");
    }

    /// <summary>
    /// Checks this config against the tensor shapes of a checkpoint header — before any model is built — so a config.json
    /// that does not describe the weights (a vocab_size, hidden_size, intermediate_size, layer count or head count the
    /// tensors do not have) is refused naming the key, the value the checkpoint implies and the value given.
    /// </summary>
    /// <param name="shapes">Tensor name → shape, from the checkpoint's header(s).</param>
    /// <param name="configSource">The config.json path (named in errors).</param>
    /// <param name="checkpointSource">The checkpoint file or index (named in errors).</param>
    /// <exception cref="ModelConfigException">A size disagrees with the checkpoint.</exception>
    public void CheckCheckpointShapes(IReadOnlyDictionary<string, long[]> shapes, string configSource, string checkpointSource)
    {
        ArgumentNullException.ThrowIfNull(shapes);
        string Fmt(long[] shape) => $"[{string.Join(", ", shape)}]";
        void Expect(string key, long fromCheckpoint, long given, string evidence)
        {
            if (fromCheckpoint != given)
                throw new ModelConfigException(configSource, key,
                    $"expected {fromCheckpoint} ({evidence} in {checkpointSource}), got {given}; this config.json does not describe " +
                    "these weights: use the config.json saved with them");
        }
        bool Matrix(string name, out long rows, out long cols)
        {
            rows = cols = 0;
            if (!shapes.TryGetValue(name, out var shape) || shape.Length != 2) return false;
            rows = shape[0];
            cols = shape[1];
            return true;
        }

        if (shapes.TryGetValue("model.embed_tokens.weight", out var emb))
        {
            if (emb.Length != 2)
                throw new ModelConfigException(configSource, "vocab_size",
                    $"expected model.embed_tokens.weight in {checkpointSource} to be [vocab_size, hidden_size], got {Fmt(emb)}");
            Expect("vocab_size", emb[0], VocabSize, $"model.embed_tokens.weight is {Fmt(emb)}");
            Expect("hidden_size", emb[1], HiddenSize, $"model.embed_tokens.weight is {Fmt(emb)}");
        }

        int layers = 0;
        foreach (var name in shapes.Keys)
        {
            if (!name.StartsWith("model.layers.", StringComparison.Ordinal)) continue;
            int dot = name.IndexOf('.', "model.layers.".Length);
            if (dot < 0) continue;
            var digits = name.AsSpan("model.layers.".Length, dot - "model.layers.".Length);
            if (digits.Length is 0 or > 9 || (digits.Length > 1 && digits[0] == '0')) continue;
            if (!int.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out int index)) continue;
            layers = Math.Max(layers, index + 1);
        }
        Expect("num_hidden_layers", layers, NumHiddenLayers,
            layers == 0 ? "the checkpoint has no model.layers.N tensors" : $"the highest layer tensor is model.layers.{layers - 1}.*");

        const string l0 = "model.layers.0.";
        if (Matrix(l0 + "mlp.gate_proj.weight", out long inter, out long h1))
        {
            Expect("intermediate_size", inter, IntermediateSize, $"{l0}mlp.gate_proj.weight is [{inter}, {h1}]");
            Expect("hidden_size", h1, HiddenSize, $"{l0}mlp.gate_proj.weight is [{inter}, {h1}]");
        }
        if (Matrix(l0 + "self_attn.q_proj.weight", out long qRows, out long h2))
        {
            Expect("hidden_size", h2, HiddenSize, $"{l0}self_attn.q_proj.weight is [{qRows}, {h2}]");
            if (qRows != (long)NumAttentionHeads * HeadDim)
                throw new ModelConfigException(configSource, "num_attention_heads",
                    $"expected num_attention_heads × head_dim = {qRows} ({l0}self_attn.q_proj.weight is [{qRows}, {h2}] in {checkpointSource}), " +
                    $"got {NumAttentionHeads} × {HeadDim} = {(long)NumAttentionHeads * HeadDim}; use the config.json saved with these weights");
        }
        if (Matrix(l0 + "self_attn.k_proj.weight", out long kRows, out long h3))
        {
            if (kRows != (long)NumKeyValueHeads * HeadDim)
                throw new ModelConfigException(configSource, "num_key_value_heads",
                    $"expected num_key_value_heads × head_dim = {kRows} ({l0}self_attn.k_proj.weight is [{kRows}, {h3}] in {checkpointSource}), " +
                    $"got {NumKeyValueHeads} × {HeadDim} = {(long)NumKeyValueHeads * HeadDim}; use the config.json saved with these weights");
        }
        if (!TieWordEmbeddings && Matrix("lm_head.weight", out long vRows, out _))
            Expect("vocab_size", vRows, VocabSize, $"lm_head.weight has {vRows} rows");
    }

    private static RopeScaling? ParseRopeScaling(JsonNode? node, string source)
    {
        if (node is null) return null;
        if (node is not JsonObject o) throw new ModelConfigException(source, "rope_scaling", "expected an object or null");
        var r = new Reader(o, source, "rope_scaling.");
        string type = r.String("rope_type") ?? r.String("type")
            ?? throw new ModelConfigException(source, "rope_scaling.rope_type", "missing");
        if (type == "default") return null;
        if (!SupportedRopeScalings.Contains(type))
            throw new ModelConfigException(source, "rope_scaling.rope_type",
                $"'{type}' is not supported; supported: default, {string.Join(", ", SupportedRopeScalings)}");
        double factor = r.Double("factor") ?? throw new ModelConfigException(source, "rope_scaling.factor", "missing");
        if (!(factor > 0)) throw new ModelConfigException(source, "rope_scaling.factor", $"must be positive, got {factor}");
        if (type == "linear") return new RopeScaling("linear", factor);
        var s = new RopeScaling("llama3", factor,
            r.Double("low_freq_factor") ?? throw new ModelConfigException(source, "rope_scaling.low_freq_factor", "missing (required for llama3)"),
            r.Double("high_freq_factor") ?? throw new ModelConfigException(source, "rope_scaling.high_freq_factor", "missing (required for llama3)"),
            r.Int("original_max_position_embeddings") ?? throw new ModelConfigException(source, "rope_scaling.original_max_position_embeddings", "missing (required for llama3)"));
        if (!(s.HighFreqFactor > s.LowFreqFactor))
            throw new ModelConfigException(source, "rope_scaling.high_freq_factor", $"must exceed low_freq_factor ({s.HighFreqFactor} <= {s.LowFreqFactor})");
        return s;
    }

    /// <summary>Writes this config as a Hugging Face <c>config.json</c> object.</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["architectures"] = new JsonArray(ModelType switch
            {
                "mistral" => "MistralForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                _ => "LlamaForCausalLM",
            }),
            ["model_type"] = ModelType,
            ["vocab_size"] = VocabSize,
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = NumHiddenLayers,
            ["num_attention_heads"] = NumAttentionHeads,
            ["num_key_value_heads"] = NumKeyValueHeads,
            ["head_dim"] = HeadDim,
            ["hidden_act"] = "silu",
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["initializer_range"] = InitializerRange,
        };
        if (ModelType == "llama")
        {
            o["attention_bias"] = AttentionBias;
            o["mlp_bias"] = false;
        }
        if (ModelType == "mistral") o["sliding_window"] = SlidingWindow is int w ? w : null;
        if (ModelType == "qwen2") o["use_sliding_window"] = false;
        if (RopeScaling is { } s)
        {
            var so = new JsonObject { ["rope_type"] = s.Type, ["factor"] = s.Factor };
            if (s.Type == "llama3")
            {
                so["low_freq_factor"] = s.LowFreqFactor;
                so["high_freq_factor"] = s.HighFreqFactor;
                so["original_max_position_embeddings"] = s.OriginalMaxPositionEmbeddings;
            }
            o["rope_scaling"] = so;
        }
        else o["rope_scaling"] = null;
        if (BosTokenId is int bos) o["bos_token_id"] = bos;
        if (EosTokenIds.Count == 1) o["eos_token_id"] = EosTokenIds[0];
        else if (EosTokenIds.Count > 1) o["eos_token_id"] = new JsonArray(EosTokenIds.Select(i => (JsonNode)i).ToArray());
        if (PadTokenId is int pad) o["pad_token_id"] = pad;
        o["torch_dtype"] = TorchDtype ?? "float32";
        o["transformers_version"] = "4.46.0";
        return o;
    }

    /// <summary>Writes <c>config.json</c> atomically.</summary>
    public void Save(string path) =>
        AtomicFile.WriteAllText(path, ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");

    private readonly struct Reader(JsonObject obj, string source, string prefix = "")
    {
        private JsonNode? Get(string key) => obj.TryGetPropertyValue(key, out var n) ? n : null;

        private ModelConfigException Wrong(string key, string expected, JsonNode? n) =>
            new(source, prefix + key, $"expected {expected}, got {(n is null ? "null" : n.ToJsonString())}");

        public string? String(string key)
        {
            var n = Get(key);
            if (n is null) return null;
            return n is JsonValue v && v.TryGetValue(out string? s) ? s : throw Wrong(key, "a string", n);
        }

        public bool? Bool(string key)
        {
            var n = Get(key);
            if (n is null) return null;
            return n is JsonValue v && v.TryGetValue(out bool b) ? b : throw Wrong(key, "true or false", n);
        }

        public double? Double(string key)
        {
            var n = Get(key);
            if (n is null) return null;
            return AsNumber(n) ?? throw Wrong(key, "a number", n);
        }

        public int? Int(string key)
        {
            var n = Get(key);
            if (n is null) return null;
            if (AsNumber(n) is double d && d == Math.Floor(d) && d >= int.MinValue && d <= int.MaxValue)
                return (int)d;
            throw Wrong(key, "an integer", n);
        }

        // Numbers parsed from text and numbers built in code (JsonValue<int>) alike.
        private static double? AsNumber(JsonNode n) =>
            n is JsonValue && n.GetValueKind() == JsonValueKind.Number
                ? double.Parse(n.ToJsonString(), NumberStyles.Float, CultureInfo.InvariantCulture)
                : null;

        public int RequiredInt(string key) =>
            Int(key) ?? throw new ModelConfigException(source, prefix + key, "missing (required)");

        public IReadOnlyList<int> IntOrList(string key)
        {
            var n = Get(key);
            if (n is null) return [];
            if (n is JsonArray a)
            {
                var list = new List<int>();
                foreach (var e in a)
                {
                    if (e is not null && AsNumber(e) is double d && d == Math.Floor(d) && d >= 0 && d <= int.MaxValue) list.Add((int)d);
                    else throw Wrong(key, "an integer or a list of integers", n);
                }
                return list;
            }
            return [Int(key)!.Value];
        }
    }
}
