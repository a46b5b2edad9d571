using CsCheck;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Modeling;
using LoraMix.Tests.Routing;
using LoraMix.Tokenization;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

/// <summary>
/// Adapters per call: random batches that mix rows for the base model, three LoRA adapters (ranks 2, 8 and 4; different
/// targets, one attached after the mixtures), two MixLoRA adapters (one free, one privileged, with different expert
/// counts and strategies) and weighted compositions give every row the logits of that row computed alone — in a
/// left-padded prefill and in KV-cached decoding steps — and greedy generation of the mixed batch equals one-at-a-time
/// generation token for token. The privileged rows keep the routing guarantee inside mixed batches.
/// </summary>
public sealed class MixedBatchPropertyTests(ITestOutputHelper output)
{
    private static readonly Privilege[] PrivilegedRoles = [Privilege.System, Privilege.User, Privilege.Assistant];

    /// <summary>fp64 model: a row alone and the same row in a padded mixed batch agree to rounding (≈1e-15 relative).</summary>
    private const double Tolerance = 1e-9;

    private static readonly AdapterChoice[] Choices =
    [
        AdapterChoice.Base, AdapterChoice.Of("l1"), AdapterChoice.Of("l2"), AdapterChoice.Of("l3"), AdapterChoice.Of("mfree"),
        AdapterChoice.Of("mpriv"), AdapterChoice.Compose(new AdapterTerm("l1", 0.5), new AdapterTerm("l2", 1.5)),
        AdapterChoice.Compose(new AdapterTerm("l1", 0.7), new AdapterTerm("mpriv")),
    ];

    /// <summary>The shared model: random fp64 weights; every adapter's B (and router) random, so each one matters.</summary>
    private static LlamaForCausalLM BuildModel()
    {
        var model = TestModels.Random(TestModels.Llama, 91, ScalarType.Float64);
        LoraAdapters.Attach(model, new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ["q_proj", "v_proj"] }, "l1", seed: 1);
        LoraAdapters.Attach(model, new LoraConfig { R = 8, LoraAlpha = 16, AllLinear = true, TargetModules = null }, "l2", seed: 2);
        MixLoraAdapters.Attach(model, MixLoraTestKit.Config() with { RouterPolicy = MixLoraConfig.FreePolicy }, "mfree", seed: 3);
        MixLoraAdapters.Attach(model, MixLoraTestKit.Config(MixLoraConfig.TopKStrategy, experts: 3, topK: 1) with
        {
            RouterPolicy = MixLoraConfig.PrivilegedPolicy, TargetModules = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }, "mpriv", seed: 4);
        // attached after the mixtures: its MLP deltas go into the projections the mixtures share
        LoraAdapters.Attach(model, new LoraConfig { R = 4, LoraAlpha = 4, TargetModules = ["o_proj", "up_proj", "down_proj"] }, "l3", seed: 5);
        using (no_grad())
        {
            int seed = 10;
            foreach (var name in new[] { "l1", "l2", "l3" })
            {
                using var gen = new TorchSharp.torch.Generator((ulong)seed++, CPU);
                foreach (var (key, t) in LoraAdapters.PeftStateDict(model, name))
                    if (key.EndsWith("lora_B.weight", StringComparison.Ordinal)) t.copy_(empty(t.shape).normal_(0, 0.2, gen));
            }
        }
        MixLoraTestKit.Randomize(model, "mfree", 20);
        MixLoraTestKit.Randomize(model, "mpriv", 21);
        model.eval();
        return model;
    }

    private sealed record Row(AdapterChoice Choice, long[] Ids, Privilege[] Labels);

    private sealed record Case(Row[] Rows, long[][] Decode)
    {
        public override string ToString() => string.Join(" | ", Rows.Select(r => $"{r.Choice} ({r.Ids.Length} tokens, untrusted at {Array.IndexOf(r.Labels, Privilege.Untrusted)})"));
    }

    private static Row MakeRow(Random rnd, AdapterChoice choice)
    {
        int prefix = rnd.Next(1, 7), untrusted = rnd.Next(0, 5), suffix = rnd.Next(0, 4);
        var ids = RoutingTestKit.Ids(rnd, prefix + untrusted + suffix);
        var labels = new Privilege[ids.Length];
        for (int i = 0; i < ids.Length; i++)
            labels[i] = i >= prefix && i < prefix + untrusted ? Privilege.Untrusted : PrivilegedRoles[rnd.Next(3)];
        return new Row(choice, ids, labels);
    }

    private static readonly Gen<Case> GenCase =
        Gen.Select(Gen.Int[0, 1_000_000], Gen.Int[0, Choices.Length - 1].Array[2, 5]).Select((seed, picks) =>
        {
            var rnd = new Random(seed);
            var rows = picks.Select(p => MakeRow(rnd, Choices[p])).ToArray();
            var decode = Enumerable.Range(0, 3).Select(_ => RoutingTestKit.Ids(rnd, rows.Length)).ToArray();
            return new Case(rows, decode);
        });

    /// <summary>Prefill logits of each row's real tokens and the logits of each decoding step, for the whole batch.</summary>
    private static (Tensor[] Prefill, Tensor[][] Steps) Run(LlamaForCausalLM model, Row[] rows, long[][] decode, AdapterSelection adapters)
    {
        using var routing = new RoutingContext();
        var (ids, mask) = RoutingTestKit.Pad(rows.Select(r => r.Ids).ToArray());
        long t = ids.shape[1];
        using var cache = model.CreateCache(rows.Length, t + decode.Length);
        routing.SetPrivileges(rows.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
        var logits = model.Forward(ids, cache, mask, routing: routing, adapters: adapters);
        var prefill = rows.Select((r, b) => logits[b].narrow(0, t - r.Ids.Length, r.Ids.Length).clone()).ToArray();
        var steps = new Tensor[decode.Length][];
        for (int s = 0; s < decode.Length; s++)
        {
            routing.SetPrivileges(Privilege.Assistant, rows.Length);
            var step = model.Forward(tensor(decode[s]).view(rows.Length, 1), cache, routing: routing, adapters: adapters);
            steps[s] = Enumerable.Range(0, rows.Length).Select(b => step[b, 0].clone()).ToArray();
        }
        return (prefill, steps);
    }

    private static void AssertClose(Tensor expected, Tensor actual, string what)
    {
        double err = TestModels.RelativeError(actual, expected);
        Assert.True(err < Tolerance, $"{what}: relative error {err:E2}");
    }

    [Fact]
    public void EveryRowOfAMixedBatchComputesWhatItComputesAloneInPrefillAndKvCachedDecoding()
    {
        using var model = BuildModel();
        int cases = 0, mixed = 0;
        var seen = new HashSet<string>();
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var selection = AdapterSelection.PerRow(c.Rows.Select(r => r.Choice));
            var (prefill, steps) = Run(model, c.Rows, c.Decode, selection);
            for (int b = 0; b < c.Rows.Length; b++)
            {
                var row = c.Rows[b];
                var (alonePrefill, aloneSteps) = Run(model, [row], c.Decode.Select(d => new[] { d[b] }).ToArray(), AdapterSelection.Of(row.Choice));
                AssertClose(alonePrefill[0], prefill[b], $"{c}: row {b} ({row.Choice}) prefill");
                for (int s = 0; s < steps.Length; s++) AssertClose(aloneSteps[s][0], steps[s][b], $"{c}: row {b} ({row.Choice}) decoding step {s}");
                seen.Add(row.Choice.ToString());
            }
            cases++;
            if (c.Rows.Select(r => r.Choice).Distinct().Count() > 1) mixed++;
        }, iter: 60, threads: 1);
        output.WriteLine($"{cases} batches ({mixed} mixing adapters), choices seen: {string.Join(", ", seen.Order())}");
        Assert.Equal(Choices.Length, seen.Count);
        Assert.True(mixed >= 45, $"only {mixed} batches mixed adapters");
    }

    [Fact]
    public void TheAdaptersMatter()
    {
        // the test above would pass vacuously if adapters changed nothing: every choice gives other logits than the base
        using var model = BuildModel();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var row = MakeRow(new Random(5), AdapterChoice.Base);
        var logits = Choices.Select(choice => Run(model, [row], [[7]], AdapterSelection.Of(choice)).Prefill[0]).ToArray();
        for (int i = 0; i < Choices.Length; i++)
            for (int j = i + 1; j < Choices.Length; j++)
                Assert.True(TestModels.RelativeError(logits[i], logits[j]) > 1e-3, $"{Choices[i]} and {Choices[j]} give the same logits");
    }

    [Fact]
    public void DegenerateChoicesAndTheStatedLimits()
    {
        using var model = BuildModel();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var row = MakeRow(new Random(9), AdapterChoice.Base);
        var ids = tensor(row.Ids).unsqueeze(0);
        Tensor Logits(AdapterSelection? adapters, RoutingContext? routing = null)
        {
            using var r = routing ?? new RoutingContext();
            r.SetPrivileges([row.Labels]);
            return model.Forward(ids, routing: r, adapters: adapters);
        }
        var baseLogits = Logits(null);
        // the base model three ways, and a LoRA at weight 0, are the base model bit for bit
        Assert.True(baseLogits.equal(Logits(AdapterSelection.Base)).all().item<bool>());
        Assert.True(baseLogits.equal(Logits(AdapterSelection.PerRow([AdapterChoice.Base]))).all().item<bool>());
        Assert.True(baseLogits.equal(Logits(AdapterSelection.Of(AdapterChoice.Compose(new AdapterTerm("l2", 0))))).all().item<bool>());
        // a one-row per-row selection is the same as one choice for all rows
        Assert.True(Logits(AdapterSelection.Of("mpriv")).equal(Logits(AdapterSelection.PerRow([AdapterChoice.Of("mpriv")]))).all().item<bool>());

        // the limits stated in docs/ADAPTERS.md fail with a message, before or while the batch runs
        var two = Assert.Throws<ArgumentException>(() => Logits(AdapterSelection.Of(AdapterChoice.Compose(new AdapterTerm("mfree"), new AdapterTerm("mpriv")))));
        Assert.Contains("two MixLoRA", two.Message);
        var weighted = Assert.Throws<ArgumentException>(() => Logits(AdapterSelection.Of(AdapterChoice.Compose(new AdapterTerm("mfree", 0.5)))));
        Assert.Contains("weight 1", weighted.Message);
        var down = Assert.Throws<NotSupportedException>(() => Logits(AdapterSelection.Of(AdapterChoice.Compose(new AdapterTerm("l3"), new AdapterTerm("mfree")))));
        Assert.Contains("down_proj", down.Message);
        var pair = new[] { row, row with { Choice = AdapterChoice.Of("mfree") } };
        var (padded, mask) = RoutingTestKit.Pad(pair.Select(r => r.Ids).ToArray());
        using var collecting = new RoutingContext { Collector = new RouterLogitsCollector() };
        collecting.SetPrivileges(pair.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
        var collector = Assert.Throws<NotSupportedException>(() =>
            model.Forward(padded, attentionMask: mask, routing: collecting, adapters: AdapterSelection.PerRow([AdapterChoice.Of("l1"), AdapterChoice.Of("mfree")])));
        Assert.Contains("collector", collector.Message);
    }

    [Fact]
    public void GreedyGenerationOfAMixedBatchEqualsOneAtATime()
    {
        using var model = BuildModel();
        var generator = new TokenGenerator(model);
        int cases = 0;
        GenCase.Sample(c =>
        {
            using var scope = NewDisposeScope();
            var options = new GenerationOptions { MaxNewTokens = 5, Temperature = 0, StopAtEos = false };
            var prompts = c.Rows.Select(r => (IReadOnlyList<int>)r.Ids.Select(x => (int)x).ToList()).ToList();
            using var routing = new RoutingContext();
            var batched = generator.Generate(prompts, options with { Adapters = AdapterSelection.PerRow(c.Rows.Select(r => r.Choice)) }, routing,
                c.Rows.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
            for (int b = 0; b < c.Rows.Length; b++)
            {
                using var alone = new RoutingContext();
                var single = generator.Generate([prompts[b]], options with { Adapters = AdapterSelection.Of(c.Rows[b].Choice) }, alone,
                    [c.Rows[b].Labels]);
                Assert.True(single[0].Tokens.SequenceEqual(batched[b].Tokens),
                    $"{c}: row {b} ({c.Rows[b].Choice}): alone [{string.Join(",", single[0].Tokens)}], batched [{string.Join(",", batched[b].Tokens)}]");
            }
            cases++;
        }, iter: 30, threads: 1);
        output.WriteLine($"{cases} mixed batches generated token for token as one at a time");
    }

    [Fact]
    public void PrivilegedRowsKeepTheRoutingGuaranteeInsideMixedBatches()
    {
        // row 0 runs the privileged mixture; its untrusted span changes between two runs while the other rows (other
        // adapters, free routing among them) stay the same: every prefix decision is identical, every token from the first
        // untrusted one on gets the frozen decision, in prefill and in KV-cached decoding
        using var model = BuildModel();
        int cases = 0;
        Gen.Select(Gen.Int[0, 1_000_000], Gen.Int[0, Choices.Length - 1].Array[1, 3], Gen.Int[1, 8]).Sample((seed, others, otherLength) =>
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var rnd = new Random(seed);
            int prefix = rnd.Next(1, 6), suffix = rnd.Next(0, 4);
            var conversation = new Conversation(
                [new Segment(PrivilegedRoles[rnd.Next(3)], RoutingTestKit.Ids(rnd, prefix))], RoutingTestKit.Ids(rnd, rnd.Next(1, 6)),
                suffix == 0 ? [] : [new Segment(PrivilegedRoles[rnd.Next(3)], RoutingTestKit.Ids(rnd, suffix))]);
            var otherRows = others.Select(p => MakeRow(rnd, Choices[p])).ToArray();
            var otherUntrusted = RoutingTestKit.Ids(rnd, otherLength);
            var decode = Enumerable.Range(0, 3).Select(_ => RoutingTestKit.Ids(rnd, 1 + otherRows.Length)).ToArray();
            var selection = AdapterSelection.PerRow(otherRows.Select(r => r.Choice).Prepend(AdapterChoice.Of("mpriv")));

            IReadOnlyList<TokenRoute> Trace(long[] untrusted)
            {
                var (ids, labels) = conversation.Build(untrusted);
                var rows = otherRows.Prepend(new Row(AdapterChoice.Of("mpriv"), ids, labels)).ToArray();
                using var routing = new RoutingContext { Trace = new RoutingTrace() };
                var (padded, mask) = RoutingTestKit.Pad(rows.Select(r => r.Ids).ToArray());
                using var cache = model.CreateCache(rows.Length, padded.shape[1] + decode.Length);
                routing.SetPrivileges(rows.Select(r => (IReadOnlyList<Privilege>)r.Labels).ToList());
                model.Forward(padded, cache, mask, routing: routing, adapters: selection);
                foreach (var d in decode)
                {
                    routing.SetPrivileges(Privilege.Assistant, rows.Length);
                    model.Forward(tensor(d).view(rows.Length, 1), cache, routing: routing, adapters: selection);
                }
                return routing.Trace!.Row(0);
            }
            var a = Trace(conversation.Untrusted);
            var b = Trace(otherUntrusted);
            int p = conversation.PrefixLength;
            Assert.All(a, r => Assert.Equal(model.Config.NumHiddenLayers, r.Layers.Count));
            for (int t = 0; t < p; t++) RoutingTestKit.AssertSame(a[t], b[t], $"seed {seed}: prefix token {t}");
            for (int t = p; t < a.Count; t++) RoutingTestKit.AssertSame(a[p], a[t], $"seed {seed}: run A frozen token {t}");
            for (int t = p; t < b.Count; t++) RoutingTestKit.AssertSame(a[p], b[t], $"seed {seed}: run B frozen token {t}");
            cases++;
        }, iter: 60, threads: 1);
        output.WriteLine($"{cases} mixed batches: the privileged row's routing was invariant to its untrusted content");
    }
}
