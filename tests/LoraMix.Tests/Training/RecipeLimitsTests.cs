using System.Diagnostics;
using LoraMix.Adapters.Lora;
using LoraMix.Configuration;
using LoraMix.Tests.Cli;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Training;

/// <summary>Every numeric recipe value is finite and in its stated range, checked at parse time (before anything is
/// written), and errors name the file and the key; target_modules regexes fail typed and cannot hang.</summary>
public sealed class RecipeLimitsTests : IDisposable
{
    private readonly TempDir _dir = new();

    public RecipeLimitsTests() => Directory.CreateDirectory(_dir.Path);

    public void Dispose() => _dir.Dispose();

    private const string Minimal = """
        model: models/base
        dataset: data.jsonl
        output_dir: out/a
        """;

    private static ConfigFileException Refused(string extra, string key)
    {
        var doc = ConfigDocument.Parse(Minimal + "\n" + extra + "\n", "recipe.yaml");
        var e = Assert.Throws<ConfigFileException>(() => TrainingRecipe.Parse(doc));
        Assert.Equal("recipe.yaml", e.FilePath);
        Assert.Equal(key, e.Key);
        Assert.StartsWith($"recipe.yaml: '{key}': ", e.Message);
        return e;
    }

    [Theory]
    [InlineData("learning_rate: 1e300", "learning_rate")]
    [InlineData("learning_rate: 1.5", "learning_rate")]
    [InlineData("learning_rate: 0", "learning_rate")]
    [InlineData("learning_rate: .nan", "learning_rate")]
    [InlineData("learning_rate: 1e400", "learning_rate")]
    [InlineData("num_epochs: 1e9", "num_epochs")]
    [InlineData("num_train_epochs: -2", "num_train_epochs")]
    [InlineData("max_steps: 0", "max_steps")]
    [InlineData("max_steps: 1e10", "max_steps")]
    [InlineData("batch_size: 0", "batch_size")]
    [InlineData("batch_size: 65537", "batch_size")]
    [InlineData("micro_batch_size: 100000", "micro_batch_size")]
    [InlineData("eval_batch_size: -1", "eval_batch_size")]
    [InlineData("gradient_accumulation_steps: 1000000", "gradient_accumulation_steps")]
    [InlineData("warmup_steps: -1", "warmup_steps")]
    [InlineData("warmup_ratio: 1", "warmup_ratio")]
    [InlineData("weight_decay: -0.1", "weight_decay")]
    [InlineData("weight_decay: 1e10", "weight_decay")]
    [InlineData("adam_beta1: 1", "adam_beta1")]
    [InlineData("adam_beta2: -0.5", "adam_beta2")]
    [InlineData("adam_epsilon: 0", "adam_epsilon")]
    [InlineData("adam_epsilon: 10", "adam_epsilon")]
    [InlineData("max_grad_norm: -1", "max_grad_norm")]
    [InlineData("max_grad_norm: .inf", "max_grad_norm")]
    [InlineData("logging_steps: 0", "logging_steps")]
    [InlineData("save_total_limit: -3", "save_total_limit")]
    [InlineData("seed: -1", "seed")]
    [InlineData("seed: 99999999999", "seed")]
    [InlineData("cutoff_len: 1", "cutoff_len")]
    [InlineData("cutoff_len: 2000000", "cutoff_len")]
    [InlineData("sequence_len: 0", "sequence_len")]
    [InlineData("pad_token_id: -1", "pad_token_id")]
    [InlineData("val_size: 1", "val_size")]
    [InlineData("val_size: NaN", "val_size")]
    [InlineData("max_samples: -1", "max_samples")]
    [InlineData("eval_max_new_tokens: 0", "eval_max_new_tokens")]
    [InlineData("eval_max_new_tokens: 2000000", "eval_max_new_tokens")]
    [InlineData("report_samples_per_family: 1000000", "report_samples_per_family")]
    [InlineData("adapter: {r: 0}", "adapter.r")]
    [InlineData("adapter: {r: 100000}", "adapter.r")]
    [InlineData("adapter: {lora_alpha: 1e999}", "adapter.lora_alpha")]
    [InlineData("adapter: {lora_dropout: 1}", "adapter.lora_dropout")]
    [InlineData("adapter: {type: mixlora, num_experts: 5000, top_k: 2}", "adapter.num_experts")]
    [InlineData("adapter: {type: mixlora, r: 1000000}", "adapter.r")]
    [InlineData("adapter: {type: mixlora, temperature: .inf}", "adapter.temperature")]
    [InlineData("adapter: {type: mixlora, expert_lora: {r: 0}}", "adapter.expert_lora.r")]
    public void OutOfRangeValuesNameTheFileAndTheKey(string extra, string key) => Refused(extra, key);

    [Fact]
    public void ProgrammaticOptionsHaveTheSameRanges()
    {
        var ok = new TrainingOptions { OutputDir = "o" };
        ok.Validate();
        foreach (var (bad, key) in new (TrainingOptions, string)[]
        {
            (ok with { LearningRate = 1e300 }, "learning_rate"), (ok with { NumEpochs = double.PositiveInfinity }, "num_epochs"),
            (ok with { BatchSize = 1 << 20 }, "batch_size"), (ok with { Seed = -1 }, "seed"), (ok with { CutoffLen = int.MaxValue }, "cutoff_len"),
            (ok with { AdamEpsilon = double.NaN }, "adam_epsilon"), (ok with { WeightDecay = 1e4 }, "weight_decay"),
        })
            Assert.Contains($"training options: '{key}': ", Assert.Throws<LoraMixException>(() => bad.Validate()).Message);
    }

    [Fact]
    public void PathsWithNulAreRefused()
    {
        var doc = ConfigDocument.Parse(Minimal, "recipe.yaml");
        doc.Set("output_dir=\"a\\0b\"");
        Assert.Equal("output_dir", Assert.Throws<ConfigFileException>(() => TrainingRecipe.Parse(doc)).Key);
    }

    [Theory]
    [InlineData("dataset.task_world.count", "dataset: {task_world: {families: [first_word], count: 2000000}}")]
    [InlineData("dataset.task_world.seed", "dataset: {task_world: {families: [first_word], seed: -4}}")]
    public void TaskWorldSourcesAreBounded(string key, string dataset)
    {
        var doc = ConfigDocument.Parse($"model: m\noutput_dir: o\n{dataset}\n", "recipe.yaml");
        Assert.Equal(key, Assert.Throws<ConfigFileException>(() => TrainingRecipe.Parse(doc)).Key);
    }

    [Theory]
    [InlineData("hidden_size: 1000000", "model_init.hidden_size")]
    [InlineData("num_hidden_layers: 100000", "model_init.num_hidden_layers")]
    [InlineData("max_position_embeddings: 100000000", "model_init.max_position_embeddings")]
    [InlineData("vocab_size: 1000000000", "model_init.vocab_size")]
    [InlineData("rope_theta: 1e300", "model_init.rope_theta")]
    [InlineData("rms_norm_eps: 2", "model_init.rms_norm_eps")]
    [InlineData("seed: -1", "model_init.seed")]
    public void ModelInitSizesAreBounded(string extra, string key)
    {
        var doc = ConfigDocument.Parse($"dataset: d.jsonl\noutput_dir: o\nmodel_init:\n  preset: tiny\n  tokenizer: byte-level\n  {extra}\n", "recipe.yaml");
        Assert.Equal(key, Assert.Throws<ConfigFileException>(() => TrainingRecipe.Parse(doc)).Key);
    }

    [Fact]
    public void ValuesAtTheEdgesOfTheirRangesAreAccepted()
    {
        var r = TrainingRecipe.Parse(ConfigDocument.Parse(Minimal + """

            learning_rate: 1
            batch_size: 65536
            cutoff_len: 1048576
            seed: 0
            weight_decay: 0.999
            adam_beta1: 0
            max_grad_norm: 0
            num_epochs: 0.5
            """, "recipe.yaml"));
        Assert.Equal(1, r.Trainer.LearningRate);
        Assert.Equal(65536, r.Trainer.BatchSize);
        Assert.Equal(1 << 20, r.Trainer.CutoffLen);
    }

    [Fact]
    public void AnInvalidRecipeWritesNothing()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"));
        string outDir = _dir.Sub("out");
        string config = RecipeFixtures.LoraYaml(_dir.Sub("lora.yaml"), model, data, outDir);

        var r = CliRun.Run("train", "--config", config, "--set", "learning_rate=1e300");
        Assert.NotEqual(0, r.Code);
        Assert.Contains($"{config}: 'learning_rate': must be in (0, 1]", r.Err + r.Out);
        Assert.DoesNotContain("   at ", r.Err);   // a message, not a stack trace
        Assert.False(Directory.Exists(outDir));

        // a bad dataset file is read before anything is written too, also for pre-training (which writes a tokenizer)
        string bad = _dir.Sub("bad.jsonl");
        File.WriteAllBytes(bad, [.. "{\"text\": \"a"u8, 0xFF, .. "\"}\n"u8]);
        File.WriteAllText(_dir.Sub("pre.yaml"), $"""
            model_init: {"{"}preset: tiny, tokenizer: byte-level{"}"}
            dataset: {bad}
            output_dir: {outDir}
            max_steps: 1
            """);
        var p = CliRun.Run("pretrain", "--config", _dir.Sub("pre.yaml"));
        Assert.NotEqual(0, p.Code);
        Assert.Contains($"{bad}:1: invalid UTF-8", p.Err + p.Out);
        Assert.False(Directory.Exists(outDir));
    }

    [Theory]
    [InlineData("adapter: {target_modules: \"(q_proj\"}")]
    [InlineData("adapter: {target_modules: \"[a-\"}")]
    [InlineData("adapter: {target_modules: \"*\"}")]
    public void AnInvalidTargetRegexNamesTheKeyAndTheRegexError(string extra)
    {
        var e = Refused(extra, "adapter.target_modules");
        Assert.Contains("not a valid regular expression", e.Message);
    }

    [Fact]
    public void AnInvalidTargetRegexInAdapterConfigJsonNamesTheFile()
    {
        string path = _dir.Sub("adapter_config.json");
        File.WriteAllText(path, """{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ".*(proj"}""");
        var e = Assert.Throws<AdapterConfigException>(() => LoraConfig.Load(path));
        Assert.Equal("target_modules", e.Key);
        Assert.Contains(path, e.Message);
        Assert.Contains(".*(proj", e.Message);
        File.WriteAllText(path, """{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": 7}""");
        Assert.Contains("target_modules", Assert.ThrowsAny<LoraMixException>(() => LoraConfig.Load(path)).Message);
    }

    [Fact]
    public void ACatastrophicallyBacktrackingTargetRegexTimesOutTyped()
    {
        var cfg = new LoraConfig { TargetRegex = "(x+x+)+y", TargetModules = null };
        cfg.Validate();
        var watch = Stopwatch.StartNew();
        var e = Assert.Throws<AdapterConfigException>(() => cfg.Targets(new string('x', 5_000)));
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(8), $"took {watch.Elapsed}");
        Assert.Equal("target_modules", e.Key);
        Assert.Contains("backtracking", e.Message);
        Assert.True(new LoraConfig { TargetRegex = @"model\.layers\.\d+\.self_attn\.(q|v)_proj", TargetModules = null }
            .Targets("model.layers.3.self_attn.v_proj"));
    }
}
