using LoraMix.Data;
using LoraMix.Inference;

namespace LoraMix.Evaluation;

/// <summary>One scored generation.</summary>
public sealed record ExactMatchSample(DatasetRecord Record, string Output, bool Correct);

/// <summary>Exact-match accuracy overall and per family (records without a family count under "all").</summary>
public sealed record ExactMatchReport(int Correct, int Total, IReadOnlyDictionary<string, (int Correct, int Total)> ByFamily,
    IReadOnlyList<ExactMatchSample> Samples)
{
    /// <summary>Correct / Total (0 when empty).</summary>
    public double Accuracy => Total == 0 ? 0 : (double)Correct / Total;

    /// <summary>Accuracy per family.</summary>
    public IReadOnlyDictionary<string, double> AccuracyByFamily =>
        ByFamily.ToDictionary(kv => kv.Key, kv => kv.Value.Total == 0 ? 0 : (double)kv.Value.Correct / kv.Value.Total);
}

/// <summary>
/// Greedy generation on each record's prompt (the conversation without its final assistant message), scored by
/// <see cref="TaskScorer.ExactMatch"/> against the record's answer.
/// </summary>
public static class ExactMatchEvaluator
{
    /// <summary>Scores every record that has an expected answer; records without one are ignored.</summary>
    public static ExactMatchReport Evaluate(ChatEngine engine, IReadOnlyList<DatasetRecord> records, int maxNewTokens = 96,
        int batchSize = 16, Action<int, int>? progress = null, CancellationToken cancellationToken = default, Modeling.AdapterChoice? adapters = null)
    {
        ArgumentNullException.ThrowIfNull(engine);
        ArgumentNullException.ThrowIfNull(records);
        var scored = records.Where(r => r.Messages is not null && r.ExpectedAnswer is not null).ToList();
        var prompts = scored.Select(r => engine.RenderForGeneration(r.PromptMessages)).ToList();
        var options = new GenerationOptions
        {
            MaxNewTokens = maxNewTokens, Temperature = 0, Adapters = adapters is null ? null : Modeling.AdapterSelection.Of(adapters),
        };
        var outputs = engine.GenerateBatch(prompts, options, batchSize, done => progress?.Invoke(done, scored.Count), cancellationToken);
        var samples = new List<ExactMatchSample>(scored.Count);
        var byFamily = new SortedDictionary<string, (int Correct, int Total)>(StringComparer.Ordinal);
        for (int i = 0; i < scored.Count; i++)
        {
            bool ok = TaskScorer.ExactMatch(outputs[i].Text, scored[i].ExpectedAnswer!);
            samples.Add(new ExactMatchSample(scored[i], outputs[i].Text, ok));
            string family = scored[i].Family ?? "all";
            var (c, t) = byFamily.GetValueOrDefault(family);
            byFamily[family] = (c + (ok ? 1 : 0), t + 1);
        }
        return new ExactMatchReport(samples.Count(s => s.Correct), samples.Count, byFamily, samples);
    }
}
