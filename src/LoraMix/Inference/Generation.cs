using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Inference;

/// <summary>Sampling and stopping settings. <see cref="Temperature"/> 0 means greedy decoding.</summary>
public sealed record GenerationOptions
{
    /// <summary>The default <see cref="MaxKvCacheBytes"/>: 8 GiB.</summary>
    public const long DefaultMaxKvCacheBytes = 8L << 30;

    /// <summary>Maximum number of tokens to generate per prompt (stop tokens not counted in the output). Clamped to the
    /// model's context: a prompt of P tokens gets at most <c>max_position_embeddings - P</c> new tokens, so prompt plus
    /// output never exceed the context, and a sequence cut there ends with <see cref="FinishReason.Length"/> (as
    /// transformers' <c>max_length</c>). The KV cache is sized by the clamped budget, never by the raw request.</summary>
    public int MaxNewTokens { get; init; } = 128;
    /// <summary>Softmax temperature; 0 selects the arg-max token (greedy).</summary>
    public double Temperature { get; init; } = 1.0;
    /// <summary>Keep only the K most likely tokens (0 = off).</summary>
    public int TopK { get; init; }
    /// <summary>Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off).</summary>
    public double TopP { get; init; } = 1.0;
    /// <summary>Hugging Face-style repetition penalty over prompt and generated tokens (1 = off).</summary>
    public double RepetitionPenalty { get; init; } = 1.0;
    /// <summary>Random seed; the same seed gives the same output. Null draws one.</summary>
    public long? Seed { get; init; }
    /// <summary>Extra token ids that end a sequence (not emitted).</summary>
    public IReadOnlyCollection<int> StopTokenIds { get; init; } = [];
    /// <summary>Stop at the model's EOS ids (config <c>eos_token_id</c>).</summary>
    public bool StopAtEos { get; init; } = true;
    /// <summary>The most memory a generation's KV cache may take (default <see cref="DefaultMaxKvCacheBytes"/>). The size
    /// is estimated before anything is allocated (<see cref="TokenGenerator.KvCacheBytes"/>) and a larger cache is
    /// refused with a <see cref="KvCacheLimitException"/>.</summary>
    public long MaxKvCacheBytes { get; init; } = DefaultMaxKvCacheBytes;

    /// <summary>The adapters the rows run (one choice for every prompt, or one per prompt); null: the base model (an
    /// engine substitutes its default). Travels with every forward call of the generation.</summary>
    public AdapterSelection? Adapters { get; init; }

    /// <summary>X-LoRA's non-granular scalings (mistral.rs's <c>tgt_non_granular_index</c>): after this many decode steps a
    /// row's scalings are frozen and its scaling pass is skipped; kept per sequence, so it works in batches. Null: every token
    /// gets its own scalings.</summary>
    public int? XLoraNonGranular { get; init; }

    /// <summary>Throws <see cref="ArgumentException"/> for out-of-range settings.</summary>
    public void Validate()
    {
        if (MaxNewTokens < 0) throw new ArgumentException($"max new tokens must be >= 0, got {MaxNewTokens}");
        if (!(Temperature >= 0) || double.IsInfinity(Temperature)) throw new ArgumentException($"temperature must be >= 0 and finite, got {Temperature}");
        if (TopK < 0) throw new ArgumentException($"top-k must be >= 0, got {TopK}");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"top-p must be in (0, 1], got {TopP}");
        if (!(RepetitionPenalty > 0) || double.IsInfinity(RepetitionPenalty)) throw new ArgumentException($"repetition penalty must be > 0, got {RepetitionPenalty}");
        if (XLoraNonGranular is < 1) throw new ArgumentException($"the X-LoRA non-granular index counts decode steps and must be >= 1, got {XLoraNonGranular}");
        if (MaxKvCacheBytes <= 0) throw new ArgumentException($"the KV cache limit must be > 0 bytes, got {MaxKvCacheBytes}");
    }
}

/// <summary>Why a sequence ended.</summary>
public enum FinishReason
{
    /// <summary>The token budget ran out: <see cref="GenerationOptions.MaxNewTokens"/>, or the model's context.</summary>
    Length,
    /// <summary>A stop or EOS token was sampled.</summary>
    Stop,
}

/// <summary>The generated tokens of one prompt.</summary>
public sealed record GeneratedSequence(IReadOnlyList<int> Tokens, FinishReason FinishReason, int? StopTokenId);

/// <summary>
/// Autoregressive generation over a <see cref="LlamaForCausalLM"/>: batched prompts of different lengths (left
/// padding), one prefill then one cached step per token, sampling on the model's device, host-side stop checks.
/// </summary>
public sealed class TokenGenerator
{
    private readonly LlamaForCausalLM _model;

    public TokenGenerator(LlamaForCausalLM model) => _model = model;

    /// <summary>Generates for one prompt.</summary>
    public GeneratedSequence Generate(IReadOnlyList<int> prompt, GenerationOptions options, Action<int>? onToken = null,
        CancellationToken cancellationToken = default) =>
        Generate([prompt], options, onToken is null ? null : (_, t) => onToken(t), cancellationToken)[0];

    /// <summary>
    /// Generates for a batch of prompts. <paramref name="onToken"/> receives (prompt index, token) as each token is
    /// accepted (streaming). Output tokens exclude the prompt and the stop token.
    /// </summary>
    public IReadOnlyList<GeneratedSequence> Generate(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options,
        Action<int, int>? onToken = null, CancellationToken cancellationToken = default) =>
        Generate(prompts, options, null, null, onToken, cancellationToken);

    /// <summary>
    /// Generates for one rendered chat (<see cref="RenderedChat.Ids"/>, with its <see cref="RenderedChat.Privileges"/>)
    /// through <paramref name="routing"/> (see the batched overload).
    /// </summary>
    public GeneratedSequence Generate(RenderedChat chat, GenerationOptions options, RoutingContext routing, Action<int>? onToken = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(chat);
        return Generate([chat.Ids], options, routing, [chat.Privileges], onToken is null ? null : (_, t) => onToken(t), cancellationToken)[0];
    }

    /// <summary>
    /// Generates for a batch of prompts through a routing context: every forward call (the prefill and each decoding
    /// step) passes <paramref name="routing"/>, so its policy routes, its trace records every step and its collector holds
    /// the latest step. <paramref name="privileges"/> labels each prompt's tokens (one label per token, e.g.
    /// <see cref="RenderedChat.Privileges"/>; required by the privileged policy); generated tokens are labelled
    /// <see cref="Privilege.Assistant"/> — under the privileged policy they are frozen when an untrusted token preceded
    /// them. The routing state starts fresh (a new cache); on return <see cref="RoutingContext.PrivilegeLabels"/> holds
    /// the last step's labels and <see cref="RoutingContext.PolicyState"/> the final state.
    /// </summary>
    /// <remarks>The trace holds, per row, the prompt tokens then each generated token as it was fed back; the last
    /// sampled token is never run through the model (nothing follows it), and a row that finished while others go on is
    /// fed as padding (not traced, its position does not advance): its trace ends with its last fed-back token.</remarks>
    /// <exception cref="ContextLengthException">A prompt has <c>max_position_embeddings</c> tokens or more (checked before
    /// any forward pass). Longer requests are clamped instead: see <see cref="GenerationOptions.MaxNewTokens"/>.</exception>
    /// <exception cref="KvCacheLimitException">The KV cache would exceed <see cref="GenerationOptions.MaxKvCacheBytes"/>
    /// (checked before it is allocated).</exception>
    /// <exception cref="NonFiniteLogitsException">The model's logits for a running row hold NaN or infinity (checked every
    /// step, with the copy of the sampled ids to the host).</exception>
    public IReadOnlyList<GeneratedSequence> Generate(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options,
        RoutingContext? routing, IReadOnlyList<IReadOnlyList<Privilege>>? privileges, Action<int, int>? onToken = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        options.Validate();
        _model.CheckAdapters(options.Adapters, prompts.Count);
        if (prompts.Count == 0) return [];
        if (privileges is not null)
        {
            if (routing is null) throw new ArgumentException("privilege labels need a routing context to travel in", nameof(privileges));
            if (privileges.Count != prompts.Count)
                throw new ArgumentException($"{privileges.Count} privilege label rows for {prompts.Count} prompts", nameof(privileges));
            for (int i = 0; i < prompts.Count; i++)
                if (privileges[i].Count != prompts[i].Count)
                    throw new ArgumentException($"prompt {i} has {prompts[i].Count} tokens but {privileges[i].Count} privilege labels", nameof(privileges));
        }
        var config = _model.Config;
        int vocab = config.VocabSize;
        for (int i = 0; i < prompts.Count; i++)
        {
            if (prompts[i].Count == 0) throw new ArgumentException($"prompt {i} is empty; give at least one token (e.g. BOS)");
            CheckPromptFits(config, prompts[i].Count, prompts.Count == 1 ? null : i);
            foreach (int id in prompts[i])
                if (id < 0 || id >= vocab) throw new ArgumentException($"prompt {i} has token id {id} outside the vocabulary [0, {vocab})");
        }

        var stop = new HashSet<int>(options.StopTokenIds);
        if (options.StopAtEos) stop.UnionWith(config.EosTokenIds);
        int batch = prompts.Count;
        int maxPrompt = prompts.Max(p => p.Count);
        var outputs = new List<int>[batch];
        var finish = new FinishReason[batch];
        var stopIds = new int?[batch];
        // Each row's budget is clamped to its own room in the context, so a row's output does not depend on its batch.
        var budget = new int[batch];
        for (int i = 0; i < batch; i++)
        {
            outputs[i] = [];
            finish[i] = FinishReason.Length;
            budget[i] = NewTokenBudget(config, prompts[i].Count, options.MaxNewTokens);
        }
        int steps = budget.Max();
        if (steps == 0) return Results();

        // The cache is sized by the clamped budget; a split privileged prefill may grow it by up to the prompt length.
        long capacity = (long)maxPrompt + steps;
        // X-LoRA rows keep a second cache for their scaling pass (the dual cache): count it
        bool dual = options.Adapters?.Names.Any(n => _model.ScalingAdapter(n) is not null) == true;
        CheckKvCache(config, dual ? 2 * batch : batch, privileges is null ? capacity : capacity + maxPrompt, _model.DType, options.MaxKvCacheBytes);

        var device = _model.Device;
        using var outer = NewDisposeScope();
        using var noGrad = no_grad();
        using var cache = _model.CreateCache(batch, capacity);
        if (options.XLoraNonGranular is int k) cache.SetNonGranular(k);
        using var rng = new TorchSharp.torch.Generator((ulong)(options.Seed ?? Random.Shared.NextInt64()), device);

        // Left-pad the prompts.
        var ids = new long[batch * maxPrompt];
        var mask = new long[batch * maxPrompt];
        bool padded = false;
        for (int i = 0; i < batch; i++)
        {
            int pad = maxPrompt - prompts[i].Count;
            padded |= pad > 0;
            for (int j = 0; j < prompts[i].Count; j++)
            {
                ids[i * maxPrompt + pad + j] = prompts[i][j];
                mask[i * maxPrompt + pad + j] = 1;
            }
        }
        Tensor? seen = null;
        if (options.RepetitionPenalty != 1.0)
        {
            seen = zeros(batch, vocab, dtype: ScalarType.Bool, device: device);
            for (int i = 0; i < batch; i++)
                seen[i].index_fill_(0, tensor(prompts[i].Select(x => (long)x).ToArray(), device: device), true);
        }

        var input = tensor(ids, [batch, maxPrompt], device: device);
        Tensor? attn = padded ? tensor(mask, [batch, maxPrompt], device: device) : null;
        bool[] done = new bool[batch];
        if (privileges is not null) routing!.SetPrivileges(privileges, maxPrompt);
        for (int step = 0; step < steps; step++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            long[] host;   // [B] sampled ids, then [B] finiteness flags: one device-to-host copy per step
            using (var stepScope = NewDisposeScope())
            {
                if (step > 0 && privileges is not null) routing!.SetPrivileges(Privilege.Assistant, batch);
                var logits = _model.Forward(input, cache, attn, lastOnly: true, routing: routing, adapters: options.Adapters).squeeze(1).to(ScalarType.Float32);
                var finite = logits.isfinite().all(1);
                // A non-finite row is refused below, on the host; zeroed here so that the draw itself cannot fail first.
                if (options.Temperature > 0) logits = logits.nan_to_num(0, 0, 0);
                var chosen = Sample(logits, options, seen, rng);
                if (seen is not null) seen.scatter_(1, chosen.unsqueeze(1), ones(batch, 1, dtype: ScalarType.Bool, device: device));
                host = cat([chosen, finite.to(ScalarType.Int64)]).cpu().data<long>().ToArray();
                input.Dispose();
                input = chosen.unsqueeze(1).MoveToOuterDisposeScope();
            }
            attn?.Dispose();
            attn = null;
            for (int i = 0; i < batch; i++)
                if (!done[i] && host[batch + i] == 0) throw NonFinite(step, i, batch);
            for (int i = 0; i < batch; i++)
            {
                if (done[i]) continue;
                int tok = (int)host[i];
                if (stop.Contains(tok))
                {
                    done[i] = true;
                    finish[i] = FinishReason.Stop;
                    stopIds[i] = tok;
                    continue;
                }
                outputs[i].Add(tok);
                onToken?.Invoke(i, tok);
                if (outputs[i].Count == budget[i]) done[i] = true;   // finish stays Length
            }
            if (done.All(d => d)) break;
            // A finished row is fed as padding from now on: its position does not advance past its own context budget,
            // and nothing of it is traced or routed as a real token.
            if (done.Any(d => d)) attn = tensor(done.Select(d => d ? 0L : 1L).ToArray(), [batch, 1], device: device);
        }
        return Results();

        IReadOnlyList<GeneratedSequence> Results() =>
            Enumerable.Range(0, batch).Select(i => new GeneratedSequence(outputs[i], finish[i], stopIds[i])).ToList();
    }

    /// <summary>
    /// How many new tokens a prompt of <paramref name="promptTokens"/> tokens may get: <paramref name="maxNewTokens"/>,
    /// clamped so that prompt and output together fit the model's context (<c>max_position_embeddings</c>).
    /// </summary>
    public static int NewTokenBudget(LlamaConfig config, int promptTokens, int maxNewTokens)
    {
        ArgumentNullException.ThrowIfNull(config);
        return Math.Max(0, Math.Min(maxNewTokens, config.MaxPositionEmbeddings - promptTokens));
    }

    /// <summary>
    /// Throws a <see cref="ContextLengthException"/> when a prompt leaves no room in the model's context for a new token
    /// (it has <c>max_position_embeddings</c> tokens or more). <paramref name="row"/> names the prompt of a batch.
    /// </summary>
    public static void CheckPromptFits(LlamaConfig config, int promptTokens, int? row = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        int context = config.MaxPositionEmbeddings;
        if (promptTokens < context) return;
        string which = row is null ? "the prompt" : $"prompt {row}";
        throw new ContextLengthException(promptTokens, context,
            $"{which} has {promptTokens} tokens, but the model's context is {context} tokens (max_position_embeddings in its " +
            $"config.json), which leaves no room to generate: shorten the prompt to at most {context - 1} tokens " +
            "(drop earlier turns or text), or use a model with a longer context");
    }

    /// <summary>
    /// The size of a KV cache in bytes: layers x 2 (keys and values) x batch x KV heads x head dim x capacity x the size
    /// of <paramref name="dtype"/>; <see cref="long.MaxValue"/> when that does not fit in 64 bits.
    /// </summary>
    public static long KvCacheBytes(LlamaConfig config, long batchSize, long capacity, ScalarType dtype)
    {
        ArgumentNullException.ThrowIfNull(config);
        long element = Checkpoints.SafetensorsDTypes.ElementSize(Checkpoints.SafetensorsDTypes.FromScalarType(dtype));
        try
        {
            return checked((long)config.NumHiddenLayers * 2 * batchSize * config.NumKeyValueHeads * config.HeadDim * capacity * element);
        }
        catch (OverflowException)
        {
            return long.MaxValue;
        }
    }

    /// <summary>Throws a <see cref="KvCacheLimitException"/> when a cache of <paramref name="capacity"/> positions for
    /// <paramref name="batchSize"/> rows would exceed <paramref name="limitBytes"/>.</summary>
    public static void CheckKvCache(LlamaConfig config, long batchSize, long capacity, ScalarType dtype, long limitBytes)
    {
        long bytes = KvCacheBytes(config, batchSize, capacity, dtype);
        if (bytes <= limitBytes) return;
        long element = Checkpoints.SafetensorsDTypes.ElementSize(Checkpoints.SafetensorsDTypes.FromScalarType(dtype));
        throw new KvCacheLimitException(bytes, limitBytes,
            $"the KV cache of this generation would need {FormatBytes(bytes)} ({config.NumHiddenLayers} layers x 2 x batch {batchSize} x " +
            $"{config.NumKeyValueHeads} KV heads x head dim {config.HeadDim} x {capacity} positions x {element} bytes), over the limit of " +
            $"{FormatBytes(limitBytes)}: lower max new tokens (the cache holds the prompt and the new tokens) or the batch size, or raise " +
            "the limit (GenerationOptions.MaxKvCacheBytes; loramix --max-kv-cache-gib)");
    }

    /// <summary>A byte count for messages: "512 B", "3.5 MiB", "8.0 GiB".</summary>
    internal static string FormatBytes(long bytes) => bytes switch
    {
        < 1L << 10 => $"{bytes} B",
        < 1L << 20 => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{bytes / 1024.0:0.0} KiB"),
        < 1L << 30 => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{bytes / (1024.0 * 1024):0.0} MiB"),
        _ => string.Create(System.Globalization.CultureInfo.InvariantCulture, $"{bytes / (1024.0 * 1024 * 1024):0.0} GiB"),
    };

    private NonFiniteLogitsException NonFinite(int step, int row, int batch)
    {
        string where = step == 0 ? "on the prompt (prefill)" : $"at new token {step + 1}";
        string which = batch == 1 ? "" : $" for prompt {row}";
        return new NonFiniteLogitsException(step, row,
            $"the model produced non-finite logits (NaN or infinity) {where}{which}, computing in {_model.DType}: check the model " +
            "and adapter weights for NaN/inf values (a corrupted file or a diverged fine-tune), and the dtype (float16 overflows " +
            "past 65504: run in bf16 or f32)");
    }

    /// <summary>
    /// Picks the next token of each row from fp32 logits [B, V]: repetition penalty, temperature, top-k, top-p,
    /// then a draw from the softmax (or arg-max when the temperature is 0, or so small that 1/T overflows fp32).
    /// </summary>
    public static Tensor Sample(Tensor logits, GenerationOptions o, Tensor? seen, TorchSharp.torch.Generator? rng)
    {
        using var scope = NewDisposeScope();
        var scores = logits;
        if (seen is not null && o.RepetitionPenalty != 1.0)
        {
            var penalised = where(scores < 0, scores * o.RepetitionPenalty, scores / o.RepetitionPenalty);
            scores = where(seen, penalised, scores);
        }
        // Below 1/float.MaxValue the scaled scores overflow fp32: such a temperature is the greedy limit.
        if (o.Temperature < 1 / (double)float.MaxValue) return scores.argmax(-1).MoveToOuterDisposeScope();
        // Shifted so the largest score is 0: a tiny temperature then gives -inf (probability 0), never inf/inf = NaN.
        scores = (scores - scores.max(-1, keepdim: true).values) / o.Temperature;
        if (o.TopK > 0 && o.TopK < scores.shape[^1])
        {
            var kth = scores.topk(o.TopK, -1).values.narrow(-1, o.TopK - 1, 1);
            scores = scores.masked_fill(scores < kth, double.NegativeInfinity);
        }
        if (o.TopP < 1.0)
        {
            var (sorted, order) = scores.sort(-1, descending: true);
            var probs = sorted.softmax(-1);
            var before = probs.cumsum(-1) - probs;     // mass strictly before each token
            var drop = before >= o.TopP;               // as transformers: keep the smallest prefix reaching top_p
            var dropUnsorted = zeros_like(drop).scatter(-1, order, drop);
            scores = scores.masked_fill(dropUnsorted, double.NegativeInfinity);
        }
        var p = scores.softmax(-1);
        return multinomial(p, 1, false, rng).squeeze(-1).MoveToOuterDisposeScope();
    }
}
