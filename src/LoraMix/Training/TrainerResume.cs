using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Checkpoints;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>
/// Resume: every file of a checkpoint is read and validated (types, ranges, shapes, dtypes, agreement between the files
/// and with the run) before any of it is applied, and every problem is a <see cref="LoraMixException"/> naming the file
/// and the key — never a native abort, a parse exception or a half-restored run.
/// </summary>
public sealed partial class Trainer
{
    /// <summary>The largest trainer_state.json read on resume (its log_history grows with the run: about 200 bytes a
    /// logged step, so this is over a million logged steps).</summary>
    public const long MaxStateFileBytes = 256L << 20;

    /// <summary>The largest scheduler.json read on resume (LoraMix writes a few hundred bytes).</summary>
    public const long MaxSchedulerFileBytes = 1L << 20;

    private const int MaxJsonDepth = 64;

    private sealed record LogEntry(JsonObject Entry, int Step, double? Loss, double? EvalLoss);

    /// <summary>Restores weights, optimizer, RNG and trainer state from a checkpoint; returns its global step.</summary>
    /// <remarks>Order: trainer_state.json, scheduler.json, rng_state.safetensors and the header of optimizer.safetensors are
    /// validated first; then the weights (validated by the target's loader before they are read), the optimizer moments
    /// (checked finite as they are read) and the RNG state are applied. training_args.json is not read.</remarks>
    private int RestoreCheckpoint(string dir, AdamWOptimizer optimizer, RunState run, int sequences, int stepsPerEpoch, LrSchedule schedule)
    {
        string statePath = Path.Combine(dir, StateFile);
        var state = ReadJsonObject(statePath, MaxStateFileBytes);
        int step = (int)RequiredInteger(state, statePath, "global_step", 1, int.MaxValue);
        var history = ReadLogHistory(state, statePath);
        double? bestMetric = OptionalNumber(state, statePath, "best_metric");
        int? bestStep = (int?)OptionalInteger(state, statePath, "best_global_step", 0, step);
        string? bestCheckpoint = OptionalString(state, statePath, "best_model_checkpoint");
        if (bestCheckpoint is { } bc && (bc.Length == 0 || bc.Contains('\0')))
            throw new CheckpointResumeException(statePath, "best_model_checkpoint", "is not a usable path (empty, or with a NUL character)");
        long tokensSeen = OptionalInteger(state, statePath, "num_input_tokens_seen", 0, long.MaxValue) ?? 0;

        var saved = ReadSchedule(Path.Combine(dir, SchedulerFile), step);
        using var rng = ReadRngState(Path.Combine(dir, RngFile), dir, step, sequences, stepsPerEpoch);
        string optimizerPath = Path.Combine(dir, OptimizerFile);
        optimizer.Check(optimizerPath, step);

        try
        {
            _target.LoadWeights(dir);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointResumeException(dir, null, $"the weights cannot be read: {e.Message}", e);
        }
        optimizer.Load(optimizerPath, step);
        random.set_rng_state(rng);

        if (saved != schedule)
            _progress.Info($"note: the learning-rate schedule differs from the checkpoint's ({saved.Name}, lr {saved.BaseLearningRate:G4}, warm-up {saved.WarmupSteps}, {saved.TotalSteps} steps); continuing with this run's ({schedule.Name}, lr {schedule.BaseLearningRate:G4}, warm-up {schedule.WarmupSteps}, {schedule.TotalSteps} steps)");
        foreach (var h in history.Where(h => h.Step <= step))
        {
            run.LogHistory.Add((JsonObject)h.Entry.DeepClone());
            if (h.Loss is double l) run.TrainPoints.Add((h.Step, l));
            if (h.EvalLoss is double ev) run.EvalPoints.Add((h.Step, ev));
        }
        run.BestMetric = bestMetric;
        run.BestStep = bestStep;
        run.BestCheckpoint = bestCheckpoint;
        if (run.BestMetric is double bm && run.BestStep is null)
            run.BestStep = run.EvalPoints.Where(p => p.Loss == bm).Select(p => (int?)p.Step).FirstOrDefault();
        run.TokensSeen = tokensSeen;
        run.LastCheckpoint = dir;
        run.LastSavedStep = step;
        return step;
    }

    private static List<LogEntry> ReadLogHistory(JsonObject state, string path)
    {
        var list = new List<LogEntry>();
        var node = Field(state, "log_history");
        if (node is null) return list;
        if (node is not JsonArray entries)
            throw new CheckpointResumeException(path, "log_history", $"is {Describe(node)}, expected an array of objects");
        for (int i = 0; i < entries.Count; i++)
        {
            string key = string.Create(CultureInfo.InvariantCulture, $"log_history[{i}]");
            if (entries[i] is not JsonObject o)
                throw new CheckpointResumeException(path, key, $"is {Describe(entries[i])}, expected an object with a 'step'");
            int s = (int)RequiredInteger(o, path, "step", 0, int.MaxValue, key + ".");
            list.Add(new LogEntry(o, s, OptionalNumber(o, path, "loss", key + "."), OptionalNumber(o, path, "eval_loss", key + ".")));
        }
        return list;
    }

    private static LrSchedule ReadSchedule(string path, int step)
    {
        var o = ReadJsonObject(path, MaxSchedulerFileBytes);
        string name = OptionalString(o, path, "lr_scheduler") ?? throw Missing(path, "lr_scheduler", "a schedule name");
        if (!TrainingOptions.SchedulerNames.Contains(name))
            throw new CheckpointResumeException(path, "lr_scheduler", $"is '{Clip(name)}', expected one of {string.Join(", ", TrainingOptions.SchedulerNames)}");
        double baseLr = OptionalNumber(o, path, "base_lr") ?? throw Missing(path, "base_lr", "a learning rate");
        if (baseLr < 0) throw new CheckpointResumeException(path, "base_lr", $"is {baseLr}, expected a non-negative learning rate");
        int warmup = (int)RequiredInteger(o, path, "warmup_steps", 0, int.MaxValue);
        int total = (int)RequiredInteger(o, path, "total_steps", 1, int.MaxValue);
        long last = RequiredInteger(o, path, "last_epoch", 0, int.MaxValue);
        if (last != step)
            throw new CheckpointResumeException(path, "last_epoch", $"is {last} but trainer_state.json has global_step {step}; the files do not belong together");
        _ = OptionalNumber(o, path, "last_lr");
        return new LrSchedule(name, baseLr, warmup, total);
    }

    /// <summary>Reads and validates rng_state.safetensors; returns the state tensor, safe to give to libtorch.</summary>
    private Tensor ReadRngState(string path, string dir, int step, int sequences, int stepsPerEpoch)
    {
        if (!File.Exists(path)) throw new CheckpointResumeException(path, null, "not found; a complete checkpoint has it");
        SafetensorsReader reader;
        try
        {
            reader = SafetensorsReader.Open(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointResumeException(path, null, $"cannot be read: {e.Message}", e);
        }
        using (reader)
        {
            string? format = reader.Metadata.GetValueOrDefault("format");
            if (format != "loramix-rng")
                throw new CheckpointResumeException(path, "format", $"is {(format is null ? "missing" : $"'{Clip(format)}'")}, expected 'loramix-rng' (a LoraMix RNG state)");
            long seed = MetadataInteger(reader, "seed", long.MinValue, long.MaxValue);
            long savedStep = MetadataInteger(reader, "global_step", 0, int.MaxValue);
            long perEpoch = MetadataInteger(reader, "steps_per_epoch", 1, int.MaxValue);
            long savedSequences = MetadataInteger(reader, "train_sequences", 1, int.MaxValue);
            long epoch = MetadataInteger(reader, "epoch", 0, int.MaxValue);
            long inEpoch = MetadataInteger(reader, "step_in_epoch", 0, int.MaxValue);
            if (savedStep != step)
                throw new CheckpointResumeException(path, "global_step", $"is {savedStep} but trainer_state.json has global_step {step}; the files do not belong together");
            if (epoch != step / perEpoch || inEpoch != step % perEpoch)
                throw new CheckpointResumeException(path, "epoch", $"epoch {epoch} and step_in_epoch {inEpoch} do not match global_step {step} at {perEpoch} steps per epoch");
            if (savedSequences != sequences || perEpoch != stepsPerEpoch)
                throw new CheckpointResumeException(path, "train_sequences",
                    $"cannot resume from {dir}: it was written for {savedSequences} training sequences and {perEpoch} steps per epoch, " +
                    $"this run has {sequences} and {stepsPerEpoch}; resume needs the same data, cutoff_len, packing, batch_size and gradient_accumulation_steps");
            if (seed != _options.Seed)
                throw new CheckpointResumeException(path, "seed", $"cannot resume from {dir}: it was written with seed {seed}, this run has seed {_options.Seed} (the data order depends on it)");

            if (reader.Entries.Count != 1 || !reader.TryGetEntry("torch_cpu", out var entry))
                throw new CheckpointResumeException(path, "torch_cpu",
                    $"expected exactly one tensor 'torch_cpu', found {reader.Entries.Count}: {SafetensorsReader.Preview(reader.Entries.Select(e => e.Name))}");
            if (entry.DType != SafetensorsDType.U8 || entry.Shape.Length != 1 || entry.Shape[0] != CpuGeneratorState.Bytes)
                throw new CheckpointResumeException(path, "torch_cpu",
                    $"is {SafetensorsDTypes.ToName(entry.DType)} {Safetensors.FormatShape(entry.Shape)}, expected U8 [{CpuGeneratorState.Bytes}] (libtorch's CPU generator state)");
            var tensor = reader.ReadTensor("torch_cpu");
            try
            {
                if (CpuGeneratorState.Check(tensor.data<byte>().ToArray()) is { } problem)
                    throw new CheckpointResumeException(path, "torch_cpu", $"not a valid generator state: {problem}");
            }
            catch
            {
                tensor.Dispose();
                throw;
            }
            return tensor;
        }
    }

    private static long MetadataInteger(SafetensorsReader reader, string key, long min, long max)
    {
        if (!reader.Metadata.TryGetValue(key, out var text))
            throw new CheckpointResumeException(reader.FilePath, key, "is missing from the metadata");
        if (!long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long v))
            throw new CheckpointResumeException(reader.FilePath, key, $"is '{Clip(text)}', expected an integer");
        if (v < min || v > max)
            throw new CheckpointResumeException(reader.FilePath, key, $"is {v}, expected {min}..{max}");
        return v;
    }

    // ------------------------------------------------------------------ JSON

    /// <summary>Reads a JSON object of at most <paramref name="maxBytes"/> bytes, with every value materialized (so
    /// duplicate keys and invalid UTF-8 surface here, as a <see cref="CheckpointResumeException"/>).</summary>
    private static JsonObject ReadJsonObject(string path, long maxBytes)
    {
        if (!File.Exists(path)) throw new CheckpointResumeException(path, null, "not found; a complete checkpoint has it");
        byte[] bytes;
        try
        {
            long length = new FileInfo(path).Length;
            if (length > maxBytes)
                throw new CheckpointResumeException(path, null, $"is {length} bytes, more than the {maxBytes}-byte limit for this file");
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointResumeException(path, null, $"cannot be read: {e.Message}", e);
        }
        JsonNode? node;
        try
        {
            var utf8 = bytes.AsSpan();
            if (utf8.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) utf8 = utf8[3..];   // a UTF-8 byte order mark (some editors add one)
            node = JsonNode.Parse(utf8, documentOptions: new JsonDocumentOptions { MaxDepth = MaxJsonDepth });
            Materialize(node);
        }
        catch (Exception e) when (e is JsonException or ArgumentException or InvalidOperationException or FormatException)
        {
            throw new CheckpointResumeException(path, null, $"is not valid JSON: {e.Message}", e);
        }
        return node as JsonObject ?? throw new CheckpointResumeException(path, null, $"is {Describe(node)}, expected a JSON object");
    }

    private static void Materialize(JsonNode? node)
    {
        switch (node)
        {
            case JsonObject o:
                foreach (var (_, v) in o) Materialize(v);
                break;
            case JsonArray a:
                foreach (var v in a) Materialize(v);
                break;
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                _ = v.GetValue<string>();
                break;
        }
    }

    private static JsonNode? Field(JsonObject o, string key) => o.TryGetPropertyValue(key, out var v) ? v : null;

    private static CheckpointResumeException Missing(string path, string key, string what) =>
        new(path, key, $"is missing, expected {what}");

    private static long RequiredInteger(JsonObject o, string path, string key, long min, long max, string keyPrefix = "") =>
        OptionalInteger(o, path, key, min, max, keyPrefix) ?? throw Missing(path, keyPrefix + key, $"an integer in {min}..{max}");

    private static long? OptionalInteger(JsonObject o, string path, string key, long min, long max, string keyPrefix = "")
    {
        var node = Field(o, key);
        if (node is null) return null;
        if (node is not JsonValue v || v.GetValueKind() != JsonValueKind.Number || !v.TryGetValue(out long n))
            throw new CheckpointResumeException(path, keyPrefix + key, $"is {Describe(node)}, expected an integer in {min}..{max}");
        if (n < min || n > max)
            throw new CheckpointResumeException(path, keyPrefix + key, $"is {n}, expected an integer in {min}..{max}");
        return n;
    }

    private static double? OptionalNumber(JsonObject o, string path, string key, string keyPrefix = "")
    {
        var node = Field(o, key);
        if (node is null) return null;
        if (node is not JsonValue v || v.GetValueKind() != JsonValueKind.Number || !v.TryGetValue(out double d) || !double.IsFinite(d))
            throw new CheckpointResumeException(path, keyPrefix + key, $"is {Describe(node)}, expected a finite number or null");
        return d;
    }

    private static string? OptionalString(JsonObject o, string path, string key)
    {
        var node = Field(o, key);
        if (node is null) return null;
        if (node is not JsonValue v || v.GetValueKind() != JsonValueKind.String)
            throw new CheckpointResumeException(path, key, $"is {Describe(node)}, expected a string or null");
        return v.GetValue<string>();
    }

    private static string Describe(JsonNode? node) => node is null
        ? "null"
        : $"a JSON {node.GetValueKind().ToString().ToLowerInvariant()} ({Clip(node.ToJsonString())})";

    private static string Clip(string s) => s.Length <= 40 ? s : s[..40] + "...";
}
