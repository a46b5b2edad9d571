using System.Text.Json.Nodes;
using LoraMix.Modeling;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

/// <summary>
/// best_metric / best_global_step / best_model_checkpoint follow Hugging Face's Trainer (eval loss, lower is better; the
/// best checkpoint is checkpoint-B for the best evaluated step B once it exists), and save_total_limit never rotates the
/// best checkpoint away, across a resume too. The evaluation losses are scripted, so which step is best is known.
/// </summary>
public sealed class BestCheckpointTests
{
    /// <summary>Cross-entropy for training; during evaluation the n-th evaluation reports <c>losses[n]</c>.</summary>
    private sealed class ScriptedEval(params double[] losses) : ITrainingObjective
    {
        private int _calls;

        public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
        {
            if (training) return CausalLmObjective.Instance.Compute(model, batch, training);
            double loss = losses[_calls++];
            return new ObjectiveOutput(tensor((float)(loss * batch.TargetTokens)));
        }
    }

    private static JsonObject State(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, Trainer.StateFile)))!.AsObject();

    private static TrainingOptions Opts(string dir, int steps, int evalSteps, int saveSteps, int limit) => TrainingFixtures.Options(dir) with
    {
        MaxSteps = steps, EvalSteps = evalSteps, SaveSteps = saveSteps, SaveTotalLimit = limit, EvalBatchSize = 8,
    };

    [Fact]
    public void TheBestCheckpointIsTheBestEvaluatedOneNotTheNewestSave()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 41);
        var valid = TrainingFixtures.RandomExamples(2, 42);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;

        // evaluations at 2 (best), 4 and 6; saves at 3 and 6: the best evaluated weights (step 2) were never saved
        JsonObject? at3 = null;
        var rec = new TrainingFixtures.Recorder { OnStep = m => { if (m.Step == 4) at3 = State(dir.Sub("checkpoint-3")); } };
        new Trainer(target, Opts(dir.Path, 6, evalSteps: 2, saveSteps: 3, limit: 1), new ScriptedEval(1.0, 3.0, 2.0), rec).Train(data, valid);
        Assert.NotNull(at3);
        Assert.Equal(1.0, (double)at3!["best_metric"]!);
        Assert.Equal(2, (int)at3!["best_global_step"]!);
        Assert.Null(at3!["best_model_checkpoint"]);                 // not checkpoint-3, whose weights were not evaluated
        var at6 = State(dir.Sub("checkpoint-6"));
        Assert.Equal(1.0, (double)at6["best_metric"]!);
        Assert.Null(at6["best_model_checkpoint"]);
        Assert.Null(State(dir.Path)["best_model_checkpoint"]);
        Assert.Equal([6], Trainer.ListCheckpoints(dir.Path).Select(c => c.Step));   // checkpoint-3 is not kept as a "best"
    }

    [Fact]
    public void RotationKeepsTheBestCheckpointBesideTheNewestAcrossAResume()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 43);
        var valid = TrainingFixtures.RandomExamples(2, 44);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        string best = dir.Sub("checkpoint-4");

        // evaluations and saves every 2 steps, limit 2; losses 3, 1, 2: step 4 is best; stop after step 6
        using var cts = new CancellationTokenSource();
        var rec = new TrainingFixtures.Recorder { OnStep = m => { if (m.Step == 6) cts.Cancel(); } };
        Assert.ThrowsAny<OperationCanceledException>(() =>
            new Trainer(target, Opts(dir.Path, 10, 2, 2, limit: 2), new ScriptedEval(3.0, 1.0, 2.0), rec).Train(data, valid, cts.Token));
        Assert.Equal([4, 6], Trainer.ListCheckpoints(dir.Path).Select(c => c.Step));      // 2 rotated away, the best kept
        var at6 = State(dir.Sub("checkpoint-6"));
        Assert.Equal(best, (string)at6["best_model_checkpoint"]!);
        Assert.Equal(4, (int)at6["best_global_step"]!);
        Assert.Equal(1.0, (double)at6["best_metric"]!);

        // resumed: steps 8 and 10 evaluate worse (2.5, 1.5); with limit 2 the newest and the best (4) remain
        new Trainer(target, Opts(dir.Path, 10, 2, 2, limit: 2) with { ResumeFromCheckpoint = "latest" }, new ScriptedEval(2.5, 1.5)).Train(data, valid);
        Assert.Equal([4, 10], Trainer.ListCheckpoints(dir.Path).Select(c => c.Step));
        var at10 = State(dir.Sub("checkpoint-10"));
        Assert.Equal(best, (string)at10["best_model_checkpoint"]!);
        Assert.Equal(1.0, (double)at10["best_metric"]!);
        Assert.Equal(best, (string)State(dir.Path)["best_model_checkpoint"]!);

        // limit 1 with an older best keeps two (the newest and the best), as Hugging Face does
        new Trainer(target, Opts(dir.Path, 14, 2, 2, limit: 1) with { ResumeFromCheckpoint = "latest" }, new ScriptedEval(0.5, 0.75)).Train(data, valid);
        Assert.Equal([12, 14], Trainer.ListCheckpoints(dir.Path).Select(c => c.Step));
        Assert.Equal(dir.Sub("checkpoint-12"), (string)State(dir.Sub("checkpoint-14"))["best_model_checkpoint"]!);
        Assert.Equal(0.5, (double)State(dir.Sub("checkpoint-14"))["best_metric"]!);
    }
}
