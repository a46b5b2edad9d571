using CsCheck;
using LoraMix.Tests.Adapters;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using Xunit.Abstractions;
using static LoraMix.Tests.Routing.RoutingTestKit;
using static TorchSharp.torch;

namespace LoraMix.Tests.Routing;

/// <summary>
/// The hardened router's guarantee over random conversations and random tiny MixLoRA models (random routers; top-2,
/// top-1, top-p, switch with and without overflow): under <c>privileged</c>, changing the untrusted content (ids and
/// length) leaves every routing decision of every layer identical for every privileged-prefix token, and every token from
/// the first untrusted one on (untrusted, later turns, generated tokens) gets the same frozen decision — in batched
/// left-padded prefill, in each KV-cached decoding step and across a later user turn. Under <c>free</c> the same change
/// alters the routing of the tokens after the untrusted span in most cases (the attack surface is real).
/// </summary>
public sealed class RoutingInvariancePropertyTests(ITestOutputHelper output)
{
    private static readonly Privilege[] PrivilegedRoles = [Privilege.System, Privilege.User, Privilege.Assistant];

    private sealed record Case(int Seed, int Strategy, bool Pooled, Conversation Conversation, long[] OtherUntrusted,
        (long[] Ids, Privilege[] Labels) Neighbour)
    {
        public override string ToString() =>
            $"seed {Seed}, strategy {Strategy}, {(Pooled ? "pooled" : "last")}, prefix {Conversation.PrefixLength}, untrusted {Conversation.Untrusted.Length} -> {OtherUntrusted.Length}, suffix {Conversation.SuffixLength}";
    }

    private static readonly Gen<Case> GenCase =
        Gen.Select(Gen.Int[0, 1_000_000], Gen.Int[0, Strategies.Length - 1], Gen.Bool,
                Gen.Select(Gen.Int[0, 2], Gen.Int[1, 5]).Array[1, 3], Gen.Int[1, 10], Gen.Int[1, 10],
                Gen.Select(Gen.Int[0, 3], Gen.Int[1, 4]).Array[0, 3], Gen.Int[2, 20])
            .Select((seed, strategy, pooled, prefix, untrustedA, untrustedB, suffix, neighbour) =>
            {
                var rnd = new Random(seed);
                // suffix roles: a later user/system/assistant turn, or more untrusted data (index 3)
                Segment Seg((int Role, int Length) s, bool allowUntrusted) =>
                    new(allowUntrusted && s.Role == 3 ? Privilege.Untrusted : PrivilegedRoles[s.Role % 3], Ids(rnd, s.Length));
                var conv = new Conversation(prefix.Select(s => Seg(s, false)).ToArray(), Ids(rnd, untrustedA),
                    suffix.Select(s => Seg(s, true)).ToArray());
                var other = Ids(rnd, untrustedB);
                var nIds = Ids(rnd, neighbour);
                int cut = rnd.Next(1, neighbour + 1);   // the neighbour row: privileged, then untrusted from `cut` (or none)
                var nLabels = nIds.Select((_, i) => i < cut ? PrivilegedRoles[rnd.Next(3)] : Privilege.Untrusted).ToArray();
                return new Case(seed, strategy, pooled, conv, other, (nIds, nLabels));
            });

    /// <summary>Privileged: prefix tokens identical by position; every later token equals the frozen decision.</summary>
    private static void AssertInvariant(IReadOnlyList<TokenRoute> a, IReadOnlyList<TokenRoute> b, int prefix, string what)
    {
        for (int t = 0; t < prefix; t++) AssertSame(a[t], b[t], $"{what}: prefix token {t}");
        var frozen = a[prefix];
        for (int t = prefix; t < a.Count; t++) AssertSame(frozen, a[t], $"{what}: run A frozen token {t}");
        for (int t = prefix; t < b.Count; t++) AssertSame(frozen, b[t], $"{what}: run B frozen token {t}");
    }

    /// <summary>Whether any token after the untrusted span (aligned from the end) routes differently in any layer.</summary>
    private static bool SuffixChanged(IReadOnlyList<TokenRoute> a, IReadOnlyList<TokenRoute> b, int suffix, ref long decisions, ref long changed)
    {
        bool any = false;
        for (int j = 1; j <= suffix; j++)
            for (int l = 0; l < a[^j].Layers.Count; l++)
            {
                decisions++;
                if (a[^j].Layers[l].Experts.SequenceEqual(b[^j].Layers[l].Experts)) continue;
                changed++;
                any = true;
            }
        return any;
    }

    [Fact]
    public void PrefillInALeftPaddedBatch()
    {
        int cases = 0, withSuffix = 0, freeChanged = 0;
        long decisions = 0, changed = 0;
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            using var model = Model(c.Strategy, c.Seed);
            var rowA = c.Conversation.Build();
            var rowB = c.Conversation.Build(c.OtherUntrusted);
            var policy = c.Pooled ? PrivilegedRouterPolicy.Pooled : PrivilegedRouterPolicy.Last;
            // the neighbour row's padding changes with the untrusted length of row 0
            var a = Prefill(model, policy, rowA, c.Neighbour);
            var b = Prefill(model, policy, rowB, c.Neighbour);
            AssertInvariant(a[0], b[0], c.Conversation.PrefixLength, c.ToString());
            for (int t = 0; t < a[1].Count; t++) AssertSame(a[1][t], b[1][t], $"{c}: neighbour token {t}");

            var fa = Prefill(model, FreeRouterPolicy.Instance, rowA)[0];
            var fb = Prefill(model, FreeRouterPolicy.Instance, rowB)[0];
            cases++;
            if (c.Conversation.SuffixLength == 0) return;
            withSuffix++;
            if (SuffixChanged(fa, fb, c.Conversation.SuffixLength, ref decisions, ref changed)) freeChanged++;
        }, iter: 60, threads: 1);
        double rate = (double)freeChanged / withSuffix;
        output.WriteLine($"privileged: {cases} cases invariant; free: routing after the untrusted span changed in {freeChanged}/{withSuffix} cases ({rate:P0}), {changed}/{decisions} (token, layer) decisions");
        Assert.True(withSuffix >= 20, $"only {withSuffix} cases had tokens after the untrusted span");
        Assert.True(rate >= 0.5, $"free routing changed in only {rate:P0} of the cases");
    }

    [Fact]
    public void KvCachedDecodingAndALaterUserTurn()
    {
        int cases = 0, freeChanged = 0;
        long decisions = 0, changed = 0;
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            using var model = Model(c.Strategy, c.Seed);
            var rnd = new Random(c.Seed + 1);
            long[] answer = Ids(rnd, 3), laterTurn = Ids(rnd, 1 + rnd.Next(4)), answer2 = Ids(rnd, 2);
            var policy = c.Pooled ? PrivilegedRouterPolicy.Pooled : PrivilegedRouterPolicy.Last;

            // prompt, 3 decoding steps (assistant), a later user turn as one cached chunk, 2 more decoding steps
            IReadOnlyList<TokenRoute> Run(IRouterPolicy p, long[] untrusted)
            {
                var (ids, labels) = c.Conversation.Build(untrusted);
                using var routing = new RoutingContext { Policy = p, Trace = new RoutingTrace() };
                using var cache = model.CreateCache(1, 64);
                using var noGrad = no_grad();
                void Step(long[] chunk, Privilege[] l)
                {
                    using var s = NewDisposeScope();
                    routing.SetPrivileges([l]);
                    model.Forward(tensor(chunk).unsqueeze(0), cache, routing: routing, adapters: MixLoraTestKit.Default);
                }
                Step(ids, labels);
                foreach (var id in answer) Step([id], [Privilege.Assistant]);
                Step(laterTurn, laterTurn.Select(_ => Privilege.User).ToArray());
                foreach (var id in answer2) Step([id], [Privilege.Assistant]);
                Assert.Equal(1 + answer.Length + 1 + answer2.Length, routing.Trace!.StepCount);
                return routing.Trace.Row(0);
            }
            var a = Run(policy, c.Conversation.Untrusted);
            var b = Run(policy, c.OtherUntrusted);
            AssertInvariant(a, b, c.Conversation.PrefixLength, c.ToString());

            var fa = Run(FreeRouterPolicy.Instance, c.Conversation.Untrusted);
            var fb = Run(FreeRouterPolicy.Instance, c.OtherUntrusted);
            cases++;
            int after = c.Conversation.SuffixLength + answer.Length + laterTurn.Length + answer2.Length;
            if (SuffixChanged(fa, fb, after, ref decisions, ref changed)) freeChanged++;
        }, iter: 40, threads: 1);
        double rate = (double)freeChanged / cases;
        output.WriteLine($"privileged: {cases} cases invariant over decoding and a later turn; free: routing after the untrusted span changed in {freeChanged}/{cases} cases ({rate:P0}), {changed}/{decisions} (token, layer) decisions");
        Assert.True(rate >= 0.5, $"free routing changed in only {rate:P0} of the cases");
    }
}
