using LoraMix.Checkpoints;
using LoraMix.Routing;
using LoraMix.Torch;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// A Llama-family causal language model whose state-dict keys equal Hugging Face's
/// (<c>model.embed_tokens.weight</c>, <c>model.layers.0.self_attn.q_proj.weight</c>, ..., <c>lm_head.weight</c>).
/// With tied embeddings there is no <c>lm_head</c>: the embedding matrix is used directly.
/// </summary>
public sealed partial class LlamaForCausalLM : nn.Module
{
    [ComponentName(Name = "model")] private readonly LlamaModel _model;
    [ComponentName(Name = "lm_head")] private readonly LinearLayer? _lmHead;
    [ComponentName(Name = "scaling_heads")] private readonly NamedModules<nn.Module> _scalingHeads = new();
    private readonly RotaryEmbedding _rotary;

    /// <summary>Builds the model with uninitialised weights (norms are ones); load or initialise them next.</summary>
    public LlamaForCausalLM(LlamaConfig config, Device? device = null, ScalarType dtype = ScalarType.Float32)
        : base(nameof(LlamaForCausalLM))
    {
        TorchRuntime.EnsureLoaded();
        config.Validate();
        Config = config;
        Device = device ?? CPU;
        DType = dtype;
        _model = new LlamaModel(config, Device, dtype);
        if (!config.TieWordEmbeddings) _lmHead = new LinearLayer(config.HiddenSize, config.VocabSize, false, Device, dtype);
        _rotary = new RotaryEmbedding(config, Device);
        RegisterComponents();
    }

    public LlamaConfig Config { get; }
    public Device Device { get; }
    public ScalarType DType { get; }
    public LlamaModel Model => _model;

    /// <summary>The output projection weight [vocab, hidden] (the embedding matrix when tied).</summary>
    public Tensor OutputWeight => _lmHead?.Weight ?? _model.EmbedTokens.Weight;

    /// <summary>Creates a KV cache sized for this model.</summary>
    public KvCache CreateCache(long batchSize, long capacity) => new(Config, batchSize, capacity, Device, DType);

    /// <summary>
    /// Runs the decoder and returns logits [B, T, vocab] (or [B, 1, vocab] with <paramref name="lastOnly"/>) in the compute dtype.
    /// </summary>
    /// <param name="inputIds">Token ids [B, T] (int64).</param>
    /// <param name="cache">A cache to append to (incremental decoding), or null for a self-contained forward.</param>
    /// <param name="attentionMask">[B, T], 1 for real tokens and 0 for (left) padding; null when nothing is padded.</param>
    /// <param name="lastOnly">Project only the last position to the vocabulary (generation).</param>
    /// <param name="routing">The routing context for mixture-of-experts blocks (policy, collector, trace), or null.</param>
    /// <param name="adapters">The adapters each row runs (one choice for all rows, or one per row), or null for the base
    /// model. Nothing about adapters is kept on the model between calls.</param>
    public Tensor Forward(Tensor inputIds, KvCache? cache = null, Tensor? attentionMask = null, bool lastOnly = false,
        RoutingContext? routing = null, AdapterSelection? adapters = null)
    {
        using var scope = NewDisposeScope();
        var hidden = ForwardHidden(inputIds, cache, attentionMask, routing, adapters);
        if (lastOnly) hidden = hidden.narrow(1, hidden.shape[1] - 1, 1);
        return nn.functional.linear(hidden, OutputWeight).MoveToOuterDisposeScope();
    }

    /// <summary>Runs embeddings, every layer and the final norm; returns hidden states [B, T, hidden].</summary>
    public Tensor ForwardHidden(Tensor inputIds, KvCache? cache = null, Tensor? attentionMask = null, RoutingContext? routing = null,
        AdapterSelection? adapters = null)
    {
        if (inputIds.dim() != 2)
            throw new ArgumentException($"input ids must be [batch, seq], got [{string.Join(", ", inputIds.shape)}]", nameof(inputIds));
        if (inputIds.shape[1] == 0) throw new ArgumentException("input ids must contain at least one position", nameof(inputIds));
        using var scope = NewDisposeScope();
        var embeddings = _model.EmbedTokens.call(inputIds.to(ScalarType.Int64, Device));
        return ForwardEmbeddings(embeddings, cache, attentionMask, routing, adapters).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Runs every layer and the final norm on given input embeddings [B, T, hidden] (Hugging Face's <c>inputs_embeds</c>,
    /// e.g. one-hot rows times the embedding matrix for gradients with respect to the tokens); returns hidden states.
    /// </summary>
    /// <remarks>Under the privileged router policy, in inference (no gradient), a row whose routing freezes in this call
    /// after privileged tokens of the same call has those privileged tokens run first on their own — a batch-1, unpadded
    /// pass over the row's own cached history — and only then the rest of the batch (<see cref="PrivilegedPrefill"/>): the
    /// routing snapshot, and every decision and key/value of the privileged prefix, are then bit-for-bit independent of the
    /// untrusted text that follows and of the other rows of the batch.</remarks>
    public Tensor ForwardEmbeddings(Tensor inputEmbeddings, KvCache? cache = null, Tensor? attentionMask = null, RoutingContext? routing = null,
        AdapterSelection? adapters = null)
    {
        if (inputEmbeddings.dim() != 3 || inputEmbeddings.shape[2] != Config.HiddenSize)
            throw new ArgumentException($"input embeddings must be [batch, seq, {Config.HiddenSize}], got [{string.Join(", ", inputEmbeddings.shape)}]", nameof(inputEmbeddings));
        long b = inputEmbeddings.shape[0], t = inputEmbeddings.shape[1];
        if (t == 0) throw new ArgumentException("input embeddings must contain at least one position", nameof(inputEmbeddings));
        if (cache is not null && cache.BatchSize != b)
            throw new ArgumentException($"cache batch size {cache.BatchSize} differs from input batch size {b}", nameof(cache));
        if (attentionMask is not null && (attentionMask.dim() != 2 || attentionMask.shape[0] != b || attentionMask.shape[1] != t))
            throw new ArgumentException($"attention mask must be [{b}, {t}], got [{string.Join(", ", attentionMask.shape)}]", nameof(attentionMask));
        CheckAdapters(adapters, b);
        if (ScalingUses(adapters, b) is { } scaled)
        {
            if (routing is not null && !is_grad_enabled() && PrivilegedPrefill.Plan(this, routing, adapters, cache, attentionMask, b, t) is not null)
                throw new NotSupportedException("a call that runs X-LoRA rows and freezes privileged mixture-of-experts routing in the same " +
                                                "call is not supported; run the X-LoRA rows in a batch of their own");
            return ForwardScaled(inputEmbeddings, cache, attentionMask, routing, adapters!, scaled);
        }
        if (routing is not null && !is_grad_enabled() && PrivilegedPrefill.Plan(this, routing, adapters, cache, attentionMask, b, t) is { } plan)
            return PrivilegedPrefill.Run(this, plan, inputEmbeddings, cache, attentionMask, routing, adapters);
        return ForwardCore(inputEmbeddings, cache, attentionMask, routing, adapters);
    }

    private readonly Dictionary<string, IScalingPassAdapter> _scalingAdapters = new(StringComparer.Ordinal);

    /// <summary>Registers a scaling-pass adapter (X-LoRA) under its name, of method <paramref name="method"/>; its experts
    /// must already be attached. A module adapter joins the model's module tree (<c>scaling_heads.{name}</c>), so
    /// <c>train()</c>/<c>eval()</c> reach its dropout; it takes the model's current mode.</summary>
    public void RegisterScalingAdapter(IScalingPassAdapter adapter, string method)
    {
        foreach (var e in adapter.Experts)
            if (!_adapters.ContainsKey(e)) throw new ArgumentException($"expert '{e}' of '{adapter.Name}' is not attached");
        RegisterAdapter(adapter.Name, method);
        _scalingAdapters[adapter.Name] = adapter;
        if (adapter is nn.Module module)
        {
            if (training) module.train(); else module.eval();
            _scalingHeads.Add(adapter.Name, module);
        }
    }

    /// <summary>The scaling-pass adapter named <paramref name="name"/>, or null.</summary>
    public IScalingPassAdapter? ScalingAdapter(string name) => _scalingAdapters.GetValueOrDefault(name);

    /// <summary>Forgets a scaling-pass adapter (its experts stay attached until removed).</summary>
    public void UnregisterScalingAdapter(string name)
    {
        if (_scalingAdapters.Remove(name)) UnregisterAdapter(name);
    }

    /// <summary>Per row, the scaling-pass adapter it selects (null for other rows), or null when no row selects one.</summary>
    private IScalingPassAdapter?[]? ScalingUses(AdapterSelection? adapters, long batch)
    {
        if (adapters is null || _scalingAdapters.Count == 0 || !adapters.Names.Any(_scalingAdapters.ContainsKey)) return null;
        var rows = new IScalingPassAdapter?[batch];
        for (int r = 0; r < batch; r++)
        {
            var choice = adapters[r];
            foreach (var term in choice.Terms)
            {
                if (!_scalingAdapters.TryGetValue(term.Name, out var a)) continue;
                if (choice.Terms.Count != 1 || term.Weight != 1)
                    throw new ArgumentException($"X-LoRA adapter '{term.Name}' must be a row's only adapter, at weight 1 (got '{choice}'): " +
                                                "its scalings already weigh its experts", nameof(adapters));
                rows[r] = a;
            }
        }
        return rows;
    }

    /// <summary>
    /// The two passes of X-LoRA rows: the scaling pass (with its own KV cache, <see cref="ScalingPassCacheState"/>) over the
    /// batch — X-LoRA rows run their <see cref="IScalingPassAdapter.ScalingPassChoice"/>, other rows the base model — then
    /// each adapter's head on its rows' post-norm hidden states, then the scaled pass over the batch with the main cache.
    /// Each call runs both passes on its new tokens only: a token's scalings depend on the tokens up to it, so the scaled
    /// pass's cached keys and values never change when tokens are added, and this equals recomputing the whole sequence.
    /// A row whose scalings are frozen (non-granular) reuses them and, when every X-LoRA row is frozen, the scaling pass
    /// is skipped.
    /// </summary>
    private Tensor ForwardScaled(Tensor inputEmbeddings, KvCache? cache, Tensor? attentionMask, RoutingContext? routing,
        AdapterSelection adapters, IScalingPassAdapter?[] scaled)
    {
        long b = inputEmbeddings.shape[0], t = inputEmbeddings.shape[1];
        using var scope = NewDisposeScope();
        var state = cache?.ScalingPass;
        bool NeedsPass(int r) => scaled[r] is not null && (state is null || !state.IsFrozen(r));
        Tensor? hidden = null;
        if (Enumerable.Range(0, (int)b).Any(NeedsPass))
        {
            KvCache? scalingCache = null;
            if (cache is not null)
            {
                if (state!.ScalingCache is null)
                {
                    if (cache.Length > 0)
                        throw new InvalidOperationException("this KV cache holds tokens that were run without X-LoRA: the scaling pass has no " +
                                                            "cache for them; run X-LoRA from the first token of the sequence");
                    state.ScalingCache = cache.CreateCompanion();
                }
                scalingCache = state.ScalingCache;
                if (scalingCache.Length != cache.Length)
                    throw new InvalidOperationException($"the X-LoRA scaling cache holds {scalingCache.Length} slots but the KV cache {cache.Length}: " +
                                                        "a row whose scalings were frozen cannot run its scaling pass again");
                if (scalingCache.Capacity < cache.Capacity) scalingCache.Grow(cache.Capacity - scalingCache.Capacity);
            }
            var scalingSelection = AdapterSelection.PerRow(Enumerable.Range(0, (int)b).Select(r => scaled[r]?.ScalingPassChoice ?? AdapterChoice.Base));
            using (no_grad())
                hidden = ForwardCore(inputEmbeddings, scalingCache, attentionMask, routing: null,
                    scalingSelection.IsBase ? null : scalingSelection).detach();
        }

        // The scalings are made inside the scaled pass's call, after its routing context has begun the step: the
        // privileged policy reads that step's labels and the sequence's state.
        ScalingSet MakeScalings()
        {
            var items = new Dictionary<string, (IScalingPassAdapter, Tensor)>(StringComparer.Ordinal);
            foreach (var adapter in scaled.Where(a => a is not null).Distinct())
            {
                var rows = Enumerable.Range(0, (int)b).Where(r => scaled[r] == adapter).ToArray();
                var live = rows.Where(NeedsPass).ToArray();
                var policy = routing?.Policy ?? adapter!.Policy;
                Tensor? full = null;
                if (live.Length > 0)
                {
                    var index = tensor(live.Select(r => (long)r).ToArray(), device: Device);
                    var rowHidden = hidden!.index_select(0, index);
                    Tensor s;
                    if (policy is PrivilegedRouterPolicy privileged)
                    {
                        if (routing?.PrivilegeLabels is null)
                            throw new InvalidOperationException($"X-LoRA adapter '{adapter!.Name}' uses router_policy {policy.Describe()}, which needs privilege " +
                                                                "labels on every token, and this call has none; give a chat (the renderer labels each token) " +
                                                                "or a RoutingContext with SetPrivileges, or use router_policy free");
                        s = PrivilegedScalings.Freeze(privileged, routing, adapter!.Name, rowHidden, live, adapter.NumModules, adapter.NumExperts, adapter.Scalings);
                    }
                    else if (!policy.FreezesOnUntrusted) s = adapter!.Scalings(rowHidden);                                   // [R, T, L, N]
                    else throw new NotSupportedException($"router policy '{policy.Name}' is not supported for X-LoRA scalings");
                    full = zeros([b, t, s.shape[2], s.shape[3]], dtype: s.dtype, device: Device).index_copy(0, index, s);
                }
                foreach (int r in rows.Where(r => !NeedsPass(r)))
                {
                    var frozen = state!.Frozen[r]!;                                                   // [1, L, N]
                    full ??= zeros([b, t, frozen.shape[1], frozen.shape[2]], dtype: frozen.dtype, device: Device);
                    full = full.index_copy(0, tensor(new long[] { r }, device: Device), frozen.unsqueeze(0).expand(1, t, -1, -1));
                }
                items[adapter!.Name] = (adapter, full!);
            }

            if (state is not null)
                foreach (var (adapter, full) in items.Values)
                    for (int r = 0; r < b; r++)
                    {
                        if (scaled[r] != adapter || state.IsFrozen(r)) continue;
                        if (t == 1) state.DecodeSteps[r]++;
                        if (state.NonGranularIndex[r] is int k && state.DecodeSteps[r] == k)
                            state.Frozen[r] = full.narrow(0, r, 1).narrow(1, t - 1, 1).squeeze(0).detach().clone().DetachFromDisposeScope();
                    }
            if (routing?.OnScalings is { } observe)
                foreach (var (name, (_, full)) in items) observe(name, full.detach());
            return new ScalingSet(items);
        }

        return ForwardCore(inputEmbeddings, cache, attentionMask, routing, adapters, MakeScalings).MoveToOuterDisposeScope();
    }

    private readonly Dictionary<string, string> _adapters = new(StringComparer.Ordinal);

    /// <summary>The adapters attached to the model, by name, with their method (<c>lora</c>, <c>mixlora</c>, ...): what
    /// a forward call may select. Attaching and removing adapters keeps it (the adapter methods call
    /// <see cref="RegisterAdapter"/> and <see cref="UnregisterAdapter"/>).</summary>
    public IReadOnlyDictionary<string, string> Adapters => _adapters;

    /// <summary>Records that adapter <paramref name="name"/> of method <paramref name="method"/> is attached.</summary>
    public void RegisterAdapter(string name, string method)
    {
        AdapterChoice.CheckName(name);
        _adapters[name] = method;
    }

    /// <summary>Forgets adapter <paramref name="name"/> (no-op when absent).</summary>
    public void UnregisterAdapter(string name)
    {
        _adapters.Remove(name);
        if (_scalingAdapters.Remove(name)) _scalingHeads.Remove(name);
    }

    /// <summary>Throws unless every adapter <paramref name="adapters"/> names is attached and the selection fits the batch.</summary>
    /// <exception cref="ArgumentException">An unknown adapter name, or a per-row selection for another batch size.</exception>
    public void CheckAdapters(AdapterSelection? adapters, long batch)
    {
        if (adapters is null) return;
        adapters.CheckBatch(batch);
        foreach (var name in adapters.Names)
            if (!_adapters.ContainsKey(name))
                throw new ArgumentException(_adapters.Count == 0
                    ? $"no adapter named '{name}' is attached: the model has no adapters (load one first)"
                    : $"no adapter named '{name}' is attached; attached: {string.Join(", ", _adapters.Keys)}", nameof(adapters));
    }

    /// <summary>True when any block routes a row of <paramref name="adapters"/> under <paramref name="routing"/> with a
    /// policy that freezes on untrusted tokens.</summary>
    internal bool RoutesPrivileged(RoutingContext routing, AdapterSelection? adapters) =>
        _model.Layers.Any(l => l.FeedForward.RouterPoliciesFor(routing, adapters).Any(p => p.FreezesOnUntrusted));

    /// <summary>One forward call of every layer (the body of <see cref="ForwardEmbeddings"/>).</summary>
    internal Tensor ForwardCore(Tensor inputEmbeddings, KvCache? cache, Tensor? attentionMask, RoutingContext? routing,
        AdapterSelection? adapters, Func<ScalingSet>? scalings = null)
    {
        long b = inputEmbeddings.shape[0], t = inputEmbeddings.shape[1];
        using var scope = NewDisposeScope();
        Tensor? mask = attentionMask?.to(ScalarType.Bool, Device);

        // Rotary positions count real tokens only, continuing from what the cache has seen.
        long[] past = cache is null ? new long[b] : cache.NextPositions.ToArray();
        Tensor positions;
        long[] realCounts = new long[b];
        if (mask is null)
        {
            positions = arange(t, dtype: ScalarType.Int64, device: Device).unsqueeze(0).expand(b, t)
                        + tensor(past, device: Device).unsqueeze(1);
            Array.Fill(realCounts, t);
        }
        else
        {
            var m64 = mask.to(ScalarType.Int64);
            var cum = m64.cumsum(1) - 1 + tensor(past, device: Device).unsqueeze(1);
            positions = cum.clamp_min(0) * m64;   // padding gets position 0 (never attended to)
            var counts = m64.sum(1).cpu();
            for (int i = 0; i < b; i++) realCounts[i] = counts[i].item<long>();
        }
        long maxPos = positions.max().item<long>();
        if (maxPos >= Config.MaxPositionEmbeddings)
            throw new ContextLengthException((int)Math.Min(maxPos + 1, int.MaxValue), Config.MaxPositionEmbeddings,
                $"position {maxPos} is past the model's context of {Config.MaxPositionEmbeddings} tokens (max_position_embeddings in " +
                "config.json): the sequence, with what the KV cache already holds, is too long; shorten or truncate it");

        long start = 0;
        bool padded = mask is not null;
        if (cache is not null)
        {
            padded |= cache.HasPadding;
            start = cache.Reserve(t, mask, realCounts);
        }
        long l = start + t;

        Tensor? attnMask = null;
        bool causal = false;
        bool windowed = Config.SlidingWindow is int w && l > w;
        if (padded || windowed || (start > 0 && t > 1))
        {
            var qSlot = arange(start, l, dtype: ScalarType.Int64, device: Device).unsqueeze(1);   // [T, 1]
            var kSlot = arange(0, l, dtype: ScalarType.Int64, device: Device).unsqueeze(0);       // [1, L]
            var allowed = kSlot <= qSlot;
            if (windowed) allowed = allowed.logical_and(qSlot - kSlot < Config.SlidingWindow!.Value);
            var valid = cache is not null ? cache.ValidSlots(l) : (mask ?? ones(b, t, dtype: ScalarType.Bool, device: Device));
            var full = allowed.unsqueeze(0).logical_and(valid.unsqueeze(1));                       // [B, T, L]
            full = full.logical_or((kSlot == qSlot).unsqueeze(0));   // padded queries attend to themselves (finite, ignored)
            attnMask = full.unsqueeze(1);
        }
        else if (t > 1)
        {
            causal = true;
        }

        var (cos, sin) = _rotary.Lookup(positions, DType, maxPos);
        routing?.BeginForward(b, t, mask, continuation: start > 0, cache, start);
        var ctx = new ForwardContext
        {
            Cos = cos, Sin = sin, AttentionMask = attnMask, IsCausal = causal, Cache = cache, Start = start,
            TokenMask = mask, Routing = routing, Adapters = AdapterBatch.Resolve(adapters, b, Device), Scalings = scalings?.Invoke(),
        };
        var h = _model.EmbedTokens.AddPrivileges(inputEmbeddings.to(Device), routing?.PrivilegeLabels, ctx.Adapters);
        foreach (var layer in _model.Layers) h = layer.call(h, ctx);
        return _model.Norm.call(h).MoveToOuterDisposeScope();
    }

    /// <summary>The tensors of this model's state dict with their shapes and dtypes, in module order.</summary>
    public IReadOnlyList<(string Name, long[] Shape)> StateDictLayout() =>
        state_dict().Select(kv => (kv.Key, kv.Value.shape)).ToList();

    /// <summary>
    /// Loads a Hugging Face model directory (config.json + model.safetensors or a sharded index). Nothing is allocated
    /// before the config has passed its bounds (<see cref="LlamaConfig.Validate"/>) and the checkpoint header(s) have
    /// been read and compared with it: sizes first (<see cref="LlamaConfig.CheckCheckpointShapes"/>), then every tensor
    /// name and shape the model will have.
    /// </summary>
    /// <exception cref="ModelConfigException">config.json is invalid, out of bounds, or disagrees with the checkpoint's shapes.</exception>
    /// <exception cref="StateDictMismatchException">The checkpoint lacks tensors the model needs, has others, or mis-shaped ones.</exception>
    /// <exception cref="CheckpointFormatException">The checkpoint is missing or malformed.</exception>
    public static LlamaForCausalLM FromPretrained(string directory, Device? device = null, ScalarType? dtype = null)
    {
        if (!Directory.Exists(directory))
            throw new LoraMixException($"model directory '{directory}' does not exist");
        string configPath = Path.Combine(directory, "config.json");
        var config = LlamaConfig.Load(configPath);
        ScalarType dt = dtype ?? ScalarType.Float32;
        using var ckpt = SafetensorsCheckpoint.OpenDirectory(directory);
        var shapes = new Dictionary<string, long[]>(StringComparer.Ordinal);
        foreach (var name in ckpt.TensorNames) shapes[name] = ckpt.GetEntry(name).Shape;
        config.CheckCheckpointShapes(shapes, configPath, ckpt.Source);
        CheckLayout(config, shapes, directory);
        var model = new LlamaForCausalLM(config, device, dt);
        try
        {
            model.LoadWeights(ckpt, directory);
        }
        catch
        {
            model.Dispose();
            throw;
        }
        return model;
    }

    /// <summary>Compares a checkpoint's tensor names and shapes with the layout <paramref name="config"/> implies
    /// (<see cref="ModelPresets.Layout"/>), without building the model.</summary>
    /// <exception cref="StateDictMismatchException">Missing, unexpected or mis-shaped tensors (all listed).</exception>
    internal static void CheckLayout(LlamaConfig config, IReadOnlyDictionary<string, long[]> shapes, string source)
    {
        var layout = ModelPresets.Layout(config);
        var expected = new HashSet<string>(layout.Select(e => e.Name), StringComparer.Ordinal);
        var missing = new List<string>();
        var misshaped = new List<string>();
        foreach (var (name, shape) in layout)
        {
            if (!shapes.TryGetValue(name, out var actual)) missing.Add(name);
            else if (!actual.AsSpan().SequenceEqual(shape))
                misshaped.Add($"{name}: checkpoint [{string.Join(", ", actual)}] vs model [{string.Join(", ", shape)}]");
        }
        var unexpected = shapes.Keys.Where(n => !expected.Contains(n) && !(config.TieWordEmbeddings && n == "lm_head.weight"))
            .Order(StringComparer.Ordinal).ToList();
        if (missing.Count + unexpected.Count + misshaped.Count > 0)
            throw new StateDictMismatchException(source, missing, unexpected, misshaped);
    }

    /// <summary>
    /// Strictly loads weights by Hugging Face name: every model tensor must be present with the same shape, and no other
    /// tensor may be in the checkpoint (a redundant <c>lm_head.weight</c> is accepted when embeddings are tied).
    /// </summary>
    /// <exception cref="StateDictMismatchException">Missing, unexpected or mis-shaped keys (all listed).</exception>
    public void LoadWeights(SafetensorsCheckpoint checkpoint, string source)
    {
        var sd = state_dict();
        var names = new HashSet<string>(checkpoint.TensorNames);
        var missing = sd.Keys.Where(k => !names.Contains(k)).ToList();
        var unexpected = names.Where(n => !sd.ContainsKey(n) && !(Config.TieWordEmbeddings && n == "lm_head.weight")).Order().ToList();
        var misshaped = new List<string>();
        foreach (var (name, t) in sd)
        {
            if (!names.Contains(name)) continue;
            var entry = checkpoint.GetEntry(name);
            if (!entry.Shape.SequenceEqual(t.shape))
                misshaped.Add($"{name}: checkpoint [{string.Join(", ", entry.Shape)}] vs model [{string.Join(", ", t.shape)}]");
        }
        if (missing.Count + unexpected.Count + misshaped.Count > 0)
            throw new StateDictMismatchException(source, missing, unexpected, misshaped);
        using var noGrad = no_grad();
        foreach (var (name, t) in sd) checkpoint.ReadInto(name, t);
    }

    /// <summary>Writes model.safetensors and then config.json (Hugging Face layout), each file atomically, tensor by tensor.
    /// config.json comes last, so a failure while writing the weights (e.g. a full disk) never leaves a new config.json
    /// beside missing or older weights. For a whole directory that appears complete or not at all, write into
    /// <see cref="AtomicDirectory.Write"/>'s temporary directory.</summary>
    public void SavePretrained(string directory, ScalarType? dtype = null)
    {
        Directory.CreateDirectory(directory);
        ScalarType dt = dtype ?? DType;
        var sd = state_dict();
        var layout = sd.Select(kv => new SafetensorsTensorSpec(kv.Key, SafetensorsDTypes.FromScalarType(dt), kv.Value.shape)).ToList();
        SafetensorsCheckpoint.WriteDirectory(directory, layout, spec => sd[spec.Name].detach().to(dt),
            metadata: new Dictionary<string, string> { ["format"] = "pt" });
        (Config with { TorchDtype = TorchRuntime.HfName(dt) }).Save(Path.Combine(directory, "config.json"));
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _rotary.Dispose();
        base.Dispose(disposing);
    }
}
