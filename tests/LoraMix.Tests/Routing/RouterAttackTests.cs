using LoraMix.Evaluation;
using LoraMix.Routing;
using LoraMix.Tokenization;
using Xunit.Abstractions;
using static LoraMix.Tests.Routing.RoutingTestKit;
using static TorchSharp.torch;

namespace LoraMix.Tests.Routing;

/// <summary>
/// The router attack on random tiny MixLoRA models: an adversary controlling only the untrusted span searches (greedy
/// coordinate search with HotFlip candidates, bounded budget) for ids that make a random target expert the top choice of
/// a random layer for every token after the span. Under <c>free</c> it succeeds in a good fraction of trials; under
/// <c>privileged</c> exactly when the target already is the frozen snapshot's top choice (the baseline), never otherwise.
/// </summary>
public sealed class RouterAttackTests(ITestOutputHelper output)
{
    private const int Trials = 24;

    [Fact]
    public void TheAttackSucceedsUnderFreeAndNeverBeyondTheBaselineUnderPrivileged()
    {
        // ~1,000 small forward passes: on a loaded 2-core machine libtorch's intra-op threads make them 10-30x slower
        // than one thread (measured); the setting is process-wide and only affects speed
        int threads = get_num_threads();
        set_num_threads(1);
        try
        {
            Attack();
        }
        finally
        {
            set_num_threads(threads);
        }
    }

    private void Attack()
    {
        int freeSuccess = 0, privilegedSuccess = 0, baseline = 0, freeInitial = 0;
        for (int trial = 0; trial < Trials; trial++)
        {
            using var scope = NewDisposeScope();
            var rnd = new Random(1000 + trial);
            using var model = Model(strategy: trial % 2 == 0 ? 0 : 2, seed: 500 + trial);   // top-2 and top-p
            var conv = new Conversation(
                [new Segment(Privilege.System, Ids(rnd, 4)), new Segment(Privilege.User, Ids(rnd, 4))],
                Ids(rnd, 8),
                [new Segment(Privilege.User, Ids(rnd, 3))]);
            var (ids, labels) = conv.Build();
            var options = new RouterAttackOptions
            {
                TargetLayer = rnd.Next(3), TargetExpert = rnd.Next(4), Budget = 12, Candidates = 32, TopTokens = 16, Seed = trial,
            };
            var intIds = ids.Select(x => (int)x).ToList();

            var free = RouterAttack.Run(model, intIds, labels, FreeRouterPolicy.Instance, options);
            var priv = RouterAttack.Run(model, intIds, labels, PrivilegedRouterPolicy.Last, options);
            output.WriteLine($"trial {trial}: layer {options.TargetLayer} expert {options.TargetExpert}: free {free.InitialFraction:F2} -> {free.AchievedFraction:F2} " +
                             $"({free.Iterations} it, {free.Evaluations} ev); privileged {priv.InitialFraction:F2} -> {priv.AchievedFraction:F2}");

            // the baseline: the frozen decision's top expert in the target layer, from an ordinary privileged prefill
            var frozen = Prefill(model, PrivilegedRouterPolicy.Last, (ids, labels))[0][conv.PrefixLength];
            bool isSnapshotChoice = frozen.Layers[options.TargetLayer].Experts[0] == options.TargetExpert;
            Assert.Equal(isSnapshotChoice, priv.Success);
            Assert.Equal(isSnapshotChoice ? 1.0 : 0.0, priv.InitialFraction);
            Assert.Equal(priv.InitialFraction, priv.AchievedFraction);
            // only untrusted positions were changed
            for (int i = 0; i < ids.Length; i++)
                if (labels[i] != Privilege.Untrusted)
                {
                    Assert.Equal(intIds[i], free.Ids[i]);
                    Assert.Equal(intIds[i], priv.Ids[i]);
                }
            if (free.Success) freeSuccess++;
            if (free.InitialFraction >= 1) freeInitial++;
            if (priv.Success) privilegedSuccess++;
            if (isSnapshotChoice) baseline++;
        }
        output.WriteLine($"attack success over {Trials} trials: free {freeSuccess}/{Trials} (already true before the attack: {freeInitial}), " +
                         $"privileged {privilegedSuccess}/{Trials} = baseline {baseline}/{Trials}");
        Assert.Equal(baseline, privilegedSuccess);
        Assert.True(freeSuccess > privilegedSuccess, $"free {freeSuccess} vs privileged {privilegedSuccess}");
        Assert.True(freeSuccess >= Trials / 3, $"the attack succeeded in only {freeSuccess}/{Trials} free trials");
    }
}
