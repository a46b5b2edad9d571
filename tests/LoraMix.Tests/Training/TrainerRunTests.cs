using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Training;
using LoraMix.Tests.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

public sealed class TrainerRunTests
{
    private static float[] Flat(TrainingTarget t) => t.Parameters.SelectMany(p => p.Parameter.detach().data<float>().ToArray()).ToArray();

    [Fact]
    public void ResumedRunReproducesTheUninterruptedRunExactlyWithDropout()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(10, 3);
        var valid = TrainingFixtures.RandomExamples(3, 4);
        TrainingOptions Opts(string sub) => TrainingFixtures.Options(dir.Sub(sub)) with
        {
            MaxSteps = 8, SaveSteps = 3, EvalSteps = 2, BatchSize = 2, GradientAccumulationSteps = 2, WarmupSteps = 2,
            LrScheduler = "cosine", MaxGradNorm = 1.0, WeightDecay = 0.01,
        };

        // uninterrupted (8 steps over 3 epochs of 3 steps: the data order changes across the resume point's epoch)
        var targetA = TrainingFixtures.TinyLora(out var modelA, dropout: 0.2);
        using var _a = modelA;
        var a = new Trainer(targetA, Opts("a")).Train(data, valid);
        Assert.Equal(8, a.Steps.Count);

        // interrupted after step 4 (cancelled; the last checkpoint is step 3)
        using var cts = new CancellationTokenSource();
        var targetB = TrainingFixtures.TinyLora(out var modelB, dropout: 0.2);
        using (modelB)
        {
            var rec = new TrainingFixtures.Recorder { OnStep = m => { if (m.Step == 4) cts.Cancel(); } };
            Assert.ThrowsAny<OperationCanceledException>(() => new Trainer(targetB, Opts("b"), progress: rec).Train(data, valid, cts.Token));
            Assert.Equal(a.Steps.Take(4).Select(s => s.Loss), rec.Steps.Select(s => s.Loss));
            Assert.True(rec.Finished);
        }
        // the cancelled run saved where it stopped; remove that so the resume also has to replay a step (4) from step 3
        Assert.True(Directory.Exists(dir.Sub("b/checkpoint-4")));
        Directory.Delete(dir.Sub("b/checkpoint-4"), recursive: true);
        Assert.Equal([3], Trainer.ListCheckpoints(dir.Sub("b")).Select(c => c.Step));

        // resume on a fresh process state: different LoRA init, different global RNG state
        var targetC = TrainingFixtures.TinyLora(out var modelC, dropout: 0.2, loraSeed: 99);
        using var _c = modelC;
        random.manual_seed(12345);
        var c = new Trainer(targetC, Opts("b") with { ResumeFromCheckpoint = "latest" }).Train(data, valid);
        Assert.Equal(3, c.StartStep);
        Assert.Equal(a.Steps.Skip(3).Select(s => s.Loss), c.Steps.Select(s => s.Loss));            // bit-exact in fp32 on CPU
        Assert.Equal(a.Steps.Skip(3).Select(s => s.GradNorm), c.Steps.Select(s => s.GradNorm));
        Assert.Equal(a.Evaluations.Select(e => e.Loss).Skip(1), c.Evaluations.Select(e => e.Loss));
        Assert.Equal(Flat(targetA), Flat(targetC));

        // metrics.jsonl of the resumed run: steps 1..8 once each (the lines after the checkpoint were replaced)
        var steps = File.ReadAllLines(dir.Sub("b/metrics.jsonl")).Select(l => (int)JsonNode.Parse(l)!["step"]!).ToList();
        Assert.Equal(Enumerable.Range(1, 8), steps);
        var state = JsonNode.Parse(File.ReadAllText(dir.Sub("b/checkpoint-8/trainer_state.json")))!;
        Assert.Equal(8, (int)state["global_step"]!);
        Assert.Equal(Enumerable.Range(1, 8), state["log_history"]!.AsArray().Where(e => e!["loss"] is not null).Select(e => (int)e!["step"]!));
    }

    [Fact]
    public void FullFineTuningResumesExactlyFromItsHuggingFaceCheckpoint()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 31);
        TrainingOptions Opts(string sub, int steps) => TrainingFixtures.Options(dir.Sub(sub)) with
        {
            MaxSteps = steps, SaveSteps = 2, LearningRate = 1e-3, WeightDecay = 0.1, LrScheduler = "linear", WarmupSteps = 1,
        };
        using var a = TrainingFixtures.TinyModel();
        var ra = new Trainer(TrainingTarget.FullFineTune(a), Opts("a", 4)).Train(data);
        using var b = TrainingFixtures.TinyModel();
        // a shorter run with the same plan would have another schedule, so stop the 4-step run after step 2 instead
        using var cts = new CancellationTokenSource();
        var rec = new TrainingFixtures.Recorder { OnStep = m => { if (m.Step == 2) cts.Cancel(); } };
        Assert.ThrowsAny<OperationCanceledException>(() => new Trainer(TrainingTarget.FullFineTune(b), Opts("b", 4), progress: rec).Train(data, null, cts.Token));
        Assert.True(File.Exists(dir.Sub("b/checkpoint-2/model.safetensors")));
        using var c = TrainingFixtures.TinyModel(seed: 77);   // other initial weights: everything must come from the checkpoint
        var rc = new Trainer(TrainingTarget.FullFineTune(c), Opts("b", 4) with { ResumeFromCheckpoint = dir.Sub("b/checkpoint-2") }).Train(data);
        Assert.Equal(ra.Steps.Skip(2).Select(s => s.Loss), rc.Steps.Select(s => s.Loss));
        foreach (var (name, t) in a.state_dict())
            Assert.True(t.equal(c.state_dict()[name]).all().item<bool>(), name);
    }

    [Fact]
    public void DivergenceStopsWithATypedErrorNamingTheStep()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 5);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        // A learning rate out of range is refused before training (it used to overflow fp32 inside AdamW) ...
        var refused = Assert.Throws<LoraMixException>(() => new Trainer(target, TrainingFixtures.Options(dir.Sub("lr")) with { LearningRate = 1e30 }));
        Assert.Contains("'learning_rate'", refused.Message);
        Assert.False(Directory.Exists(dir.Sub("lr")));
        // ... and gradients that overflow (a loss scaled to 1e30 from the second call on) stop with the typed error.
        var e = Assert.Throws<TrainingDivergedException>(() =>
            new Trainer(target, TrainingFixtures.Options(dir.Sub("lr")) with { MaxSteps = 10 }, new ScaleLoss(fromCall: 2, 1e30f)).Train(data));
        Assert.InRange(e.Step, 2, 3);
        Assert.False(double.IsFinite(e.Value));
        Assert.Contains($"step {e.Step}", e.Message);
        Assert.Contains("learning_rate", e.Message);
    }

    private sealed class ScaleLoss(int fromCall, float factor) : ITrainingObjective
    {
        private int _calls;
        public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
        {
            var o = CausalLmObjective.Instance.Compute(model, batch, training);
            return ++_calls >= fromCall ? o with { TargetLossSum = o.TargetLossSum * factor } : o;
        }
    }

    private sealed class InjectInf(int atCall) : ITrainingObjective
    {
        private int _calls;
        public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
        {
            var o = CausalLmObjective.Instance.Compute(model, batch, training);
            return ++_calls == atCall ? o with { TargetLossSum = o.TargetLossSum * float.PositiveInfinity } : o;
        }
    }

    [Fact]
    public void AnInjectedInfiniteLossStopsBeforeTheUpdateAndKeepsTheLastCheckpoint()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 5);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var rec = new TrainingFixtures.Recorder();
        float[]? before = null;
        var rec2 = new TrainingFixtures.Recorder { OnStep = m => { if (m.Step == 2) before = Flat(target); } };
        var e = Assert.Throws<TrainingDivergedException>(() =>
            new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 10, SaveSteps = 1 }, new InjectInf(3), rec2).Train(data));
        Assert.Equal(3, e.Step);
        Assert.Equal("loss", e.Quantity);
        Assert.Equal(double.PositiveInfinity, e.Value);
        Assert.Equal(Path.GetFullPath(dir.Sub("checkpoint-2")), e.LastCheckpoint);
        Assert.False(Directory.Exists(dir.Sub("checkpoint-3")));
        Assert.Equal(before, Flat(target));   // the diverged step applied nothing
        Assert.True(rec2.Finished);
    }

    [Fact]
    public void FullFineTuningChangesBaseWeightsAndLoraDoesNot()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(4, 8);
        using var full = TrainingFixtures.TinyModel();
        var baseBefore = full.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        var fullTarget = TrainingTarget.FullFineTune(full);
        Assert.Equal(full.parameters().Count(), fullTarget.Parameters.Count);
        Assert.False(fullTarget.Parameters.Single(p => p.Name == "model.norm.weight").Decay);
        new Trainer(fullTarget, TrainingFixtures.Options(dir.Sub("full")) with { MaxSteps = 2, LearningRate = 1e-3, SaveSteps = 2 }).Train(data);
        foreach (var (name, t) in full.state_dict())
            Assert.False(t.equal(baseBefore[name]).all().item<bool>(), $"{name} did not change under full fine-tuning");
        // the final weights are a loadable Hugging Face model directory equal to the trained model
        using var reloaded = LlamaForCausalLM.FromPretrained(dir.Sub("full"));
        Assert.True(reloaded.state_dict()["model.layers.1.mlp.up_proj.weight"].equal(full.state_dict()["model.layers.1.mlp.up_proj.weight"]).all().item<bool>());

        var loraTarget = TrainingFixtures.TinyLora(out var lora);
        using var _ = lora;
        var baseLora = lora.state_dict().Where(kv => !kv.Key.Contains(".lora.")).ToDictionary(kv => kv.Key, kv => kv.Value.clone());
        var loraBefore = Flat(loraTarget);
        new Trainer(loraTarget, TrainingFixtures.Options(dir.Sub("lora")) with { MaxSteps = 2 }).Train(data);
        foreach (var (name, t) in lora.state_dict().Where(kv => !kv.Key.Contains(".lora.")))
            Assert.True(t.equal(baseLora[name]).all().item<bool>(), $"{name} changed under LoRA training");
        Assert.NotEqual(loraBefore, Flat(loraTarget));
        // the output directory holds a PEFT adapter that reproduces the trained model
        using var fresh = TrainingFixtures.TinyModel();
        LoraAdapters.Load(fresh, dir.Sub("lora"));
        fresh.eval(); lora.eval();
        var ids = tensor(new long[] { 1, 7, 9, 11 }).unsqueeze(0);
        Assert.True(fresh.Forward(ids, adapters: AdapterSelection.Of("default")).equal(lora.Forward(ids, adapters: AdapterSelection.Of("default"))).all().item<bool>());
    }

    [Fact]
    public void MetricsCheckpointsStateAndPlotHaveTheirLayout()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(6, 9);
        var valid = TrainingFixtures.RandomExamples(2, 10);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var rec = new TrainingFixtures.Recorder();
        var result = new Trainer(target, TrainingFixtures.Options(dir.Path) with
        {
            MaxSteps = 6, EvalSteps = 2, SaveSteps = 2, SaveTotalLimit = 2, LoggingSteps = 1, WarmupSteps = 2, LrScheduler = "linear",
        }, progress: rec).Train(data, valid);

        var lines = File.ReadAllLines(Path.Combine(dir.Path, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(6, lines.Count);
        foreach (var l in lines)
            foreach (var key in new[] { "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eta_s" })
                Assert.True(l.ContainsKey(key) && l[key] is not null, $"line {l.ToJsonString()} lacks {key}");
        var evalLines = lines.Where(l => l.ContainsKey("eval_loss")).ToList();
        Assert.Equal([2, 4, 6], evalLines.Select(l => (int)l["step"]!));
        foreach (var l in evalLines) Assert.Equal(Math.Exp((double)l["eval_loss"]!), (double)l["eval_ppl"]!, 9);
        Assert.Equal(0.0, (double)lines[0]["lr"]!);                 // warm-up: the first update uses lr 0, as transformers
        Assert.Equal(0.5e-2, (double)lines[1]["lr"]!, 12);
        Assert.Equal(0.0, (double)lines[5]["eta_s"]!);
        Assert.Equal(rec.Steps.Select(s => s.Loss), lines.Select(l => (double)l["loss"]!));   // logging_steps 1: the per-step losses

        // save_total_limit 2: the newest two (the best is kept too when it is older)
        var kept = Trainer.ListCheckpoints(dir.Path).Select(c => c.Step).ToList();
        Assert.Contains(6, kept);
        Assert.Contains(4, kept);
        Assert.InRange(kept.Count, 2, 3);
        string ck = Path.Combine(dir.Path, "checkpoint-6");
        foreach (var f in new[] { "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "trainer_state.json", "training_args.json" })
            Assert.True(File.Exists(Path.Combine(ck, f)), $"checkpoint lacks {f}");
        Assert.Empty(Directory.GetFileSystemEntries(dir.Path, ".*"));   // no temp files or directories left
        var state = JsonNode.Parse(File.ReadAllText(Path.Combine(ck, "trainer_state.json")))!.AsObject();
        foreach (var key in new[] { "global_step", "epoch", "log_history", "best_metric", "best_model_checkpoint", "max_steps", "logging_steps", "eval_steps", "save_steps", "train_batch_size", "num_input_tokens_seen" })
            Assert.True(state.ContainsKey(key), $"trainer_state.json lacks {key}");
        Assert.Equal(6, (int)state["global_step"]!);
        Assert.Equal(result.Evaluations.Min(e => e.Loss), (double)state["best_metric"]!);
        Assert.Equal(3, state["log_history"]!.AsArray().Count(e => e!["eval_loss"] is not null));
        using (var opt = SafetensorsReader.Open(Path.Combine(ck, "optimizer.safetensors")))
        {
            Assert.Equal("6", opt.Metadata["step"]);
            Assert.Equal(target.Parameters.Count * 2, opt.Entries.Count);
        }
        var sched = JsonNode.Parse(File.ReadAllText(Path.Combine(ck, "scheduler.json")))!;
        Assert.Equal("linear", (string)sched["lr_scheduler"]!);
        Assert.Equal(6, (int)sched["last_epoch"]!);
        var args = JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "training_args.json")))!;
        Assert.Equal(0.01, (double)args["learning_rate"]!);
        Assert.Equal(2, (int)args["save_total_limit"]!);

        // loss.png: a PNG of the requested size
        var png = File.ReadAllBytes(Path.Combine(dir.Path, "loss.png"));
        Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
        Assert.Equal("IHDR", System.Text.Encoding.ASCII.GetString(png, 12, 4));
        Assert.Equal(900, System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)));
        Assert.Equal(540, System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20)));
        Assert.True(png.Length > 5000, "the plot is suspiciously small");
    }

    [Fact]
    public void LiveTensorCountStaysFlatOver200TrainingSteps()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(12, 12, minLen: 4, maxLen: 10);
        var valid = TrainingFixtures.RandomExamples(2, 13);
        var target = TrainingFixtures.TinyLora(out var model, dropout: 0.1);
        using var _ = model;
        var stats = DisposeScopeManager.Statistics;
        var counts = new List<long>();
        var rec = new TrainingFixtures.Recorder { OnStep = _ => counts.Add(stats.ThreadTotalLiveCount) };
        new Trainer(target, TrainingFixtures.Options(dir.Path) with
        {
            MaxSteps = 200, LoggingSteps = 50, EvalSteps = 50, BatchSize = 2, GradientAccumulationSteps = 2, LearningRate = 1e-3,
            MaxGradNorm = 1.0, LrScheduler = "cosine",
        }, progress: rec).Train(data, valid);
        Assert.Equal(200, counts.Count);
        // after the first step (gradients allocated) the count never moves, evaluation steps included
        Assert.All(counts.Skip(1), c => Assert.Equal(counts[1], c));
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("full")]
    public void ATinyModelLearnsAFixedMapping(string mode)
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.Mapping(24);
        // weights of std 0.08 (TestModels.Random): with the presets' 0.02 the frozen head bounds the logit margin a LoRA
        // adapter can reach to about 2, i.e. a loss floor near 4
        using var model = TestModels.Random(TestModels.Llama, 11);
        TrainingTarget target;
        if (mode == "lora")
        {
            LoraAdapters.Attach(model, TrainingFixtures.Lora with { R = 8, LoraAlpha = 16 });
            target = TrainingTarget.Lora(model, TrainingFixtures.Lora with { R = 8, LoraAlpha = 16 });
        }
        else target = TrainingTarget.FullFineTune(model);
        var trainer = new Trainer(target, TrainingFixtures.Options(dir.Path) with
        {
            MaxSteps = 120, BatchSize = 8, LearningRate = mode == "lora" ? 2e-2 : 3e-3, LrScheduler = "linear", WarmupSteps = 5,
            LoggingSteps = 50, MaxGradNorm = 1.0,
        });
        double start = trainer.Evaluate(data).Loss;
        var result = trainer.Train(data);
        double end = trainer.Evaluate(data).Loss;
        Assert.True(start > 4, $"start loss {start}");
        Assert.True(end < 0.1 * start, $"loss went from {start} to {end}");
        Assert.True(result.Steps[^1].Loss < 0.2 * result.Steps[0].Loss);
    }

    [Fact]
    public void Bf16TrainingKeepsFp32MasterWeightsAndLearns()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.Mapping(8);
        using var model = ModelPresets.CreateRandom("tiny", 11, dtype: ScalarType.BFloat16);
        LoraAdapters.Attach(model, TrainingFixtures.Lora);
        var target = TrainingTarget.Lora(model, TrainingFixtures.Lora);
        Assert.All(target.Parameters, p => Assert.Equal(ScalarType.BFloat16, p.Parameter.dtype));
        var opts = TrainingFixtures.Options(dir.Path) with { Bf16 = true, MaxSteps = 30, BatchSize = 8, LearningRate = 2e-2, SaveSteps = 30 };
        var trainer = new Trainer(target, opts);
        double start = trainer.Evaluate(data).Loss;
        trainer.Train(data);
        Assert.True(trainer.Evaluate(data).Loss < start - 1, "bf16 training did not reduce the loss");
        using var opt = SafetensorsReader.Open(Path.Combine(dir.Path, "checkpoint-30", "optimizer.safetensors"));
        Assert.Equal(target.Parameters.Count * 3, opt.Entries.Count);   // exp_avg, exp_avg_sq and the fp32 master
        Assert.All(opt.Entries, e => Assert.Equal(SafetensorsDType.F32, e.DType));

        // the dtype must match the bf16 flag
        using var fp32 = TrainingFixtures.TinyModel();
        LoraAdapters.Attach(fp32, TrainingFixtures.Lora);
        var e32 = Assert.Throws<LoraMixException>(() => new Trainer(TrainingTarget.Lora(fp32, TrainingFixtures.Lora), opts));
        Assert.Contains("bf16", e32.Message);
    }

    [Fact]
    public void ObjectiveAuxiliaryLossAndMetricsAreAddedAndLogged()
    {
        using var dir = new TempDir();
        var data = TrainingFixtures.RandomExamples(4, 14);
        var plainTarget = TrainingFixtures.TinyLora(out var plainModel);
        using var _p = plainModel;
        var plain = new Trainer(plainTarget, TrainingFixtures.Options(dir.Sub("plain")) with { MaxSteps = 1 }).Train(data);

        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var a0 = target.Parameters[0];   // layer 0 q_proj lora_A: its CE gradient is exactly 0 at step 1 (B = 0)
        Assert.EndsWith("lora_A.weight", a0.Name);
        var result = new Trainer(target, TrainingFixtures.Options(dir.Sub("aux")) with { MaxSteps = 2 }, new WithAux(a0.Parameter)).Train(data);
        var line = JsonNode.Parse(File.ReadAllLines(Path.Combine(dir.Sub("aux"), "metrics.jsonl"))[0])!;
        Assert.Equal(0.25, (double)line["aux_loss"]!, 6);
        Assert.Equal(7.0, (double)line["router_entropy"]!, 6);
        Assert.Equal(0.25, result.Steps[0].Extras["aux_loss"], 6);
        Assert.Equal(plain.Steps[0].Loss, result.Steps[0].Loss);   // "loss" stays the token loss
        // the auxiliary loss reached the gradient: d aux / d A0 = 1 everywhere (the micro-batch shares sum to 1)
        double expected = Math.Sqrt(plain.Steps[0].GradNorm * plain.Steps[0].GradNorm + a0.Parameter.numel());
        Assert.Equal(expected, result.Steps[0].GradNorm, 4);
    }

    /// <summary>CE plus an auxiliary loss of value 0.25 whose gradient is 1 on every entry of one parameter.</summary>
    private sealed class WithAux(TorchSharp.Modules.Parameter p) : ITrainingObjective
    {
        public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
        {
            var o = CausalLmObjective.Instance.Compute(model, batch, training);
            var aux = (p - p.detach()).sum() + 0.25f;
            return o with { AuxiliaryLoss = aux, Metrics = new Dictionary<string, double> { ["router_entropy"] = 7.0 } };
        }
    }

    [Fact]
    public void PlainProgressWritesOneLinePerLoggingStepAndEvaluation()
    {
        using var dir = new TempDir();
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var sw = new StringWriter();
        new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 4, LoggingSteps = 2, EvalSteps = 4 }, progress: new PlainProgress(sw))
            .Train(TrainingFixtures.RandomExamples(4, 2), TrainingFixtures.RandomExamples(2, 3));
        var lines = sw.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.StartsWith("training LoRA adapter 'default'", lines[0]);
        Assert.Equal(2, lines.Count(l => l.StartsWith("step ", StringComparison.Ordinal)));
        Assert.Contains(lines, l => l.StartsWith("step 4/4 | epoch 2.00 | loss ", StringComparison.Ordinal) && l.Contains("tok/s") && l.Contains("eta 00:00"));
        Assert.Contains(lines, l => l.StartsWith("eval at step 4 | eval_loss ", StringComparison.Ordinal));
        // under the test host stdout is redirected, so the console sink is the plain one
        if (Console.IsOutputRedirected) Assert.IsType<PlainProgress>(TrainingProgress.ForConsole());
    }

    [Fact]
    public void SpectreProgressDrivesALiveBarAndReturns()
    {
        using var dir = new TempDir();
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var sw = new StringWriter();
        var console = Spectre.Console.AnsiConsole.Create(new Spectre.Console.AnsiConsoleSettings
        {
            Out = new Spectre.Console.AnsiConsoleOutput(sw), Interactive = Spectre.Console.InteractionSupport.Yes,
            Ansi = Spectre.Console.AnsiSupport.Yes,
        });
        new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 3, EvalSteps = 3 }, progress: new SpectreProgress(console))
            .Train(TrainingFixtures.RandomExamples(4, 2), TrainingFixtures.RandomExamples(2, 3));
        string text = sw.ToString();
        Assert.Contains("LoRA adapter 'default'", text);
        Assert.Contains("eval at step 3", text);
        Assert.Contains("100%", text);
    }

    [Fact]
    public void BadInputsFailWithActionableMessages()
    {
        using var dir = new TempDir();
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var trainer = new Trainer(target, TrainingFixtures.Options(dir.Path));
        Assert.Contains("outside the model's vocabulary", Assert.Throws<LoraMixException>(() => trainer.Train([new TrainingExample([1, 9999], [false, true])])).Message);
        Assert.Contains("same length", Assert.Throws<LoraMixException>(() => trainer.Train([new TrainingExample([1, 2], [true])])).Message);
        Assert.Contains("no training example has a target", Assert.Throws<LoraMixException>(() => trainer.Train([new TrainingExample([1, 2], [true, false])])).Message);
        var resume = new Trainer(target, TrainingFixtures.Options(dir.Path) with { ResumeFromCheckpoint = "latest" });
        Assert.Contains("no complete checkpoint-STEP", Assert.Throws<LoraMixException>(() => resume.Train(TrainingFixtures.RandomExamples(2, 1))).Message);

        // a fresh run does not mix with another run's checkpoints
        var data = TrainingFixtures.RandomExamples(4, 1);
        new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 2, SaveSteps = 2 }).Train(data);
        var again = new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 1, SaveSteps = 1 });
        Assert.Contains("already holds checkpoints (checkpoint-2)", Assert.Throws<LoraMixException>(() => again.Train(data)).Message);
        new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 1, SaveSteps = 1, OverwriteOutputDir = true }).Train(data);
        Assert.Equal([1], Trainer.ListCheckpoints(dir.Path).Select(c => c.Step));
        // resuming a finished run says how to go further
        var done = new Trainer(target, TrainingFixtures.Options(dir.Path) with { MaxSteps = 1, ResumeFromCheckpoint = "latest" });
        Assert.Contains("raise max_steps", Assert.Throws<LoraMixException>(() => done.Train(data)).Message);
    }
}
