using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;
using LoraMix.Evaluation;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// The router attack (<see cref="RouterAttack"/>, issue 6) measured on random tiny MixLoRA models, with more trials than
/// <c>RouterAttackTests</c> and the same success definition. Per model seed: a random conversation (system 4 tokens,
/// user 4, an untrusted span of 8, a later user turn of 3), the `tiny` preset with 4 experts (even seeds top-2, odd seeds
/// top-p 0.6), random router weights N(0, 0.5) and random LoRA B; then every (target layer, target expert) pair is a
/// trial. The adversary controls the 8 untrusted ids only; the targets are the 3 tokens after the span; success = the
/// target expert is the top choice (first active slot) of every target token (<see cref="RouterAttackOptions.SuccessFraction"/>
/// 1.0), after a greedy coordinate search with a bounded budget. The same trials run under <c>free</c>,
/// <c>privileged</c> (last) and <c>privileged</c> (pooled).
/// A trial is "baseline" when the un-attacked input already succeeds (<see cref="RouterAttackResult.InitialFraction"/> = 1:
/// under a privileged policy exactly when the target is the frozen snapshot's top choice, which the bench cross-checks
/// against an ordinary traced prefill); the attack's own effect is the success rate over the other trials.
/// </summary>
internal static class RouterAttackBench
{
    private const int Layers = 3, Experts = 4, Budget = 12, Candidates = 32, TopTokens = 16;

    private sealed record PolicyCase(string Key, string Label, IRouterPolicy Policy);

    private sealed class Tally
    {
        public int Trials, Success, Baseline, Flipped, Iterations, Evaluations, BaselineMismatch, Moved, TouchedPrivileged;
        public double Seconds;
    }

    public static void Run(bool quick, string? jsonPath)
    {
        int models = quick ? 2 : 20;
        // ~thousands of small forward passes: one intra-op thread is much faster than several on a loaded 2-core machine
        int threads = get_num_threads();
        set_num_threads(1);
        try
        {
            Measure(models, quick, jsonPath);
        }
        finally
        {
            set_num_threads(threads);
        }
    }

    private static void Measure(int models, bool quick, string? jsonPath)
    {
        var policies = new[]
        {
            new PolicyCase("free", "free", FreeRouterPolicy.Instance),
            new PolicyCase("privileged_last", "privileged (last)", PrivilegedRouterPolicy.Last),
            new PolicyCase("privileged_pooled", "privileged (pooled)", PrivilegedRouterPolicy.Pooled),
        };
        var tallies = policies.ToDictionary(p => p.Key, _ => new Tally());
        Console.WriteLine($"router-attack bench: {models} random tiny MixLoRA models x {Layers} target layers x {Experts} target experts " +
                          $"= {models * Layers * Experts} trials per policy; budget {Budget} iterations x {Candidates} candidates (top {TopTokens} tokens), " +
                          $"libtorch threads {get_num_threads()}");
        var total = Stopwatch.StartNew();
        for (int m = 0; m < models; m++)
        {
            using var scope = NewDisposeScope();
            var rnd = new Random(1000 + m);
            int strategy = m % 2;   // 0: top-2, 1: top-p
            using var model = Model(strategy == 0 ? MixLoraConfig.TopKStrategy : MixLoraConfig.TopPStrategy, seed: 500 + m);
            var prefix = new[] { (Privilege.System, Ids(rnd, 4)), (Privilege.User, Ids(rnd, 4)) };
            var untrusted = Ids(rnd, 8);
            var suffix = Ids(rnd, 3);
            var segments = prefix.Append((Privilege.Untrusted, untrusted)).Append((Privilege.User, suffix)).ToArray();
            var ids = segments.SelectMany(s => s.Item2).ToList();
            var labels = segments.SelectMany(s => s.Item2.Select(_ => s.Item1)).ToList();
            int firstUntrusted = prefix.Sum(s => s.Item2.Length);

            foreach (var pc in policies)
            {
                var tally = tallies[pc.Key];
                // the frozen decision of an ordinary (traced) prefill: the privileged baseline, for the cross-check
                var frozen = pc.Policy is PrivilegedRouterPolicy ? Prefill(model, pc.Policy, ids, labels)[firstUntrusted] : null;
                var sw = Stopwatch.StartNew();
                for (int layer = 0; layer < Layers; layer++)
                    for (int expert = 0; expert < Experts; expert++)
                    {
                        var options = new RouterAttackOptions
                        {
                            TargetLayer = layer, TargetExpert = expert, Budget = Budget, Candidates = Candidates, TopTokens = TopTokens,
                            Seed = m * 100 + layer * Experts + expert,
                        };
                        var r = RouterAttack.Run(model, ids, labels, pc.Policy, options);
                        bool baseline = r.InitialFraction >= options.SuccessFraction;
                        tally.Trials++;
                        if (r.Success) tally.Success++;
                        if (baseline) tally.Baseline++;
                        if (r.Success && !baseline) tally.Flipped++;
                        tally.Iterations += r.Iterations;
                        tally.Evaluations += r.Evaluations;
                        if (r.AchievedFraction != r.InitialFraction) tally.Moved++;
                        for (int i = 0; i < ids.Count; i++)
                            if (labels[i] != Privilege.Untrusted && r.Ids[i] != ids[i]) { tally.TouchedPrivileged++; break; }
                        if (frozen is not null && (frozen.Layers[layer].Experts[0] == expert) != baseline) tally.BaselineMismatch++;
                    }
                tally.Seconds += sw.Elapsed.TotalSeconds;
            }
            Console.WriteLine($"  model {m + 1}/{models} ({(strategy == 0 ? "top-2" : "top-p")}), cumulative: " + string.Join("; ",
                policies.Select(p => $"{p.Key} {tallies[p.Key].Success}/{tallies[p.Key].Trials} (baseline {tallies[p.Key].Baseline})")) +
                $"  [{total.Elapsed.TotalSeconds:F0} s]");
        }

        Console.WriteLine();
        Console.WriteLine($"| policy | trials | baseline (target already on top, no attack) | success, all trials | success beyond baseline (trials not already on top) | routing of targets moved | mean evaluations / trial |");
        Console.WriteLine("|---|---|---|---|---|---|---|");
        var json = new JsonObject();
        foreach (var pc in policies)
        {
            var t = tallies[pc.Key];
            int open = t.Trials - t.Baseline;
            Console.WriteLine($"| {pc.Label} | {t.Trials} | {Rate(t.Baseline, t.Trials)} | {Rate(t.Success, t.Trials)} | {Rate(t.Flipped, open)} | " +
                              $"{t.Moved}/{t.Trials} | {(double)t.Evaluations / t.Trials:F0} |");
            var (bl, bh) = Wilson(t.Baseline, t.Trials);
            var (sl, sh) = Wilson(t.Success, t.Trials);
            var (fl, fh) = Wilson(t.Flipped, open);
            json[pc.Key] = new JsonObject
            {
                ["trials"] = t.Trials, ["baseline"] = t.Baseline, ["baseline_ci95"] = new JsonArray(bl, bh),
                ["success"] = t.Success, ["success_ci95"] = new JsonArray(sl, sh),
                ["success_beyond_baseline"] = t.Flipped, ["not_baseline"] = open, ["success_beyond_baseline_ci95"] = new JsonArray(fl, fh),
                ["moved"] = t.Moved, ["iterations"] = t.Iterations, ["evaluations"] = t.Evaluations, ["seconds"] = t.Seconds,
                ["privileged_ids_changed"] = t.TouchedPrivileged, ["baseline_mismatch_vs_prefill"] = t.BaselineMismatch,
            };
        }
        Console.WriteLine();
        Console.WriteLine("Rates with 95% Wilson intervals. Baseline: the un-attacked input already has the target expert on top for all target tokens.");
        Console.WriteLine("Success beyond baseline: the attack reached it in a trial where the un-attacked input did not.");
        foreach (var pc in policies)
        {
            var t = tallies[pc.Key];
            Console.WriteLine($"{pc.Key}: {t.Seconds:F1} s, {t.Iterations} iterations, {t.Evaluations} evaluations; trials whose privileged ids changed: {t.TouchedPrivileged}" +
                              (pc.Policy is PrivilegedRouterPolicy ? $"; baseline disagreeing with the traced prefill's frozen choice: {t.BaselineMismatch}" : ""));
        }
        Console.WriteLine($"total {total.Elapsed.TotalSeconds:F1} s");
        bool invariant = policies.Where(p => p.Policy is PrivilegedRouterPolicy).All(p =>
            tallies[p.Key].Moved == 0 && tallies[p.Key].BaselineMismatch == 0 && tallies[p.Key].Success == tallies[p.Key].Baseline)
            && tallies.Values.All(t => t.TouchedPrivileged == 0);
        Console.WriteLine(invariant ? "privileged policies: no trial moved the routing of the target tokens (invariance held)"
            : "PRIVILEGED ROUTING MOVED UNDER ATTACK: see the table (this is a bug)");

        if (jsonPath is not null)
        {
            var result = new JsonObject
            {
                ["bench"] = "router-attack", ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"), ["quick"] = quick,
                ["libtorch"] = __version__, ["threads"] = get_num_threads(), ["cores"] = Environment.ProcessorCount,
                ["models"] = models, ["layers"] = Layers, ["experts"] = Experts, ["budget"] = Budget, ["candidates"] = Candidates,
                ["top_tokens"] = TopTokens, ["untrusted_tokens"] = 8, ["target_tokens"] = 3, ["success_fraction"] = 1.0,
                ["invariance_held"] = invariant, ["seconds"] = total.Elapsed.TotalSeconds, ["policies"] = json,
            };
            File.WriteAllText(jsonPath, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            Console.WriteLine($"results written to {jsonPath}");
        }
    }

    private static string Rate(int x, int n)
    {
        if (n == 0) return "– (0 trials)";
        var (lo, hi) = Wilson(x, n);
        return $"{x}/{n} = {100.0 * x / n:F1}% [{100 * lo:F1}, {100 * hi:F1}]";
    }

    /// <summary>The 95% Wilson score interval of a binomial proportion x/n.</summary>
    internal static (double Low, double High) Wilson(int x, int n, double z = 1.959963984540054)
    {
        if (n == 0) return (0, 1);
        double p = (double)x / n, z2 = z * z;
        double denom = 1 + z2 / n;
        double center = (p + z2 / (2.0 * n)) / denom;
        double half = z / denom * Math.Sqrt(p * (1 - p) / n + z2 / (4.0 * n * n));
        return (Math.Max(0, center - half), Math.Min(1, center + half));
    }

    private static int[] Ids(Random rnd, int count) => Enumerable.Range(0, count).Select(_ => rnd.Next(3, 512)).ToArray();

    /// <summary>The `tiny` preset with every parameter random (norms near 1) and a MixLoRA of 4 experts on all seven
    /// projections whose routers are N(0, 0.5) and LoRA B N(0, 0.1): routing far from ties, as in the routing tests.</summary>
    private static LlamaForCausalLM Model(string strategy, long seed)
    {
        var model = new LlamaForCausalLM(ModelPresets.Get("tiny"), CPU, ScalarType.Float32);
        using (var gen = new TorchSharp.torch.Generator((ulong)seed, CPU))
        using (no_grad())
            foreach (var (name, p) in model.state_dict())
            {
                using var scope = NewDisposeScope();
                var r = empty(p.shape, dtype: ScalarType.Float32).normal_(0, 1, gen);
                p.copy_(name.EndsWith("norm.weight", StringComparison.Ordinal) ? 1 + 0.1 * r : 0.08 * r);
            }
        var config = new MixLoraConfig
        {
            R = 4, LoraAlpha = 8, LoraDropout = 0.05, NumExperts = Experts, TopK = 2, TopP = 0.6, RoutingStrategy = strategy,
            ExpertCapacity = 32, JitterNoise = 0.0,
            TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
        };
        MixLoraAdapters.Attach(model, config, "default", seed);
        using (var gen = new TorchSharp.torch.Generator((ulong)(seed + 100), CPU))
        using (no_grad())
            foreach (var (key, t) in MixLoraAdapters.StateDict(model, "default"))
            {
                if (key.EndsWith("moe_gate.weight", StringComparison.Ordinal)) t.copy_(empty(t.shape).normal_(0, 0.5, gen));
                else if (key.EndsWith("lora_B.weight", StringComparison.Ordinal)) t.copy_(empty(t.shape).normal_(0, 0.1, gen));
            }
        model.eval();
        return model;
    }

    /// <summary>One uncached traced forward; the routes of the row's tokens.</summary>
    private static IReadOnlyList<TokenRoute> Prefill(LlamaForCausalLM model, IRouterPolicy policy, IReadOnlyList<int> ids, IReadOnlyList<Privilege> labels)
    {
        using var scope = NewDisposeScope();
        using var routing = new RoutingContext { Policy = policy, Trace = new RoutingTrace() };
        routing.SetPrivileges([labels]);
        using (no_grad()) model.Forward(tensor(ids.Select(x => (long)x).ToArray(), [1, ids.Count]), routing: routing, adapters: AdapterSelection.Of("default"));
        return routing.Trace!.Row(0);
    }
}
