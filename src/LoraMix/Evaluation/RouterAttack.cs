using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Evaluation;

/// <summary>Settings of a <see cref="RouterAttack"/>.</summary>
public sealed record RouterAttackOptions
{
    /// <summary>The MixLoRA adapter whose router is attacked; null: the model's only MixLoRA adapter.</summary>
    public string? Adapter { get; init; }

    /// <summary>The decoder layer whose routing the adversary wants to force.</summary>
    public int TargetLayer { get; init; }

    /// <summary>The expert to force: success means it is the top choice (first active slot) of the target tokens.</summary>
    public int TargetExpert { get; init; }

    /// <summary>Iterations of the greedy coordinate search (each: one gradient, one batched exact evaluation).</summary>
    public int Budget { get; init; } = 32;

    /// <summary>Candidate substitutions evaluated per iteration (sampled from the top gradient candidates).</summary>
    public int Candidates { get; init; } = 32;

    /// <summary>Best tokens per position by the first-order (HotFlip) gain that candidates are drawn from.</summary>
    public int TopTokens { get; init; } = 16;

    /// <summary>Positions the adversary controls; null = every <see cref="Privilege.Untrusted"/> position.</summary>
    public IReadOnlyList<int>? Positions { get; init; }

    /// <summary>Positions whose routing the adversary wants to force; null = every position after the last controlled
    /// one.</summary>
    public IReadOnlyList<int>? TargetPositions { get; init; }

    /// <summary>The attack succeeds when at least this fraction of the target tokens has the target expert on top.</summary>
    public double SuccessFraction { get; init; } = 1.0;

    /// <summary>Token ids the adversary may not use (e.g. special tokens the renderer strips), besides none.</summary>
    public IReadOnlyCollection<int> ForbiddenTokenIds { get; init; } = [];

    /// <summary>Seeds the choice of candidate positions and tokens.</summary>
    public long Seed { get; init; }
}

/// <summary>The outcome of a <see cref="RouterAttack"/>.</summary>
/// <param name="Success">The target fraction was reached (possibly before any substitution).</param>
/// <param name="Iterations">Search iterations run (0 when the unmodified input already succeeded).</param>
/// <param name="Evaluations">Exact candidate evaluations (forward passes of one sequence).</param>
/// <param name="InitialFraction">Fraction of target tokens with the target expert on top before the attack.</param>
/// <param name="AchievedFraction">The same after the attack.</param>
/// <param name="Ids">The final token ids (the input with the accepted substitutions).</param>
public sealed record RouterAttackResult(bool Success, int Iterations, int Evaluations, double InitialFraction, double AchievedFraction,
    IReadOnlyList<int> Ids);

/// <summary>
/// An adaptive attack on the router: an adversary who controls only some (untrusted) token ids searches for ids that make
/// a chosen expert the top choice of a chosen layer for the tokens after them. Greedy coordinate search with gradients
/// (GCG/HotFlip style): per iteration, the gradient of the objective with respect to the one-hot inputs ranks
/// substitutions by first-order gain; a batch of (position, token) candidates drawn from the best is evaluated exactly;
/// the best is kept when it improves (target fraction first, then the objective). The objective is the mean log
/// probability of the target expert over the target tokens under the routing distribution each token was routed with
/// (<see cref="RoutingDecision.Logits"/>: a frozen token's is the snapshot), so the attack sees exactly what the policy
/// lets the input influence.
/// </summary>
public static class RouterAttack
{
    /// <param name="model">A model with an active MixLoRA adapter (run in eval mode; restored afterwards).</param>
    /// <param name="ids">The sequence.</param>
    /// <param name="privileges">Its privilege labels.</param>
    /// <param name="policy">The router policy to attack; null = the adapter's configured one.</param>
    /// <param name="options">Target, budget, positions, seed.</param>
    public static RouterAttackResult Run(LlamaForCausalLM model, IReadOnlyList<int> ids, IReadOnlyList<Privilege> privileges,
        IRouterPolicy? policy, RouterAttackOptions options)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(ids);
        ArgumentNullException.ThrowIfNull(privileges);
        ArgumentNullException.ThrowIfNull(options);
        int n = ids.Count, vocab = model.Config.VocabSize;
        if (privileges.Count != n) throw new ArgumentException($"{n} ids but {privileges.Count} privilege labels");
        var mixtures = model.Adapters.Where(a => a.Value == MixLoraAdapters.MethodName).Select(a => a.Key).ToList();
        string adapter = options.Adapter ?? (mixtures.Count == 1 ? mixtures[0]
            : throw new ArgumentException(mixtures.Count == 0 ? "the model has no MixLoRA adapter to attack"
                : $"the model has {mixtures.Count} MixLoRA adapters ({string.Join(", ", mixtures)}); say which in RouterAttackOptions.Adapter"));
        var selection = AdapterSelection.Of(adapter);
        var blocks = MixLoraAdapters.Blocks(model);
        if (!blocks.Any(b => b.Layer == options.TargetLayer && b.HasAdapter(adapter)))
            throw new ArgumentException($"layer {options.TargetLayer} has no MixLoRA adapter '{adapter}'");
        var positions = (options.Positions ?? Enumerable.Range(0, n).Where(i => privileges[i] == Privilege.Untrusted).ToList()).Distinct().Order().ToArray();
        if (positions.Length == 0) throw new ArgumentException("the adversary controls no position (no untrusted token and no Positions given)");
        if (positions[0] < 0 || positions[^1] >= n) throw new ArgumentException("a controlled position is outside the sequence");
        var targets = (options.TargetPositions ?? Enumerable.Range(positions[^1] + 1, n - positions[^1] - 1).ToList()).Distinct().Order().ToArray();
        if (targets.Length == 0) throw new ArgumentException("no target position (nothing follows the controlled positions)");
        if (targets[0] < 0 || targets[^1] >= n) throw new ArgumentException("a target position is outside the sequence");
        if (options.Budget < 0 || options.Candidates < 1 || options.TopTokens < 1)
            throw new ArgumentException("budget must be >= 0, candidates and top tokens >= 1");
        var forbidden = new HashSet<int>(options.ForbiddenTokenIds);
        foreach (var p in positions)
            if (forbidden.Contains(ids[p])) throw new ArgumentException($"position {p} holds a forbidden token");

        var rnd = new Random((int)(options.Seed ^ (options.Seed >> 32)));
        bool wasTraining = model.training;
        model.eval();
        try
        {
            var current = ids.ToArray();
            var (fraction, objective) = Evaluate([current])[0];
            double initial = fraction;
            int iterations = 0, evaluations = 1;
            while (fraction < options.SuccessFraction && iterations < options.Budget)
            {
                iterations++;
                var top = TopSubstitutions(current);
                var candidates = new List<int[]>();
                for (int c = 0; c < options.Candidates; c++)
                {
                    int p = positions[rnd.Next(positions.Length)];
                    var choices = top[p];
                    if (choices.Length == 0) continue;
                    var cand = (int[])current.Clone();
                    cand[p] = choices[rnd.Next(choices.Length)];
                    candidates.Add(cand);
                }
                if (candidates.Count == 0) break;
                var scores = Evaluate(candidates);
                evaluations += candidates.Count;
                int best = -1;
                for (int c = 0; c < scores.Length; c++)
                    if (Better(scores[c], best < 0 ? (fraction, objective) : scores[best])) best = c;
                if (best >= 0 && Better(scores[best], (fraction, objective)))
                {
                    current = candidates[best];
                    (fraction, objective) = scores[best];
                }
            }
            return new RouterAttackResult(fraction >= options.SuccessFraction, iterations, evaluations, initial, fraction, current);
        }
        finally
        {
            if (wasTraining) model.train();
        }

        static bool Better((double F, double O) a, (double F, double O) b) => a.F > b.F || (a.F == b.F && a.O > b.O + 1e-6);

        RoutingContext Context(int batch)
        {
            var routing = new RoutingContext { Policy = policy, Collector = new RouterLogitsCollector() };
            routing.SetPrivileges(Enumerable.Repeat(privileges, batch).ToList());
            return routing;
        }

        // Exact: the fraction of target tokens whose top expert is the target, and the mean log-probability objective.
        (double Fraction, double Objective)[] Evaluate(List<int[]> batch)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            using var routing = Context(batch.Count);
            var input = tensor(batch.SelectMany(x => x.Select(v => (long)v)).ToArray(), [batch.Count, n], device: model.Device);
            model.ForwardHidden(input, routing: routing, adapters: selection);
            var record = routing.Collector!.Records.Single(r => r.Layer == options.TargetLayer);
            var idx = tensor(targets.Select(t => (long)t).ToArray(), device: record.Experts.device);
            var experts = record.Experts.index_select(1, idx);                             // [C, M, K]
            var active = record.Active?.index_select(1, idx);
            // the first active slot: slots are ordered by weight (top-k, top-p sorted; switch has one)
            Tensor topExpert;
            if (active is null) topExpert = experts.select(-1, 0);
            else
            {
                var firstActive = active.to(ScalarType.Int64).argmax(-1, keepdim: true);   // first true
                topExpert = experts.gather(-1, firstActive).squeeze(-1).masked_fill(active.any(-1).logical_not(), -1);
            }
            var hit = topExpert.eq(options.TargetExpert).to(ScalarType.Float64).mean([1L]).cpu().data<double>().ToArray();
            var logp = nn.functional.log_softmax(record.Logits.index_select(1, idx).to(ScalarType.Float64), -1)
                .select(-1, options.TargetExpert).mean([1L]).cpu().data<double>().ToArray();
            return hit.Zip(logp).ToArray();
        }

        // HotFlip: the gradient of the objective w.r.t. the one-hot rows ranks each token at each controlled position.
        int[][] TopSubstitutions(int[] current)
        {
            using var scope = NewDisposeScope();
            using var routing = Context(1);
            var embedding = model.Model.EmbedTokens.Weight;
            var oneHot = zeros([n, vocab], dtype: embedding.dtype, device: model.Device);
            oneHot.scatter_(1, tensor(current.Select(v => (long)v).ToArray(), device: model.Device).unsqueeze(1),
                ones([n, 1], dtype: embedding.dtype, device: model.Device));
            oneHot.requires_grad_(true);
            var embeds = oneHot.matmul(embedding.detach()).unsqueeze(0);
            using (enable_grad())
            {
                model.ForwardEmbeddings(embeds, routing: routing, adapters: selection);
                var record = routing.Collector!.Records.Single(r => r.Layer == options.TargetLayer);
                var idx = tensor(targets.Select(t => (long)t).ToArray(), device: record.Logits.device);
                var objective = nn.functional.log_softmax(record.Logits.index_select(1, idx), -1).select(-1, options.TargetExpert).mean();
                var top = new int[n][];
                if (!objective.requires_grad)
                {
                    // no path from the inputs to the objective (e.g. frozen routing): every substitution is first-order neutral
                    var all = Enumerable.Range(0, vocab).Where(v => !forbidden.Contains(v)).ToArray();
                    foreach (var p in positions) top[p] = all.OrderBy(_ => rnd.Next()).Take(options.TopTokens).ToArray();
                    return top;
                }
                var grad = autograd.grad([objective], [oneHot], allow_unused: true)[0];
                if (grad is null || grad.IsInvalid) grad = zeros_like(oneHot);
                var gain = grad - grad.gather(1, tensor(current.Select(v => (long)v).ToArray()).unsqueeze(1));   // vs the current token
                foreach (var v in forbidden) gain.select(1, v).fill_(double.NegativeInfinity);
                gain.scatter_(1, tensor(current.Select(v => (long)v).ToArray(), device: gain.device).unsqueeze(1),
                    full([n, 1], double.NegativeInfinity, dtype: gain.dtype, device: gain.device));   // not the current token
                int k = Math.Min(options.TopTokens, vocab - 1);
                var best = gain.topk(k, 1).indexes.cpu().data<long>().ToArray();
                foreach (var p in positions)
                    top[p] = Enumerable.Range(0, k).Select(j => (int)best[p * k + j]).Where(v => !forbidden.Contains(v)).ToArray();
                return top;
            }
        }
    }
}
