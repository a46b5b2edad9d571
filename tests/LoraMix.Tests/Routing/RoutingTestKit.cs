using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Adapters;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Tests.Routing;

/// <summary>A run of tokens with one privilege.</summary>
internal sealed record Segment(Privilege Privilege, long[] Ids);

/// <summary>A raw-token conversation: privileged segments, one untrusted span, then later segments (a later user turn,
/// more data, an assistant answer).</summary>
internal sealed record Conversation(Segment[] Prefix, long[] Untrusted, Segment[] Suffix)
{
    public int PrefixLength => Prefix.Sum(s => s.Ids.Length);
    public int SuffixLength => Suffix.Sum(s => s.Ids.Length);

    public (long[] Ids, Privilege[] Labels) Build(long[]? untrusted = null)
    {
        var segments = Prefix.Append(new Segment(Privilege.Untrusted, untrusted ?? Untrusted)).Concat(Suffix);
        return (segments.SelectMany(s => s.Ids).ToArray(), segments.SelectMany(s => s.Ids.Select(_ => s.Privilege)).ToArray());
    }
}

internal static class RoutingTestKit
{
    public const int Vocab = 512;

    /// <summary>Strategies of the random models: top-2, top-1, top-p, switch with a small capacity (overflow), switch
    /// with a capacity that never binds here.</summary>
    public static readonly (string Strategy, int TopK, int Capacity)[] Strategies =
    [
        (MixLoraConfig.TopKStrategy, 2, 32), (MixLoraConfig.TopKStrategy, 1, 32), (MixLoraConfig.TopPStrategy, 2, 32),
        (MixLoraConfig.SwitchStrategy, 1, 3), (MixLoraConfig.SwitchStrategy, 1, 64),
    ];

    public static MixLoraConfig Config(int strategy, int experts = 4) =>
        MixLoraTestKit.Config(Strategies[strategy].Strategy, experts, Strategies[strategy].TopK) with
        {
            TopP = 0.6, ExpertCapacity = Strategies[strategy].Capacity, JitterNoise = 0.0,
        };

    public static LlamaForCausalLM Model(int strategy, long seed, ScalarType dtype = ScalarType.Float32)
    {
        var model = MixLoraTestKit.Model(Config(strategy), seed, dtype);
        model.eval();
        return model;
    }

    public static IRouterPolicy Policy(string name) => name switch
    {
        "free" => FreeRouterPolicy.Instance,
        "last" => PrivilegedRouterPolicy.Last,
        "pooled" => PrivilegedRouterPolicy.Pooled,
        _ => throw new ArgumentException(name),
    };

    /// <summary>One uncached forward of a left-padded batch; returns each row's traced tokens.</summary>
    public static IReadOnlyList<TokenRoute>[] Prefill(LlamaForCausalLM model, IRouterPolicy policy,
        params (long[] Ids, Privilege[] Labels)[] rows)
    {
        using var scope = NewDisposeScope();
        using var routing = new RoutingContext { Policy = policy, Trace = new RoutingTrace() };
        var (ids, mask) = Pad(rows.Select(r => r.Ids).ToArray());
        routing.SetPrivileges(rows.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
        using (no_grad()) model.Forward(ids, attentionMask: mask, routing: routing, adapters: MixLoraTestKit.Default);
        return Enumerable.Range(0, rows.Length).Select(r => routing.Trace!.Row(r)).ToArray();
    }

    public static (Tensor Ids, Tensor? Mask) Pad(long[][] rows)
    {
        int t = rows.Max(r => r.Length);
        var ids = new long[rows.Length * t];
        var mask = new long[rows.Length * t];
        for (int b = 0; b < rows.Length; b++)
            for (int i = 0; i < rows[b].Length; i++)
            {
                ids[b * t + t - rows[b].Length + i] = rows[b][i];
                mask[b * t + t - rows[b].Length + i] = 1;
            }
        bool padded = rows.Any(r => r.Length != t);
        return (tensor(ids, [rows.Length, t]), padded ? tensor(mask, [rows.Length, t]) : null);
    }

    /// <summary>Same experts in every layer (exactly) and the same weights (to <paramref name="tolerance"/>).</summary>
    public static bool Same(TokenRoute a, TokenRoute b, double tolerance = 1e-5)
    {
        if (a.Layers.Count != b.Layers.Count) return false;
        for (int l = 0; l < a.Layers.Count; l++)
        {
            if (!a.Layers[l].Experts.SequenceEqual(b.Layers[l].Experts)) return false;
            for (int k = 0; k < a.Layers[l].Weights.Length; k++)
                if (Math.Abs(a.Layers[l].Weights[k] - b.Layers[l].Weights[k]) > tolerance) return false;
        }
        return true;
    }

    public static string Show(TokenRoute r) =>
        $"[{r.Position}] " + string.Join(" | ", r.Layers.Select(l => string.Join(",", l.Experts.Zip(l.Weights, (e, w) => $"{e}:{w:F6}"))));

    public static void AssertSame(TokenRoute expected, TokenRoute actual, string what)
    {
        if (!Same(expected, actual)) Assert.Fail($"{what}: expected {Show(expected)}, got {Show(actual)}");
    }

    public static long[] Ids(Random rnd, int count) => Enumerable.Range(0, count).Select(_ => (long)rnd.Next(3, Vocab)).ToArray();
}
