using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraMix.Checkpoints;
using static TorchSharp.torch;

namespace LoraMix.Training;

public sealed partial class Trainer
{
    /// <summary>AdamWOptimizer moments (and fp32 master weights in bf16 mode), see <see cref="AdamWOptimizer.Save"/>.</summary>
    public const string OptimizerFile = "optimizer.safetensors";
    /// <summary>The schedule's parameters and position (JSON).</summary>
    public const string SchedulerFile = "scheduler.json";
    /// <summary>The torch CPU generator state (<c>torch_cpu</c>, u8) with the data-order position in the metadata.</summary>
    public const string RngFile = "rng_state.safetensors";
    /// <summary>Hugging Face's trainer state: global_step, epoch, log_history, best metric...</summary>
    public const string StateFile = "trainer_state.json";
    /// <summary>The options of the run (configuration keys).</summary>
    public const string ArgsFile = "training_args.json";
    /// <summary>Prefix of checkpoint directories (<c>checkpoint-STEP</c>).</summary>
    public const string CheckpointPrefix = "checkpoint-";

    private static readonly JsonSerializerOptions JsonIndented = new() { WriteIndented = true };

    private sealed class RunState
    {
        public List<JsonObject> LogHistory { get; } = [];
        public List<(int Step, double Loss)> TrainPoints { get; } = [];
        public List<(int Step, double Loss)> EvalPoints { get; } = [];
        /// <summary>The lowest eval loss so far (best_metric).</summary>
        public double? BestMetric { get; set; }
        /// <summary>The step of that evaluation (best_global_step).</summary>
        public int? BestStep { get; set; }
        /// <summary>checkpoint-BestStep once that checkpoint exists (best_model_checkpoint), as Hugging Face sets it.</summary>
        public string? BestCheckpoint { get; set; }
        public long TokensSeen { get; set; }
        public string? LastCheckpoint { get; set; }
        public int LastSavedStep { get; set; } = -1;

        public void RecordTrain(StepMetrics m, double windowLoss)
        {
            TrainPoints.Add((m.Step, windowLoss));
            var o = new JsonObject
            {
                ["epoch"] = MetricsLog.Num(Math.Round(m.Epoch, 4)),
                ["grad_norm"] = MetricsLog.Num(m.GradNorm),
                ["learning_rate"] = MetricsLog.Num(m.LearningRate),
                ["loss"] = MetricsLog.Num(Math.Round(windowLoss, 6)),
                ["step"] = m.Step,
            };
            foreach (var (k, v) in m.Extras) o[k] = MetricsLog.Num(v);
            LogHistory.Add(o);
        }

        public void RecordEval(EvalMetrics e)
        {
            EvalPoints.Add((e.Step, e.Loss));
            // Hugging Face's Trainer with its default metric_for_best_model: the eval loss, lower is better, strictly
            if (double.IsFinite(e.Loss) && (BestMetric is null || BestStep is null || e.Loss < BestMetric))
            {
                BestMetric = e.Loss;
                BestStep = e.Step;
            }
            LogHistory.Add(new JsonObject
            {
                ["epoch"] = MetricsLog.Num(Math.Round(e.Epoch, 4)),
                ["eval_loss"] = MetricsLog.Num(e.Loss),
                ["eval_perplexity"] = MetricsLog.Num(e.Perplexity),
                ["eval_runtime"] = MetricsLog.Num(Math.Round(e.Seconds, 4)),
                ["step"] = e.Step,
            });
        }
    }

    /// <summary>
    /// Resolves <c>resume_from_checkpoint</c>: a directory, or <c>latest</c> for the highest-numbered complete
    /// <c>checkpoint-STEP</c> (one with trainer_state.json) in <paramref name="outputDir"/>.
    /// </summary>
    public static string ResolveCheckpoint(string spec, string outputDir)
    {
        if (spec.Equals("latest", StringComparison.OrdinalIgnoreCase) || spec.Equals("true", StringComparison.OrdinalIgnoreCase))
        {
            var latest = ListCheckpoints(outputDir).LastOrDefault();
            return latest.Path ?? throw new LoraMixException(
                $"resume_from_checkpoint: latest: no complete {CheckpointPrefix}STEP directory (with {StateFile}) in '{outputDir}'; start without resume, or give a checkpoint directory");
        }
        string dir = Path.GetFullPath(spec);
        if (!Directory.Exists(dir)) throw new LoraMixException($"resume_from_checkpoint: '{spec}' is not a directory; give a {CheckpointPrefix}STEP directory or 'latest'");
        if (!File.Exists(Path.Combine(dir, StateFile)))
            throw new LoraMixException($"resume_from_checkpoint: '{spec}' has no {StateFile}, so it is not a complete trainer checkpoint");
        return dir;
    }

    private static string CheckpointPath(string outDir, int step) =>
        Path.Combine(outDir, CheckpointPrefix + step.ToString(CultureInfo.InvariantCulture));

    /// <summary>The complete checkpoints in a directory, by increasing step.</summary>
    public static IReadOnlyList<(int Step, string Path)> ListCheckpoints(string outputDir)
    {
        if (!Directory.Exists(outputDir)) return [];
        var list = new List<(int, string)>();
        foreach (var d in Directory.GetDirectories(outputDir))
        {
            var m = Regex.Match(Path.GetFileName(d), $"^{CheckpointPrefix}(\\d+)$");
            if (m.Success && File.Exists(Path.Combine(d, StateFile)) && int.TryParse(m.Groups[1].Value, CultureInfo.InvariantCulture, out int step))
                list.Add((step, Path.GetFullPath(d)));
        }
        return list.OrderBy(c => c.Item1).ToList();
    }

    /// <summary>
    /// Writes <c>checkpoint-STEP/</c>: the weights (the target's save delegate), optimizer state, schedule, RNG state,
    /// trainer_state.json (last) and training_args.json. Every file is written atomically into a hidden temporary
    /// directory (<c>.checkpoint-STEP.PID.GUID.tmp</c>) that is renamed into place when complete (an existing
    /// checkpoint-STEP is swapped out only then), so a crash never leaves a partial checkpoint under the final name.
    /// </summary>
    /// <remarks>As Hugging Face's Trainer: best_model_checkpoint becomes checkpoint-B, B the step of the best evaluation
    /// (lowest eval loss) so far, once that checkpoint exists — never a later checkpoint whose weights were not evaluated.
    /// save_total_limit then deletes the oldest checkpoints, never the best one nor the one just written (with a limit
    /// of 1 and an older best, two are kept).</remarks>
    private string SaveCheckpoint(string outDir, int step, AdamWOptimizer optimizer, RunState run, int sequences, int stepsPerEpoch, LrSchedule schedule)
    {
        string final = CheckpointPath(outDir, step);
        string temp = Path.Combine(outDir, StaleTemporaries.NameFor(Path.GetFileName(final), StaleTemporaries.TempSuffix));
        Directory.CreateDirectory(temp);
        try
        {
            _target.SaveWeights(temp);
            optimizer.Save(Path.Combine(temp, OptimizerFile));
            AtomicFile.WriteAllText(Path.Combine(temp, SchedulerFile), new JsonObject
            {
                ["lr_scheduler"] = schedule.Name,
                ["base_lr"] = schedule.BaseLearningRate,
                ["warmup_steps"] = schedule.WarmupSteps,
                ["total_steps"] = schedule.TotalSteps,
                ["last_epoch"] = step,
                ["last_lr"] = schedule.LearningRate(step),
            }.ToJsonString(JsonIndented));
            using (var rng = random.get_rng_state())
            {
                SafetensorsWriter.Write(Path.Combine(temp, RngFile), [new KeyValuePair<string, Tensor>("torch_cpu", rng)], new Dictionary<string, string>
                {
                    ["format"] = "loramix-rng",
                    ["seed"] = _options.Seed.ToString(CultureInfo.InvariantCulture),
                    ["global_step"] = step.ToString(CultureInfo.InvariantCulture),
                    ["epoch"] = (step / stepsPerEpoch).ToString(CultureInfo.InvariantCulture),
                    ["step_in_epoch"] = (step % stepsPerEpoch).ToString(CultureInfo.InvariantCulture),
                    ["steps_per_epoch"] = stepsPerEpoch.ToString(CultureInfo.InvariantCulture),
                    ["train_sequences"] = sequences.ToString(CultureInfo.InvariantCulture),
                });
            }
            AtomicFile.WriteAllText(Path.Combine(temp, ArgsFile), _options.ToJson());
            if (run.BestStep is int best)
            {
                string bestDir = CheckpointPath(outDir, best);
                if (best == step || Directory.Exists(bestDir)) run.BestCheckpoint = bestDir;
            }
            AtomicFile.WriteAllText(Path.Combine(temp, StateFile), TrainerState(run, step, schedule.TotalSteps, stepsPerEpoch).ToJsonString(JsonIndented));
        }
        catch
        {
            AtomicDirectory.TryDelete(temp);
            throw;
        }
        AtomicDirectory.Replace(temp, final);
        run.LastCheckpoint = final;
        run.LastSavedStep = step;
        _progress.Info($"checkpoint written: {final}");
        if (_options.SaveTotalLimit > 0)
        {
            var all = ListCheckpoints(outDir);
            string? bestPath = run.BestCheckpoint is null ? null : Path.GetFullPath(run.BestCheckpoint);
            int excess = all.Count - _options.SaveTotalLimit;
            foreach (var (_, path) in all)
            {
                if (excess <= 0) break;
                if (path == bestPath || path == Path.GetFullPath(final)) continue;
                Directory.Delete(path, recursive: true);
                excess--;
            }
        }
        return final;
    }

    private JsonObject TrainerState(RunState run, int globalStep, int maxSteps, int stepsPerEpoch) => new()
    {
        ["best_global_step"] = run.BestMetric is null ? null : run.BestStep,
        ["best_metric"] = run.BestMetric is double b ? MetricsLog.Num(b) : null,
        ["best_model_checkpoint"] = run.BestCheckpoint,
        ["epoch"] = MetricsLog.Num(Math.Round(globalStep / (double)stepsPerEpoch, 6)),
        ["eval_steps"] = _options.EvalSteps,
        ["global_step"] = globalStep,
        ["is_hyper_param_search"] = false,
        ["is_local_process_zero"] = true,
        ["is_world_process_zero"] = true,
        ["log_history"] = new JsonArray(run.LogHistory.Where(o => (int)o["step"]! <= globalStep).Select(o => (JsonNode)o.DeepClone()).ToArray()),
        ["logging_steps"] = _options.LoggingSteps,
        ["max_steps"] = maxSteps,
        ["num_input_tokens_seen"] = run.TokensSeen,
        ["num_train_epochs"] = (int)Math.Ceiling(maxSteps / (double)stepsPerEpoch),
        ["save_steps"] = _options.SaveSteps,
        ["stateful_callbacks"] = new JsonObject(),
        ["total_flos"] = 0,
        ["train_batch_size"] = _options.BatchSize,
        ["trial_name"] = null,
        ["trial_params"] = null,
    };
}
