using CsCheck;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Modeling;
using Xunit.Abstractions;
using static LoraMix.Tests.Routing.RoutingTestKit;
using static TorchSharp.torch;

namespace LoraMix.Tests.Routing;

/// <summary>
/// X-LoRA's hardened scalings over random conversations and random tiny X-LoRA models (3 experts, dense or top-k heads,
/// layerwise or not): under <c>router_policy: privileged</c>, changing the untrusted content (ids and length) leaves the
/// scalings of every privileged-prefix token unchanged, and every token from the first untrusted one on (later turns and
/// generated tokens included) gets one frozen scaling tensor — the last privileged token's (or their mean, pooled), or
/// uniform 1/N when the prompt starts untrusted — in a left-padded batch and in KV-cached decoding with a later user turn.
/// Scalings are compared to 1e-5 (fp32): the scaling pass runs over the whole prompt, so the prefix's hidden states agree
/// mathematically (causal attention) but not necessarily bit for bit across different untrusted lengths. Under
/// <c>free</c> the same change alters the scalings after the untrusted span (the attack surface is real).
/// </summary>
public sealed class XLoraInvariancePropertyTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-xlora-prop-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static readonly Privilege[] PrivilegedRoles = [Privilege.System, Privilege.User, Privilege.Assistant];

    private sealed record Case(int Seed, int Head, bool Pooled, Conversation Conversation, long[] OtherUntrusted, (long[] Ids, Privilege[] Labels) Neighbour)
    {
        public override string ToString() =>
            $"seed {Seed}, head {Head}, {(Pooled ? "pooled" : "last")}, prefix {Conversation.PrefixLength}, untrusted {Conversation.Untrusted.Length} -> {OtherUntrusted.Length}, suffix {Conversation.SuffixLength}";
    }

    // the prefix may be empty (the first token untrusted): the degenerate case of a snapshot with no support
    private static readonly Gen<Case> GenCase =
        Gen.Select(Gen.Int[0, 1_000_000], Gen.Int[0, 2], Gen.Bool,
                Gen.Select(Gen.Int[0, 2], Gen.Int[1, 5]).Array[0, 3], Gen.Int[1, 10], Gen.Int[1, 10],
                Gen.Select(Gen.Int[0, 3], Gen.Int[1, 4]).Array[0, 3], Gen.Int[2, 16])
            .Select((seed, head, pooled, prefix, untrustedA, untrustedB, suffix, neighbour) =>
            {
                var rnd = new Random(seed);
                Segment Seg((int Role, int Length) s, bool allowUntrusted) =>
                    new(allowUntrusted && s.Role == 3 ? Privilege.Untrusted : PrivilegedRoles[s.Role % 3], Ids(rnd, s.Length));
                var conv = new Conversation(prefix.Select(s => Seg(s, false)).ToArray(), Ids(rnd, untrustedA), suffix.Select(s => Seg(s, true)).ToArray());
                var nIds = Ids(rnd, neighbour);
                int cut = rnd.Next(0, neighbour + 1);
                var nLabels = nIds.Select((_, i) => i < cut ? PrivilegedRoles[rnd.Next(3)] : Privilege.Untrusted).ToArray();
                return new Case(seed, head, pooled, conv, Ids(rnd, untrustedB), (nIds, nLabels));
            });

    /// <summary>A tiny model with three random PEFT LoRA experts (written to disk and loaded back, as users do) under a
    /// random X-LoRA head: 0 dense non-layerwise, 1 layerwise depth 2, 2 layerwise top-2 with softmax over the kept.</summary>
    private LlamaForCausalLM Model(int seed, int head, bool pooled, bool privileged)
    {
        var model = TestModels.Random(TestModels.Llama, seed);
        model.eval();
        var rnd = new Random(seed);
        string root = Path.Combine(_dir, $"{seed}-{head}");
        var targets = new[] { new[] { "q_proj", "v_proj" }, ["o_proj", "gate_proj", "down_proj"], ["k_proj", "up_proj", "q_proj"] };
        var experts = new List<(string, string)>();
        for (int i = 0; i < 3; i++)
        {
            string dir = Path.Combine(root, $"e{i}");
            if (!Directory.Exists(dir))
            {
                var cfg = new LoraConfig { R = 2 + i, LoraAlpha = 4, TargetModules = targets[i] };
                LoraAdapters.Attach(model, cfg, "tmp", seed: seed + i);
                using (no_grad())
                    foreach (var (key, t) in LoraAdapters.PeftStateDict(model, "tmp"))
                        if (key.Contains("lora_B")) t.copy_(randn(t.shape, generator: new TorchSharp.torch.Generator((ulong)(seed * 7 + i))) * 0.3);
                LoraAdapters.Save(model, cfg, dir, "tmp");
                LoraAdapters.Remove(model, "tmp");
            }
            experts.Add(($"e{i}", dir));
        }
        var config = new XLoraConfig
        {
            HiddenSize = TestModels.Llama.HiddenSize, Adapters = experts,
            LayerwiseScalings = head > 0, XLoraDepth = head == 1 ? 2 : 1, XLoraSize = 16, XLoraDropoutP = 0.2,
            TopKLora = head == 2 ? 2 : null, EnableSoftmaxTopk = head == 2,
            RouterPolicy = privileged ? MixLoraConfig.PrivilegedPolicy : MixLoraConfig.FreePolicy,
            PrivilegedSnapshot = pooled && privileged ? MixLoraConfig.PooledSnapshot : MixLoraConfig.LastSnapshot,
        };
        var adapter = XLoraAdapters.Create(model, config, "xl", seed: seed);
        using (no_grad())
            foreach (var lin in adapter.Linears) lin.weight!.mul_(6);   // decisive scalings
        return model;
    }

    /// <summary>Scalings [T, L, N] of row <paramref name="row"/> over every forward call of a run, concatenated along T.</summary>
    private sealed class Recorder
    {
        private readonly List<Tensor> _calls = [];
        public void Observe(string name, Tensor s) => _calls.Add(s.cpu().clone().DetachFromDisposeScope());
        public Tensor Row(int row, long[]? realFrom = null) => cat(_calls.Select(c => c[row]).ToArray(), 0);
    }

    private static void AssertClose(Tensor expected, Tensor actual, string what)
    {
        double err = (expected - actual).abs().max().item<float>();
        Assert.True(err <= 1e-5, $"{what}: max difference {err:E2}");
    }

    /// <summary>Privileged: prefix positions equal across runs; every later position equals the frozen snapshot.</summary>
    private static void AssertInvariant(Tensor a, Tensor b, int prefix, bool pooled, string what)
    {
        if (prefix > 0) AssertClose(a.narrow(0, 0, prefix), b.narrow(0, 0, prefix), $"{what}: prefix");
        var expected = prefix == 0 ? full_like(a[0], 1.0 / a.shape[2])
            : pooled ? a.narrow(0, 0, prefix).mean([0L]) : a[prefix - 1];
        for (int t = prefix; t < a.shape[0]; t++) AssertClose(expected, a[t], $"{what}: run A frozen token {t}");
        for (int t = prefix; t < b.shape[0]; t++) AssertClose(expected, b[t], $"{what}: run B frozen token {t}");
    }

    private static bool SuffixChanged(Tensor a, Tensor b, int suffix) =>
        suffix > 0 && (a.narrow(0, a.shape[0] - suffix, suffix) - b.narrow(0, b.shape[0] - suffix, suffix)).abs().max().item<float>() > 1e-4;

    [Fact]
    public void PrefillInALeftPaddedBatch()
    {
        int cases = 0, withSuffix = 0, freeChanged = 0;
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            using var model = Model(c.Seed, c.Head, c.Pooled, privileged: true);
            (Tensor Row0, Tensor Row1) Prefill(LlamaForCausalLM m, params (long[] Ids, Privilege[] Labels)[] rows)
            {
                var rec = new Recorder();
                using var routing = new RoutingContext { OnScalings = rec.Observe };
                var (ids, mask) = Pad(rows.Select(r => r.Ids).ToArray());
                routing.SetPrivileges(rows.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
                using (no_grad()) m.Forward(ids, attentionMask: mask, routing: routing, adapters: AdapterSelection.Of("xl"));
                long width = ids.shape[1];
                Tensor Real(int r) => rec.Row(r).narrow(0, width - rows[r].Ids.Length, rows[r].Ids.Length);
                return (Real(0), rows.Length > 1 ? Real(1) : Real(0));
            }
            var rowA = c.Conversation.Build();
            var rowB = c.Conversation.Build(c.OtherUntrusted);
            var (a, na) = Prefill(model, rowA, c.Neighbour);
            var (b, nb) = Prefill(model, rowB, c.Neighbour);
            AssertInvariant(a, b, c.Conversation.PrefixLength, c.Pooled, c.ToString());
            AssertClose(na, nb, $"{c}: the neighbour row");

            using var free = Model(c.Seed, c.Head, c.Pooled, privileged: false);
            var (fa, _) = Prefill(free, rowA);
            var (fb, _) = Prefill(free, rowB);
            cases++;
            if (c.Conversation.SuffixLength == 0) return;
            withSuffix++;
            if (SuffixChanged(fa, fb, c.Conversation.SuffixLength)) freeChanged++;
        }, iter: 40, threads: 1);
        double rate = (double)freeChanged / withSuffix;
        output.WriteLine($"privileged: {cases} cases invariant; free: scalings after the untrusted span changed in {freeChanged}/{withSuffix} cases ({rate:P0})");
        Assert.True(withSuffix >= 15, $"only {withSuffix} cases had tokens after the untrusted span");
        Assert.True(rate >= 0.5, $"free scalings changed in only {rate:P0} of the cases");
    }

    [Fact]
    public void KvCachedDecodingAndALaterUserTurn()
    {
        int cases = 0, freeChanged = 0;
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            var rnd = new Random(c.Seed + 1);
            long[] answer = Ids(rnd, 3), laterTurn = Ids(rnd, 1 + rnd.Next(4)), answer2 = Ids(rnd, 2);
            Tensor Run(LlamaForCausalLM model, long[] untrusted)
            {
                var (ids, labels) = c.Conversation.Build(untrusted);
                var rec = new Recorder();
                using var routing = new RoutingContext { OnScalings = rec.Observe };
                using var cache = model.CreateCache(1, 64);
                using var noGrad = no_grad();
                void Step(long[] chunk, Privilege[] l)
                {
                    using var s = NewDisposeScope();
                    routing.SetPrivileges([l]);
                    model.Forward(tensor(chunk).unsqueeze(0), cache, routing: routing, adapters: AdapterSelection.Of("xl"));
                }
                Step(ids, labels);
                foreach (var id in answer) Step([id], [Privilege.Assistant]);
                Step(laterTurn, laterTurn.Select(_ => Privilege.User).ToArray());
                foreach (var id in answer2) Step([id], [Privilege.Assistant]);
                return rec.Row(0);
            }
            using (var model = Model(c.Seed, c.Head, c.Pooled, privileged: true))
            {
                var a = Run(model, c.Conversation.Untrusted);
                var b = Run(model, c.OtherUntrusted);
                Assert.Equal(c.Conversation.Build().Ids.Length + answer.Length + laterTurn.Length + answer2.Length, (int)a.shape[0]);
                AssertInvariant(a, b, c.Conversation.PrefixLength, c.Pooled, c.ToString());
            }
            using var free = Model(c.Seed, c.Head, c.Pooled, privileged: false);
            var fa = Run(free, c.Conversation.Untrusted);
            var fb = Run(free, c.OtherUntrusted);
            cases++;
            if (SuffixChanged(fa, fb, c.Conversation.SuffixLength + answer.Length + laterTurn.Length + answer2.Length)) freeChanged++;
        }, iter: 30, threads: 1);
        double rate = (double)freeChanged / cases;
        output.WriteLine($"privileged: {cases} cases invariant over decoding and a later turn; free: changed in {freeChanged}/{cases} cases ({rate:P0})");
        Assert.True(rate >= 0.5, $"free scalings changed in only {rate:P0} of the cases");
    }

    [Fact]
    public void APrivilegedHeadRefusesToRunWithoutLabels()
    {
        using var scope = NewDisposeScope();
        using var model = Model(3, 0, pooled: false, privileged: true);
        var ids = tensor(new long[] { 5, 6, 7 }).unsqueeze(0);
        var e = Assert.Throws<InvalidOperationException>(() => model.Forward(ids, adapters: AdapterSelection.Of("xl")));
        Assert.Contains("privilege labels", e.Message);
        using var routing = new RoutingContext();
        Assert.Throws<InvalidOperationException>(() => model.Forward(ids, routing: routing, adapters: AdapterSelection.Of("xl")));
        // a free override through the routing context is an explicit choice, as for MixLoRA
        using var free = new RoutingContext { Policy = FreeRouterPolicy.Instance };
        Assert.Equal(3, model.Forward(ids, routing: free, adapters: AdapterSelection.Of("xl")).shape[1]);
    }
}
