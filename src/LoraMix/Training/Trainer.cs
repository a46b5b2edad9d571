using System.Diagnostics;
using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>What a call to <see cref="Trainer.Train"/> did.</summary>
/// <param name="GlobalStep">The step reached (the last step run).</param>
/// <param name="StartStep">0 for a fresh run, the checkpoint's step after a resume.</param>
/// <param name="Steps">Every optimizer step run by this call, in order (per-step loss, lr, grad norm...).</param>
/// <param name="TotalSteps">The planned optimizer steps of the run.</param>
/// <param name="Evaluations">Every evaluation run by this call.</param>
/// <param name="Checkpoints">Checkpoint directories written by this call.</param>
/// <param name="OutputDir">The absolute output directory.</param>
/// <param name="Seconds">Wall time of the call.</param>
public sealed record TrainingResult(int GlobalStep, int StartStep, int TotalSteps, IReadOnlyList<StepMetrics> Steps,
    IReadOnlyList<EvalMetrics> Evaluations, IReadOnlyList<string> Checkpoints, string OutputDir, double Seconds);

/// <summary>
/// The training loop: AdamWOptimizer with a warm-up schedule, gradient accumulation normalised by target tokens, gradient-norm
/// clipping, periodic evaluation and checkpoints, exact resume, divergence detection, metrics.jsonl, a progress sink and
/// loss.png. The loss comes from a pluggable <see cref="ITrainingObjective"/> (next-token cross-entropy by default).
/// </summary>
/// <remarks>
/// <para><b>Steps and data.</b> Examples are truncated to <c>cutoff_len</c> (and packed if asked) once; each epoch visits
/// them in the permutation <see cref="DataOrder.Permutation"/>(seed, epoch), cut into micro-batches of <c>batch_size</c>;
/// an optimizer step takes <c>gradient_accumulation_steps</c> micro-batches (the last step of an epoch may take fewer).
/// The data of step s is a pure function of s, so resuming needs only the step number.</para>
/// <para><b>Loss normalisation.</b> Every micro-batch's summed token loss is divided by the number of target tokens of the
/// whole optimizer step, so 2 accumulated micro-batches of 1 sequence give the same gradient as 1 batch of 2.</para>
/// <para><b>Precision.</b> fp32: everything fp32. bf16: the model (base and LoRA weights) computes in bf16 on its device;
/// logits are cast to fp32 for the loss; gradients are cast to fp32 and AdamWOptimizer updates fp32 master copies of the trainable
/// parameters with fp32 moments, then rounds them back into the bf16 parameters. Master copies are saved in the optimizer
/// state, so resume is exact in both modes.</para>
/// <para><b>Divergence.</b> A non-finite loss (checked per micro-batch, before backward) or gradient norm (before
/// clipping) throws <see cref="TrainingDivergedException"/> without applying the update and without writing a checkpoint
/// for that step.</para>
/// <para><b>Output directory.</b> Checkpoints are written into hidden temporary directories and renamed into place; at the
/// start of a run, temporaries that a killed earlier run left in <c>output_dir</c> are removed (see
/// <see cref="StaleTemporaries"/>). Resume validates every file of the checkpoint before using any of it.</para>
/// <para><b>Memory.</b> Each step runs in its own dispose scope; the live tensor count is flat across steps (tested).</para>
/// </remarks>
public sealed partial class Trainer
{
    private readonly TrainingTarget _target;
    private readonly TrainingOptions _options;
    private readonly ITrainingObjective _objective;
    private readonly ITrainingProgress _progress;
    private readonly DataCollator _collator;

    public Trainer(TrainingTarget target, TrainingOptions options, ITrainingObjective? objective = null, ITrainingProgress? progress = null)
    {
        ArgumentNullException.ThrowIfNull(target);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        var dtype = target.Model.DType;
        if (options.Bf16 && dtype != ScalarType.BFloat16)
            throw new LoraMixException($"'bf16': true needs the model loaded in bfloat16 (it is {dtype}); load it with dtype bf16, or set bf16: false for fp32 training");
        if (!options.Bf16 && dtype != ScalarType.Float32)
            throw new LoraMixException($"'bf16': false trains in fp32 but the model is loaded in {dtype}; load it in fp32, or set bf16: true (bf16 models only)");
        if (target.Parameters.Count == 0)
            throw new LoraMixException("nothing to train: the training target has no trainable parameters (attach an adapter first, or use full fine-tuning)");
        _target = target;
        _options = options;
        _objective = objective ?? CausalLmObjective.Instance;
        _progress = progress ?? TrainingProgress.None;
        // Sequences are cut at cutoff_len and never past the model's context (max_position_embeddings), as a tokenizer's
        // model_max_length truncation does: positions beyond it were never trained and the model refuses them.
        _collator = new DataCollator(Math.Min(options.CutoffLen, target.Model.Config.MaxPositionEmbeddings), options.PadTokenId, options.Packing);
    }

    public TrainingOptions Options => _options;
    public TrainingTarget Target => _target;
    private LlamaForCausalLM Model => _target.Model;

    /// <summary>Micro-batches per epoch and optimizer steps per epoch for <paramref name="sequences"/> prepared sequences.</summary>
    public static (int MicroBatches, int Steps) EpochShape(int sequences, int batchSize, int accumulation)
    {
        int micro = (sequences + batchSize - 1) / batchSize;
        return (micro, Math.Max(1, (micro + accumulation - 1) / accumulation));
    }

    /// <summary>The optimizer steps a run over <paramref name="sequences"/> prepared sequences takes.</summary>
    public static int TotalSteps(TrainingOptions options, int sequences)
    {
        var (_, perEpoch) = EpochShape(sequences, options.BatchSize, options.GradientAccumulationSteps);
        return options.MaxSteps > 0 ? options.MaxSteps : Math.Max(1, (int)Math.Ceiling(options.NumEpochs * perEpoch - 1e-9));
    }

    /// <summary>
    /// Trains on <paramref name="trainExamples"/>, evaluating on <paramref name="validationExamples"/> when given, resuming
    /// from <see cref="TrainingOptions.ResumeFromCheckpoint"/> when set. At the end the trained weights are saved to
    /// <c>output_dir</c> (through the target's save delegate) with trainer_state.json and loss.png.
    /// </summary>
    public TrainingResult Train(IReadOnlyList<TrainingExample> trainExamples, IReadOnlyList<TrainingExample>? validationExamples = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(trainExamples);
        var wall = Stopwatch.StartNew();
        int vocab = Model.Config.VocabSize;
        for (int i = 0; i < trainExamples.Count; i++) trainExamples[i].Validate(i, vocab, "training data");
        for (int i = 0; i < (validationExamples?.Count ?? 0); i++) validationExamples![i].Validate(i, vocab, "validation data");
        CheckPrivilegeRequirements(trainExamples);
        if (validationExamples is not null) CheckPrivilegeRequirements(validationExamples);
        var train = _collator.Prepare(trainExamples, out int droppedTrain);
        var valid = validationExamples is null ? [] : _collator.Prepare(validationExamples, out _);
        if (train.Count == 0)
            throw new LoraMixException($"no training example has a target token within cutoff_len {_options.CutoffLen} ({trainExamples.Count} given); " +
                                       "check the loss mask (assistant tokens) or raise cutoff_len");

        var (microPerEpoch, stepsPerEpoch) = EpochShape(train.Count, _options.BatchSize, _options.GradientAccumulationSteps);
        int totalSteps = TotalSteps(_options, train.Count);
        var schedule = LrSchedule.For(_options, totalSteps);
        string outDir = Path.GetFullPath(_options.OutputDir);
        Directory.CreateDirectory(outDir);
        // temporaries of an earlier run of this directory that was killed mid-save (only LoraMix's own names, only of dead processes)
        var staleTemporaries = StaleTemporaries.Remove(outDir);

        using var optimizer = new AdamWOptimizer(_target.Parameters, _options.AdamBeta1, _options.AdamBeta2, _options.AdamEpsilon, _options.WeightDecay);
        var run = new RunState();
        int startStep = 0;
        string? resumeDir = _options.ResumeFromCheckpoint is null ? null : ResolveCheckpoint(_options.ResumeFromCheckpoint, outDir);
        if (resumeDir is not null)
            startStep = RestoreCheckpoint(resumeDir, optimizer, run, train.Count, stepsPerEpoch, schedule);
        else
        {
            var stale = ListCheckpoints(outDir);
            if (stale.Count > 0 && !_options.OverwriteOutputDir)
                throw new LoraMixException($"output_dir '{outDir}' already holds checkpoints ({string.Join(", ", stale.Select(c => Path.GetFileName(c.Path)))}); " +
                                           "set resume_from_checkpoint: latest to continue that run, overwrite_output_dir: true to replace it, or choose another output_dir");
            foreach (var (_, path) in stale) Directory.Delete(path, recursive: true);
            random.manual_seed(_options.Seed);
        }
        if (startStep >= totalSteps)
            throw new LoraMixException($"checkpoint {resumeDir} is at step {startStep}, which is already the end of this run ({totalSteps} steps); raise max_steps or num_epochs to train further");

        AtomicFile.WriteAllText(Path.Combine(outDir, ArgsFile), _options.ToJson());
        using var log = resumeDir is null ? MetricsLog.Create(outDir) : MetricsLog.Resume(outDir, startStep);
        var steps = new List<StepMetrics>();
        var evals = new List<EvalMetrics>();
        var written = new List<string>();
        bool wasTraining = Model.training;
        _progress.Started(new TrainingPlan(totalSteps, startStep, stepsPerEpoch, train.Count, valid.Count, _target.Description, outDir));
        try
        {
            if (staleTemporaries.Count > 0)
                _progress.Info($"removed {staleTemporaries.Count} temporary file(s) left in {outDir} by an interrupted save: {string.Join(", ", staleTemporaries.Select(Path.GetFileName))}");
            if (droppedTrain > 0) _progress.Info($"{droppedTrain} training example(s) had no target token within cutoff_len {_options.CutoffLen} and were skipped");
            if (resumeDir is not null) _progress.Info($"resumed from {resumeDir} at step {startStep}");
            Model.train();
            var loopClock = Stopwatch.StartNew();
            double windowLoss = 0;
            int windowSteps = 0;
            long windowTokens = 0;
            double windowStart = 0;
            int[]? order = null;
            long orderEpoch = -1;

            for (int s = startStep; s < totalSteps; s++)
            {
                if (cancellationToken.IsCancellationRequested)
                {
                    if (_options.SaveSteps > 0 && s > startStep && run.LastSavedStep != s)
                        written.Add(SaveCheckpoint(outDir, s, optimizer, run, train.Count, stepsPerEpoch, schedule));
                    cancellationToken.ThrowIfCancellationRequested();
                }
                long epoch = s / stepsPerEpoch;
                if (epoch != orderEpoch)
                {
                    order = DataOrder.Permutation(train.Count, _options.Seed, epoch);
                    orderEpoch = epoch;
                }
                var micro = MicroBatches(order!, (int)(s % stepsPerEpoch), microPerEpoch, train);
                double lr = schedule.LearningRate(s);
                var (loss, gradNorm, tokens, extras) = RunStep(s + 1, micro, optimizer, lr, run);
                int global = s + 1;
                run.TokensSeen += tokens;

                double elapsed = loopClock.Elapsed.TotalSeconds;
                int done = global - startStep;
                double eta = elapsed / done * (totalSteps - global);
                windowLoss += loss;
                windowSteps++;
                windowTokens += tokens;
                double tps = windowTokens / Math.Max(1e-9, elapsed - windowStart);
                var metrics = new StepMetrics(global, global / (double)stepsPerEpoch, loss, lr, gradNorm, tps, elapsed, eta, extras);
                steps.Add(metrics);

                EvalMetrics? eval = null;
                if (valid.Count > 0 && ((_options.EvalSteps > 0 && global % _options.EvalSteps == 0) || global == totalSteps))
                {
                    eval = EvaluatePrepared(valid, global, metrics.Epoch);
                    evals.Add(eval);
                    run.RecordEval(eval);
                    _progress.Evaluated(eval);
                }
                bool logged = global % _options.LoggingSteps == 0 || global == totalSteps;
                _progress.StepCompleted(metrics, logged);
                if (logged || eval is not null)
                {
                    double meanLoss = windowLoss / windowSteps;
                    log.Append(MetricsLog.Record(metrics, meanLoss, tps, eval));
                    run.RecordTrain(metrics, meanLoss);
                    windowLoss = 0;
                    windowSteps = 0;
                    windowTokens = 0;
                    windowStart = elapsed;
                }
                if (_options.SaveSteps > 0 && (global % _options.SaveSteps == 0 || global == totalSteps))
                    written.Add(SaveCheckpoint(outDir, global, optimizer, run, train.Count, stepsPerEpoch, schedule));
            }

            _target.SaveWeights(outDir);
            AtomicFile.WriteAllText(Path.Combine(outDir, StateFile), TrainerState(run, totalSteps, totalSteps, stepsPerEpoch).ToJsonString(JsonIndented));
            LossPlot.Write(Path.Combine(outDir, LossPlot.FileName), run.TrainPoints, run.EvalPoints);
            _progress.Info($"trained weights, metrics.jsonl and loss.png written to {outDir}");
            return new TrainingResult(totalSteps, startStep, totalSteps, steps, evals, written, outDir, wall.Elapsed.TotalSeconds);
        }
        finally
        {
            Model.train(wasTraining);
            _progress.Finished();
        }
    }

    private List<List<TrainingExample>> MicroBatches(int[] order, int stepInEpoch, int microPerEpoch, IReadOnlyList<TrainingExample> data)
    {
        int bs = _options.BatchSize, accum = _options.GradientAccumulationSteps;
        var list = new List<List<TrainingExample>>();
        for (int m = stepInEpoch * accum; m < Math.Min((stepInEpoch + 1) * accum, microPerEpoch); m++)
        {
            var batch = new List<TrainingExample>();
            for (int i = m * bs; i < Math.Min((m + 1) * bs, data.Count); i++) batch.Add(data[order[i]]);
            list.Add(batch);
        }
        return list;
    }

    /// <summary>One optimizer step in its own dispose scope; returns the mean token loss, the pre-clip gradient norm,
    /// the real tokens processed and the objective's extras.</summary>
    private (double Loss, double GradNorm, long Tokens, IReadOnlyDictionary<string, double> Extras) RunStep(
        int step, List<List<TrainingExample>> micro, AdamWOptimizer optimizer, double lr, RunState run)
    {
        using var scope = NewDisposeScope();
        var batches = micro.Select(b => _collator.Collate(b, Model.Device)).ToList();
        foreach (var b in batches) b.Adapters = _target.Adapters;
        long targets = batches.Sum(b => (long)b.TargetTokens);
        long tokens = batches.Sum(b => (long)b.RealTokens);
        optimizer.ZeroGrad();
        double loss = 0;
        var extras = new Dictionary<string, double>(StringComparer.Ordinal);
        foreach (var batch in batches)
        {
            var output = _objective.Compute(Model, batch, training: true);
            double sum = output.TargetLossSum.to(ScalarType.Float64).item<double>();
            if (!double.IsFinite(sum)) throw new TrainingDivergedException(step, "loss", sum, lr, run.LastCheckpoint);
            double share = batch.TargetTokens / (double)targets;
            var total = output.TargetLossSum / (double)targets;
            if (output.AuxiliaryLoss is not null)
            {
                double aux = output.AuxiliaryLoss.to(ScalarType.Float64).item<double>();
                if (!double.IsFinite(aux)) throw new TrainingDivergedException(step, "auxiliary loss", aux, lr, run.LastCheckpoint);
                total = total + output.AuxiliaryLoss * share;
                extras["aux_loss"] = extras.GetValueOrDefault("aux_loss") + aux * share;
            }
            foreach (var (k, v) in output.Metrics ?? new Dictionary<string, double>())
                extras[k] = extras.GetValueOrDefault(k) + v * share;
            total.backward();
            loss += sum / targets;
        }

        double gradNorm = GradientNorm(optimizer);
        if (!double.IsFinite(gradNorm)) throw new TrainingDivergedException(step, "gradient norm", gradNorm, lr, run.LastCheckpoint);
        if (_options.MaxGradNorm > 0) ClipGradients(optimizer, _options.MaxGradNorm, gradNorm);
        optimizer.Step(lr);
        _target.AfterStep?.Invoke(step);
        return (loss, gradNorm, tokens, extras);
    }

    /// <summary>The global L2 norm of the gradients (fp32 per-tensor norms, then their norm, as torch.nn.utils.clip_grad_norm_).</summary>
    internal static double GradientNorm(AdamWOptimizer optimizer)
    {
        using var scope = NewDisposeScope();
        var norms = new List<Tensor>();
        foreach (var p in optimizer.Parameters)
        {
            var g = p.Parameter.grad;
            if (g is not null) norms.Add(g.to(ScalarType.Float32).norm());
        }
        if (norms.Count == 0) return 0;
        return stack(norms).norm().to(ScalarType.Float64).item<double>();
    }

    /// <summary>Scales every gradient by max_norm / (norm + 1e-6) when that is below 1 (torch's clip_grad_norm_).</summary>
    internal static void ClipGradients(AdamWOptimizer optimizer, double maxNorm, double norm)
    {
        double coef = maxNorm / (norm + 1e-6);
        if (coef >= 1) return;
        using var noGrad = no_grad();
        foreach (var p in optimizer.Parameters)
        {
            using var g = p.Parameter.grad;
            g?.mul_(coef);
        }
    }

    /// <summary>
    /// Mean token loss and perplexity of <paramref name="examples"/> (truncated/packed as for training), in eval mode
    /// (no dropout) without gradients, batched by <c>eval_batch_size</c>.
    /// </summary>
    public EvalMetrics Evaluate(IReadOnlyList<TrainingExample> examples)
    {
        for (int i = 0; i < examples.Count; i++) examples[i].Validate(i, Model.Config.VocabSize, "evaluation data");
        CheckPrivilegeRequirements(examples);
        var prepared = _collator.Prepare(examples, out _);
        if (prepared.Count == 0) throw new LoraMixException("no evaluation example has a target token within cutoff_len");
        bool wasTraining = Model.training;
        try { return EvaluatePrepared(prepared, 0, 0); }
        finally { Model.train(wasTraining); }
    }

    /// <summary>
    /// Packing and <c>router_policy: privileged</c> do not mix when the data has untrusted tokens: the first untrusted
    /// token of a packed sequence would freeze the routing of every later example packed behind it, which no inference
    /// ever sees. Refused with a clear error rather than trained wrongly; so is a privilege embedding on unlabelled (text) data.
    /// </summary>
    private void CheckPrivilegeRequirements(IReadOnlyList<TrainingExample> examples)
    {
        // a learned privilege embedding reads every token's label: text data (no chat roles) has none
        if (Model.Model.EmbedTokens.PrivilegeEmbeddingsFor(_target.Adapters) is [var ise, ..] && examples.Any(e => e.Privileges is null))
            throw new LoraMixException($"adapter '{ise}' has privilege_embedding: true, which needs a privilege label on every token, but " +
                                       $"{examples.Count(e => e.Privileges is null)} of {examples.Count} examples have none (text data); " +
                                       "use a chat dataset (messages with roles) or set privilege_embedding: false");
        if (!_options.Packing || !examples.Any(e => e.HasUntrusted)) return;
        bool privileged = Model.Model.Layers.Any(l => l.FeedForward.RouterPoliciesFor(null, _target.Adapters).Any(p => p.FreezesOnUntrusted));
        if (privileged)
            throw new LoraMixException("packing is not supported with router_policy \"privileged\" when the data has untrusted ('data') messages: " +
                                       "an untrusted token would freeze the routing of the examples packed after it; set packing: false");
    }

    private EvalMetrics EvaluatePrepared(IReadOnlyList<TrainingExample> data, int step, double epoch)
    {
        int bs = _options.EvalBatchSize > 0 ? _options.EvalBatchSize : _options.BatchSize;
        try { return EvaluateBatches(Model, _collator, _objective, data, bs, step, epoch, _target.Adapters); }
        finally { Model.train(); }
    }

    /// <summary>
    /// Mean token loss and perplexity of <paramref name="examples"/> on any model (no trainer, no trainable parameters
    /// needed: <c>loramix eval</c>), truncated to <paramref name="cutoffLen"/>, in eval mode without gradients. The
    /// model is left in eval mode.
    /// </summary>
    public static EvalMetrics Evaluate(LlamaForCausalLM model, IReadOnlyList<TrainingExample> examples, int cutoffLen, int batchSize = 8,
        int padTokenId = 0, ITrainingObjective? objective = null, AdapterSelection? adapters = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(examples);
        ArgumentOutOfRangeException.ThrowIfLessThan(batchSize, 1);
        for (int i = 0; i < examples.Count; i++) examples[i].Validate(i, model.Config.VocabSize, "evaluation data");
        var collator = new DataCollator(Math.Min(cutoffLen, model.Config.MaxPositionEmbeddings), padTokenId);
        var prepared = collator.Prepare(examples, out _);
        if (prepared.Count == 0) throw new LoraMixException($"no evaluation example has a target token within cutoff_len {cutoffLen}");
        return EvaluateBatches(model, collator, objective ?? CausalLmObjective.Instance, prepared, batchSize, 0, 0, adapters);
    }

    private static EvalMetrics EvaluateBatches(LlamaForCausalLM model, DataCollator collator, ITrainingObjective objective,
        IReadOnlyList<TrainingExample> data, int bs, int step, double epoch, AdapterSelection? adapters)
    {
        var clock = Stopwatch.StartNew();
        double sum = 0;
        long targets = 0;
        var extras = new Dictionary<string, double>(StringComparer.Ordinal);
        model.eval();
        using var noGrad = no_grad();
        for (int i = 0; i < data.Count; i += bs)
        {
            using var scope = NewDisposeScope();
            using var batch = collator.Collate(data.Skip(i).Take(bs).ToList(), model.Device);
            batch.Adapters = adapters;
            var output = objective.Compute(model, batch, training: false);
            sum += output.TargetLossSum.to(ScalarType.Float64).item<double>();
            targets += batch.TargetTokens;
            foreach (var (k, v) in output.Metrics ?? new Dictionary<string, double>())
                extras[k] = extras.GetValueOrDefault(k) + v * batch.TargetTokens;
        }
        double loss = sum / Math.Max(1, targets);
        var mean = extras.ToDictionary(kv => kv.Key, kv => kv.Value / Math.Max(1, targets), StringComparer.Ordinal);
        return new EvalMetrics(step, epoch, loss, Math.Exp(loss), targets, clock.Elapsed.TotalSeconds, mean.Count > 0 ? mean : null);
    }
}
