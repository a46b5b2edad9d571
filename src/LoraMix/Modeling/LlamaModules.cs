using TorchSharp;
using TorchSharp.Utils;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>The feed-forward slot of a decoder layer: the dense SwiGLU MLP, or a mixture of experts around it.</summary>
public abstract class FeedForwardBlock : nn.Module<Tensor, ForwardContext, Tensor>
{
    protected FeedForwardBlock(string name) : base(name) { }

    /// <summary>The router policies this block routes rows with under <paramref name="routing"/> when the rows run
    /// <paramref name="adapters"/> (none: the dense MLP, or no row runs a mixture of this block).</summary>
    public virtual IEnumerable<Routing.IRouterPolicy> RouterPoliciesFor(Routing.RoutingContext? routing, AdapterSelection? adapters) => [];
}

/// <summary>The SwiGLU feed-forward network <c>down(silu(gate(x)) ⊙ up(x))</c>.</summary>
public sealed class LlamaMlp : FeedForwardBlock
{
    [ComponentName(Name = "gate_proj")] private LinearSlot _gate;
    [ComponentName(Name = "up_proj")] private LinearSlot _up;
    [ComponentName(Name = "down_proj")] private LinearSlot _down;

    public LlamaMlp(LlamaConfig c, Device device, ScalarType dtype) : base(nameof(LlamaMlp))
    {
        _gate = new LinearLayer(c.HiddenSize, c.IntermediateSize, false, device, dtype);
        _up = new LinearLayer(c.HiddenSize, c.IntermediateSize, false, device, dtype);
        _down = new LinearLayer(c.IntermediateSize, c.HiddenSize, false, device, dtype);
        RegisterComponents();
    }

    /// <summary>The projection slots by Hugging Face name.</summary>
    public static readonly IReadOnlyList<string> ProjectionNames = ["gate_proj", "up_proj", "down_proj"];

    public LinearSlot GetProjection(string name) => name switch
    {
        "gate_proj" => _gate,
        "up_proj" => _up,
        "down_proj" => _down,
        _ => throw new ArgumentException($"no projection '{name}' in the MLP; expected one of {string.Join(", ", ProjectionNames)}", nameof(name)),
    };

    /// <summary>Replaces a projection slot (e.g. with an adapted linear layer) under the same state-dict name.</summary>
    public void SetProjection(string name, LinearSlot module)
    {
        _ = GetProjection(name);
        register_module(name, null!);
        register_module(name, module);
        switch (name)
        {
            case "gate_proj": _gate = module; break;
            case "up_proj": _up = module; break;
            default: _down = module; break;
        }
    }

    public override Tensor forward(Tensor x, ForwardContext ctx)
    {
        using var scope = NewDisposeScope();
        var h = nn.functional.silu(_gate.call(x, ctx)) * _up.call(x, ctx);
        return _down.call(h, ctx).MoveToOuterDisposeScope();
    }
}

/// <summary>Grouped-query self-attention with rotary embeddings, a preallocated KV cache and fused SDPA.</summary>
public sealed class LlamaAttention : nn.Module<Tensor, ForwardContext, Tensor>
{
    [ComponentName(Name = "q_proj")] private LinearSlot _q;
    [ComponentName(Name = "k_proj")] private LinearSlot _k;
    [ComponentName(Name = "v_proj")] private LinearSlot _v;
    [ComponentName(Name = "o_proj")] private LinearSlot _o;
    private readonly int _layer, _heads, _kvHeads, _headDim;

    public LlamaAttention(LlamaConfig c, int layer, Device device, ScalarType dtype) : base(nameof(LlamaAttention))
    {
        _layer = layer;
        _heads = c.NumAttentionHeads;
        _kvHeads = c.NumKeyValueHeads;
        _headDim = c.HeadDim;
        bool qkvBias = c.AttentionBias || c.QkvBias;
        _q = new LinearLayer(c.HiddenSize, (long)_heads * _headDim, qkvBias, device, dtype);
        _k = new LinearLayer(c.HiddenSize, (long)_kvHeads * _headDim, qkvBias, device, dtype);
        _v = new LinearLayer(c.HiddenSize, (long)_kvHeads * _headDim, qkvBias, device, dtype);
        _o = new LinearLayer((long)_heads * _headDim, c.HiddenSize, c.AttentionBias, device, dtype);
        RegisterComponents();
    }

    /// <summary>The projection slots by Hugging Face name.</summary>
    public static readonly IReadOnlyList<string> ProjectionNames = ["q_proj", "k_proj", "v_proj", "o_proj"];

    public LinearSlot GetProjection(string name) => name switch
    {
        "q_proj" => _q,
        "k_proj" => _k,
        "v_proj" => _v,
        "o_proj" => _o,
        _ => throw new ArgumentException($"no projection '{name}' in attention; expected one of {string.Join(", ", ProjectionNames)}", nameof(name)),
    };

    /// <summary>Replaces a projection slot (e.g. with an adapted linear layer) under the same state-dict name.</summary>
    public void SetProjection(string name, LinearSlot module)
    {
        _ = GetProjection(name);
        register_module(name, null!);
        register_module(name, module);
        switch (name)
        {
            case "q_proj": _q = module; break;
            case "k_proj": _k = module; break;
            case "v_proj": _v = module; break;
            default: _o = module; break;
        }
    }

    public override Tensor forward(Tensor x, ForwardContext ctx)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1];
        var q = _q.call(x, ctx).view(b, t, _heads, _headDim).transpose(1, 2);
        var k = _k.call(x, ctx).view(b, t, _kvHeads, _headDim).transpose(1, 2);
        var v = _v.call(x, ctx).view(b, t, _kvHeads, _headDim).transpose(1, 2);
        q = RotaryEmbedding.Apply(q, ctx.Cos, ctx.Sin);
        k = RotaryEmbedding.Apply(k, ctx.Cos, ctx.Sin);
        if (ctx.Cache is { } cache) (k, v) = cache.Append(_layer, ctx.Start, k, v);
        long l = k.shape[2];
        int rep = _heads / _kvHeads;

        Tensor o;
        if (ctx.IsCausal || rep == 1)
        {
            if (rep > 1)
            {
                k = k.unsqueeze(2).expand(b, _kvHeads, rep, l, _headDim).reshape(b, _heads, l, _headDim);
                v = v.unsqueeze(2).expand(b, _kvHeads, rep, l, _headDim).reshape(b, _heads, l, _headDim);
            }
            o = nn.functional.scaled_dot_product_attention(q, k, v, ctx.AttentionMask, 0.0, ctx.IsCausal);
        }
        else
        {
            // Fold the query heads of each KV group into the query axis: no copy of the cache per step.
            var qf = q.reshape(b, _kvHeads, rep * t, _headDim);
            Tensor? mask = ctx.AttentionMask?.unsqueeze(2).expand(b, 1, rep, t, l).reshape(b, 1, rep * t, l);
            o = nn.functional.scaled_dot_product_attention(qf, k, v, mask, 0.0, false).view(b, _heads, t, _headDim);
        }
        o = o.transpose(1, 2).reshape(b, t, (long)_heads * _headDim);
        return _o.call(o, ctx).MoveToOuterDisposeScope();
    }
}

/// <summary>One pre-norm decoder layer: attention and feed-forward, each with a residual connection.</summary>
public sealed class LlamaDecoderLayer : nn.Module<Tensor, ForwardContext, Tensor>
{
    [ComponentName(Name = "self_attn")] private readonly LlamaAttention _attn;
    [ComponentName(Name = "mlp")] private FeedForwardBlock _mlp;
    [ComponentName(Name = "input_layernorm")] private readonly RmsNorm _inputNorm;
    [ComponentName(Name = "post_attention_layernorm")] private readonly RmsNorm _postNorm;

    public LlamaDecoderLayer(LlamaConfig c, int layer, Device device, ScalarType dtype) : base(nameof(LlamaDecoderLayer))
    {
        _attn = new LlamaAttention(c, layer, device, dtype);
        _mlp = new LlamaMlp(c, device, dtype);
        _inputNorm = new RmsNorm(c.HiddenSize, c.RmsNormEps, device, dtype);
        _postNorm = new RmsNorm(c.HiddenSize, c.RmsNormEps, device, dtype);
        RegisterComponents();
    }

    public LlamaAttention SelfAttention => _attn;
    public FeedForwardBlock FeedForward => _mlp;

    /// <summary>Replaces the feed-forward slot (e.g. with a mixture of experts) under the name <c>mlp</c>.</summary>
    public void SetFeedForward(FeedForwardBlock block)
    {
        register_module("mlp", null!);
        register_module("mlp", block);
        _mlp = block;
    }

    public override Tensor forward(Tensor x, ForwardContext ctx)
    {
        using var scope = NewDisposeScope();
        var h = x + _attn.call(_inputNorm.call(x), ctx);
        var y = h + _mlp.call(_postNorm.call(h), ctx);
        return y.MoveToOuterDisposeScope();
    }
}

/// <summary>Token embedding table (<c>weight</c> [vocab, hidden]), with any number of named adapter
/// <see cref="PrivilegeEmbedding"/>s (under <c>privilege.&lt;adapter&gt;.weight</c>); which one a row adds is read from
/// the forward call's adapter selection.</summary>
public sealed class TokenEmbedding : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")] private readonly Parameter _weight;
    [ComponentName(Name = "privilege")] private readonly NamedModules<PrivilegeEmbedding> _privilege = new();

    public TokenEmbedding(long vocab, long hidden, Device device, ScalarType dtype) : base(nameof(TokenEmbedding))
    {
        _weight = new Parameter(empty(vocab, hidden, dtype: dtype, device: device));
        RegisterComponents();
    }

    public Parameter Weight => _weight;

    /// <summary>Names of the attached privilege embeddings.</summary>
    public IReadOnlyList<string> PrivilegeEmbeddingNames => _privilege.Names;

    /// <summary>The attached privilege embedding <paramref name="name"/>, or null.</summary>
    public PrivilegeEmbedding? GetPrivilegeEmbedding(string name) => _privilege.Get(name);

    /// <summary>Adds a zero privilege embedding under <paramref name="name"/> (same device and dtype as the table).</summary>
    public PrivilegeEmbedding AddPrivilegeEmbedding(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.')) throw new ArgumentException($"adapter name '{name}' must be non-empty and contain no '.'");
        if (_privilege.Get(name) is not null) throw new ArgumentException($"a privilege embedding named '{name}' is already attached");
        var table = new PrivilegeEmbedding(_weight.shape[1], _weight.device, _weight.dtype);
        _privilege.Add(name, table);
        return table;
    }

    /// <summary>Removes (and disposes) a privilege embedding; no-op when absent.</summary>
    public void RemovePrivilegeEmbedding(string name)
    {
        if (_privilege.Get(name) is not { } table) return;
        _privilege.Remove(name);
        table.Dispose();
    }

    /// <summary>The privilege embeddings the rows of <paramref name="adapters"/> add (adapter names that have one).</summary>
    public IReadOnlyList<string> PrivilegeEmbeddingsFor(AdapterSelection? adapters) =>
        adapters is null ? [] : adapters.Names.Where(n => _privilege.Get(n) is not null).ToList();

    /// <summary>Adds to each row of <paramref name="embeddings"/> the rows of its adapter's privilege embedding for
    /// <paramref name="labels"/>; rows whose adapters have none are unchanged (the input itself when no row has one).</summary>
    /// <exception cref="InvalidOperationException">A row's adapter has one but <paramref name="labels"/> is null, or a row
    /// composes two adapters that both have one.</exception>
    public Tensor AddPrivileges(Tensor embeddings, Tensor? labels, AdapterBatch? adapters)
    {
        if (adapters is null || _privilege.Names.Count == 0) return embeddings;
        var uses = adapters.Uses.Where(u => _privilege.Get(u.Name) is not null).ToList();
        if (uses.Count == 0) return embeddings;
        if (labels is null)
            throw new InvalidOperationException(
                $"adapter '{uses[0].Name}' has a privilege embedding (privilege_embedding: true): set RoutingContext.PrivilegeLabels " +
                "(or SetPrivileges) before every forward step, decoding steps included — e.g. render chats with the chat template");
        var covered = new HashSet<long>();
        foreach (var u in uses)
            foreach (var r in u.Rows)
                if (!covered.Add(r))
                    throw new InvalidOperationException($"row {r} composes two adapters with a privilege embedding; a row may add one at most");
        var result = embeddings;
        foreach (var u in uses)
        {
            var table = _privilege.Get(u.Name)!;
            if (u.AllRows) return table.Apply(embeddings, labels);
            var rows = table.Apply(embeddings.index_select(0, u.Index!), labels.to(embeddings.device).index_select(0, u.Index!));
            result = result.index_copy(0, u.Index!, rows);
        }
        return result;
    }

    public override Tensor forward(Tensor ids)
    {
        var flat = _weight.index_select(0, ids.reshape(-1));
        return flat.view(ids.shape[0], ids.shape[1], _weight.shape[1]);
    }
}

/// <summary>The decoder stack (<c>model.*</c> in Hugging Face keys): embeddings, layers, final norm.</summary>
public sealed class LlamaModel : nn.Module
{
    [ComponentName(Name = "embed_tokens")] private readonly TokenEmbedding _embed;
    [ComponentName(Name = "layers")] private readonly ModuleList<LlamaDecoderLayer> _layers;
    [ComponentName(Name = "norm")] private readonly RmsNorm _norm;

    public LlamaModel(LlamaConfig c, Device device, ScalarType dtype) : base(nameof(LlamaModel))
    {
        _embed = new TokenEmbedding(c.VocabSize, c.HiddenSize, device, dtype);
        _layers = new ModuleList<LlamaDecoderLayer>();
        for (int i = 0; i < c.NumHiddenLayers; i++) _layers.Add(new LlamaDecoderLayer(c, i, device, dtype));
        _norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, device, dtype);
        RegisterComponents();
    }

    public TokenEmbedding EmbedTokens => _embed;
    public IReadOnlyList<LlamaDecoderLayer> Layers => _layers.ToList();
    public RmsNorm Norm => _norm;
}
