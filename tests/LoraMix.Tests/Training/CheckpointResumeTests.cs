using System.Buffers.Binary;
using System.Text.Json.Nodes;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

/// <summary>
/// Resume refuses a damaged checkpoint with a typed error naming the file and the key, before using any of it: RNG
/// metadata and state (which libtorch would abort the process on), scheduler.json, trainer_state.json and the optimizer
/// state. The pristine checkpoint resumes.
/// </summary>
public sealed class CheckpointResumeTests(CheckpointFixture fx) : IClassFixture<CheckpointFixture>
{
    private static void EditJson(string path, Action<JsonObject> edit)
    {
        var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(o);
        File.WriteAllText(path, o.ToJsonString());
    }

    private static void SetInt32(byte[] b, int offset, int v) => BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(offset), v);

    /// <summary>Resumes from a copy damaged by <paramref name="damage"/> and returns the error, which must be of type T.</summary>
    private T Refused<T>(Action<string> damage) where T : LoraMixException
    {
        string copy = fx.FreshCopy();
        damage(copy);
        var e = fx.Resume(copy);
        Assert.NotNull(e);
        return Assert.IsAssignableFrom<T>(e);
    }

    [Fact]
    public void ThePristineCheckpointResumesAndTheLiveGeneratorStateIsValid()
    {
        Assert.Null(fx.Resume(fx.FreshCopy()));

        // the layout and invariants CpuGeneratorState checks are those of this libtorch's own states
        Assert.Equal(CpuGeneratorState.Bytes, CpuGeneratorState.LiveBytes);
        random.manual_seed(3);
        foreach (int draws in new[] { 0, 1, 2, 623, 624, 625, 700, 1500 })
        {
            random.manual_seed(3);
            if (draws > 0) using (rand(draws, dtype: ScalarType.Float64)) { }
            using (randn(3)) { }                                   // also caches a normal sample
            using var state = random.get_rng_state();
            Assert.Null(CpuGeneratorState.Check(state.data<byte>().ToArray()));
        }
        Assert.Null(CpuGeneratorState.Check(CheckpointFixture.RngBytes(Path.Combine(fx.Checkpoint, Trainer.RngFile))));
    }

    [Theory]
    [InlineData("seed", "abc", "expected an integer")]
    [InlineData("global_step", "2.0", "expected an integer")]
    [InlineData("steps_per_epoch", "0", "expected 1..")]
    [InlineData("train_sequences", "99999999999999999999", "expected an integer")]
    [InlineData("format", "pt", "expected 'loramix-rng'")]
    [InlineData("global_step", "1", "do not belong together")]
    [InlineData("step_in_epoch", "0", "do not match global_step")]
    public void RngMetadataIsValidated(string key, string value, string expected)
    {
        var e = Refused<CheckpointResumeException>(dir =>
            CheckpointFixture.RewriteSafetensors(Path.Combine(dir, Trainer.RngFile), (_, meta) => meta[key] = value));
        Assert.EndsWith(Trainer.RngFile, e.FilePath);
        Assert.Equal(key == "step_in_epoch" ? "epoch" : key, e.Key);
        Assert.Contains(expected, e.Message);
        Assert.Contains(Trainer.RngFile, e.Message);
    }

    [Theory]
    [InlineData("size", "expected U8 [5056]")]
    [InlineData("empty", "expected U8 [5056]")]
    [InlineData("dtype", "expected U8 [5056]")]
    [InlineData("2d", "expected U8 [5056]")]
    [InlineData("extra", "exactly one tensor")]
    [InlineData("left0", "'left' is 0")]
    [InlineData("left625", "'left' is 625")]
    [InlineData("next", "'next' is 625")]
    [InlineData("inconsistent", "inconsistent")]
    [InlineData("unseeded", "'seeded' is 0")]
    [InlineData("normalflag", "'normal_is_valid' is 7")]
    [InlineData("normalnan", "cached normal sample is NaN")]
    [InlineData("floatflag", "'is_next_float_normal_sample_valid' is 2")]
    public void RngStateIsValidatedBeforeLibtorchSeesIt(string damage, string expected)
    {
        // each of these would abort the process inside libtorch (c10::Error) or read past its state array
        var e = Refused<CheckpointResumeException>(dir =>
        {
            string path = Path.Combine(dir, Trainer.RngFile);
            var b = CheckpointFixture.RngBytes(path);
            switch (damage)
            {
                case "size": CheckpointFixture.SetRngBytes(path, b[..5000]); return;
                case "empty": CheckpointFixture.SetRngBytes(path, []); return;
                case "dtype":
                    CheckpointFixture.RewriteSafetensors(path, (t, _) => t["torch_cpu"] = zeros(5056 / 4, dtype: ScalarType.Float32));
                    return;
                case "2d":
                    CheckpointFixture.RewriteSafetensors(path, (t, _) => t["torch_cpu"] = t["torch_cpu"].reshape(2, 2528));
                    return;
                case "extra":
                    CheckpointFixture.RewriteSafetensors(path, (t, _) => t["torch_cuda"] = zeros(4, dtype: ScalarType.Byte));
                    return;
                case "left0": SetInt32(b, 8, 0); break;
                case "left625": SetInt32(b, 8, 625); break;
                case "next": SetInt32(b, 8, 1); BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(16), 625); break;
                case "inconsistent": SetInt32(b, 8, 5); BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(16), 624); break;
                case "unseeded": SetInt32(b, 12, 0); break;
                case "normalflag": SetInt32(b, 5040, 7); break;
                case "normalnan": SetInt32(b, 5040, 1); BinaryPrimitives.WriteDoubleLittleEndian(b.AsSpan(5024), double.NaN); break;
                case "floatflag": b[5052] = 2; break;
            }
            CheckpointFixture.SetRngBytes(path, b);
        });
        Assert.Equal("torch_cpu", e.Key);
        Assert.Contains(expected, e.Message);
    }

    [Theory]
    [InlineData("notjson", null, "not valid JSON")]
    [InlineData("array", null, "expected a JSON object")]
    [InlineData("base_lr", "base_lr", "expected a finite number")]
    [InlineData("warmup", "warmup_steps", "expected an integer")]
    [InlineData("name", "lr_scheduler", "expected one of")]
    [InlineData("last", "last_epoch", "do not belong together")]
    [InlineData("missing", "total_steps", "is missing")]
    [InlineData("deleted", null, "not found")]
    public void SchedulerJsonIsValidated(string damage, string? key, string expected)
    {
        var e = Refused<CheckpointResumeException>(dir =>
        {
            string path = Path.Combine(dir, Trainer.SchedulerFile);
            switch (damage)
            {
                case "notjson": File.WriteAllText(path, "lr_scheduler: constant"); break;
                case "array": File.WriteAllText(path, "[1, 2]"); break;
                case "base_lr": EditJson(path, o => o["base_lr"] = "fast"); break;
                case "warmup": EditJson(path, o => o["warmup_steps"] = 1.5); break;
                case "name": EditJson(path, o => o["lr_scheduler"] = "exponential"); break;
                case "last": EditJson(path, o => o["last_epoch"] = 7); break;
                case "missing": EditJson(path, o => o.Remove("total_steps")); break;
                case "deleted": File.Delete(path); break;
            }
        });
        Assert.EndsWith(Trainer.SchedulerFile, e.FilePath);
        Assert.Equal(key, e.Key);
        Assert.Contains(expected, e.Message);
    }

    [Theory]
    [InlineData("step-string", "global_step", "expected an integer")]
    [InlineData("step-negative", "global_step", "expected an integer in 1..")]
    [InlineData("step-missing", "global_step", "is missing")]
    [InlineData("history-object", "log_history", "expected an array")]
    [InlineData("history-entry", "log_history[0]", "expected an object")]
    [InlineData("history-step", "log_history[1].step", "expected an integer")]
    [InlineData("history-loss", "log_history[0].loss", "expected a finite number")]
    [InlineData("best-metric", "best_metric", "expected a finite number")]
    [InlineData("best-step", "best_global_step", "expected an integer in 0..2")]
    [InlineData("best-dir", "best_model_checkpoint", "expected a string")]
    [InlineData("tokens", "num_input_tokens_seen", "expected an integer")]
    [InlineData("duplicate", null, "not valid JSON")]
    [InlineData("deep", null, "not valid JSON")]
    public void TrainerStateIsValidated(string damage, string? key, string expected)
    {
        var e = Refused<CheckpointResumeException>(dir =>
        {
            string path = Path.Combine(dir, Trainer.StateFile);
            switch (damage)
            {
                case "step-string": EditJson(path, o => o["global_step"] = "2"); break;
                case "step-negative": EditJson(path, o => o["global_step"] = -2); break;
                case "step-missing": EditJson(path, o => o.Remove("global_step")); break;
                case "history-object": EditJson(path, o => o["log_history"] = new JsonObject()); break;
                case "history-entry": EditJson(path, o => o["log_history"]![0] = 3); break;
                case "history-step": EditJson(path, o => o["log_history"]![1]!["step"] = "one"); break;
                case "history-loss": EditJson(path, o => o["log_history"]![0]!["loss"] = "low"); break;
                case "best-metric": EditJson(path, o => o["best_metric"] = new JsonArray()); break;
                case "best-step": EditJson(path, o => o["best_global_step"] = 9); break;
                case "best-dir": EditJson(path, o => o["best_model_checkpoint"] = 4); break;
                case "tokens": EditJson(path, o => o["num_input_tokens_seen"] = 1e300); break;
                case "duplicate": File.WriteAllText(path, File.ReadAllText(path).Replace("{", "{\"global_step\": 2, ", StringComparison.Ordinal)); break;
                case "deep": File.WriteAllText(path, new string('[', 100) + new string(']', 100)); break;
            }
        });
        Assert.EndsWith(Trainer.StateFile, e.FilePath);
        Assert.Equal(key, e.Key);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void OversizedStateFilesAreRefusedBeforeTheyAreRead()
    {
        var e = Refused<CheckpointResumeException>(dir =>
        {
            using var fs = new FileStream(Path.Combine(dir, Trainer.SchedulerFile), FileMode.Create);
            fs.SetLength(Trainer.MaxSchedulerFileBytes + 1);
        });
        Assert.Contains("byte limit", e.Message);
    }

    [Theory]
    [InlineData("shape", "mis-shaped")]
    [InlineData("dtype", "file dtype F16 vs optimizer F32")]
    [InlineData("missing", "missing keys")]
    [InlineData("extra", "unexpected keys")]
    public void OptimizerTensorsMustMatchTheParameters(string damage, string expected)
    {
        var e = Refused<StateDictMismatchException>(dir => CheckpointFixture.RewriteSafetensors(Path.Combine(dir, Trainer.OptimizerFile), (t, _) =>
        {
            string first = t.Keys.Order(StringComparer.Ordinal).First(k => k.EndsWith(".exp_avg", StringComparison.Ordinal));
            switch (damage)
            {
                case "shape": t[first] = zeros(3, 3); break;
                case "dtype": t[first] = t[first].to(ScalarType.Float16); break;
                case "missing": t.Remove(first); break;
                case "extra": t["stray.exp_avg"] = zeros(2); break;
            }
        }));
        Assert.Contains(Trainer.OptimizerFile, e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Theory]
    [InlineData("step-text", "expected a non-negative integer")]
    [InlineData("step-other", "do not belong together")]
    [InlineData("nan", "NaN or infinite")]
    [InlineData("negative", "cannot be negative")]
    [InlineData("format", "not a LoraMix AdamW state")]
    public void OptimizerStateIsValidated(string damage, string expected)
    {
        var e = Refused<CheckpointFormatException>(dir => CheckpointFixture.RewriteSafetensors(Path.Combine(dir, Trainer.OptimizerFile), (t, meta) =>
        {
            string avg = t.Keys.Order(StringComparer.Ordinal).First(k => k.EndsWith(".exp_avg", StringComparison.Ordinal));
            string sq = t.Keys.Order(StringComparer.Ordinal).First(k => k.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
            switch (damage)
            {
                case "step-text": meta["step"] = "two"; break;
                case "step-other": meta["step"] = "5"; break;
                case "nan": t[avg] = full_like(t[avg], double.NaN); break;
                case "negative": t[sq] = full_like(t[sq], -1.0); break;
                case "format": meta["format"] = "torch"; break;
            }
        }));
        Assert.EndsWith(Trainer.OptimizerFile, e.FilePath);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void ADamagedMetricsLogIsTrimmedNotFatal()
    {
        string copy = fx.FreshCopy();
        string metrics = Path.Combine(Path.GetDirectoryName(copy)!, "metrics.jsonl");
        File.WriteAllLines(metrics,
        [
            """{"step":1,"loss":2.0}""", """{"step":2,"step":2}""", "[1,2]", """{"step":"two"}""", """{"step":1e3}""", "{\"step\":2,\"loss\":", """{"step":2,"loss":1.5}""",
            """{"step":9,"loss":1.0}""",
        ]);
        Assert.Null(fx.Resume(copy));
        var steps = File.ReadAllLines(metrics).Select(l => (int)JsonNode.Parse(l)!["step"]!).ToList();
        Assert.Equal([1, 2, 3], steps);        // the well-formed lines up to the checkpoint, then the resumed step
    }

    [Fact]
    public void MissingFilesAreNamed()
    {
        foreach (var file in new[] { Trainer.RngFile, Trainer.OptimizerFile, "adapter_model.safetensors" })
        {
            var e = Refused<LoraMixException>(dir => File.Delete(Path.Combine(dir, file)));
            Assert.Contains(file, e.Message);
            Assert.Contains("not found", e.Message);
        }
    }
}
