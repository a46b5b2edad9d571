using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Training;

/// <summary>Parsing and validation of training recipes (no model is loaded).</summary>
public sealed class RecipeParseTests
{
    private static TrainingRecipe Parse(string yaml, params string[] overrides)
    {
        var doc = ConfigDocument.Parse(yaml, "recipe.yaml");
        foreach (var o in overrides) doc.Set(o);
        return TrainingRecipe.Parse(doc);
    }

    private const string Minimal = """
        model: models/base
        dataset: data.jsonl
        output_dir: out/a
        """;

    [Fact]
    public void AMinimalRecipeIsALoraAdapterWithPeftDefaults()
    {
        var r = Parse(Minimal);
        Assert.Equal(RecipeMethod.Lora, r.Method);
        Assert.Equal("models/base", r.ModelPath);
        Assert.Equal(["data.jsonl"], r.Dataset.Files);
        Assert.Equal(8, r.Lora!.R);
        Assert.Equal(8, r.Lora.LoraAlpha);
        Assert.Equal(["q_proj", "v_proj"], r.Lora.TargetModules);
        Assert.Equal("models/base", r.Lora.BaseModelNameOrPath);
        Assert.False(r.TrainOnPrompt);
        Assert.False(r.RunsExactMatch);
        Assert.Equal("out/a", r.Trainer.OutputDir);
    }

    [Fact]
    public void UnknownKeysAreRejectedNamingTheKeyAndTheFile()
    {
        var e = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nlearning_rat: 1e-4\n"));
        Assert.Equal("learning_rat", e.Key);
        Assert.Contains("recipe.yaml", e.Message);
        Assert.Contains("unknown key", e.Message);

        var nested = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nadapter:\n  type: lora\n  rank: 8\n"));
        Assert.Equal("adapter.rank", nested.Key);
        // a known key that the chosen adapter type does not use is not silently ignored either
        var unused = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nadapter:\n  type: full\n  r: 8\n"));
        Assert.Equal("adapter.r", unused.Key);
        var viaSet = Assert.Throws<ConfigFileException>(() => Parse(Minimal, "adapter.num_expert=4"));
        Assert.Equal("adapter.num_expert", viaSet.Key);
    }

    [Fact]
    public void BadAdapterTypeAndModelConflictsAreRejected()
    {
        var type = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nadapter: {type: qlora}\n"));
        Assert.Equal("adapter.type", type.Key);
        Assert.Contains("lora, mixlora, xlora or full", type.Message);

        var both = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nmodel_init: {preset: tiny, tokenizer: byte-level}\n"));
        Assert.Equal("model_init", both.Key);
        Assert.Contains("keep one", both.Message);

        var neither = Assert.Throws<ConfigFileException>(() => Parse("dataset: d.jsonl\noutput_dir: o\n"));
        Assert.Equal("model", neither.Key);

        var loraOnInit = Assert.Throws<ConfigFileException>(() => Parse(
            "model_init: {preset: tiny, tokenizer: byte-level}\ndataset: d.jsonl\noutput_dir: o\nadapter: {type: lora}\n"));
        Assert.Equal("adapter.type", loraOnInit.Key);

        var badDataset = Assert.Throws<ConfigFileException>(() => Parse(Minimal.Replace("data.jsonl", "{task_world: {families: [nope]}}")));
        Assert.Equal("dataset.task_world.families", badDataset.Key);
        var badLr = Assert.Throws<ConfigFileException>(() => Parse(Minimal, "learning_rate=-1"));
        Assert.Contains("learning_rate", badLr.Message);
        var badMix = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nadapter: {type: mixlora, num_experts: 4, top_k: 5}\n"));
        Assert.Equal("adapter.top_k", badMix.Key);
        var both2 = Assert.Throws<ConfigFileException>(() => Parse(Minimal + "\nval_size: 0.1\neval_dataset: e.jsonl\n"));
        Assert.Equal("val_size", both2.Key);
    }

    [Fact]
    public void KeysSynonymsAndOverridesAreRead()
    {
        var r = Parse("""
            model_name_or_path: base
            dataset: [a.jsonl, b.json]
            eval_dataset: {task_world: {families: [held_out], count: 30, placement: mixed}}
            template: chatml
            train_on_prompt: true
            skip_bad: true
            num_train_epochs: 2
            per_device_train_batch_size: 4
            lr_scheduler_type: cosine
            output_dir: out
            adapter:
              type: lora
              r: 16
              lora_alpha: 32
              lora_dropout: 0.05
              target_modules: all-linear
              use_rslora: true
            """, "adapter.r=4", "learning_rate=1e-3");
        Assert.Equal("base", r.ModelPath);
        Assert.Equal(["a.jsonl", "b.json"], r.Dataset.Files);
        Assert.Equal(TaskWorld.HeldOutFamilies, r.EvalDataset!.TaskWorld!.Families);
        Assert.Equal(30, r.EvalDataset.TaskWorld.Count);
        Assert.Equal(TaskSplit.Test, r.EvalDataset.TaskWorld.Split);          // eval defaults to the test split
        Assert.Null(r.EvalDataset.TaskWorld.Placement);                      // mixed
        Assert.True(r.RunsExactMatch);                                       // always for a task-world eval set
        Assert.True(r.TrainOnPrompt && r.SkipBad);
        Assert.Equal(2, r.Trainer.NumEpochs);
        Assert.Equal(4, r.Trainer.BatchSize);
        Assert.Equal("cosine", r.Trainer.LrScheduler);
        Assert.Equal(1e-3, r.Trainer.LearningRate);
        Assert.Equal(4, r.Lora!.R);
        Assert.True(r.Lora.AllLinear && r.Lora.UseRsLora);
        Assert.Equal("chatml", r.Template);

        var mix = Parse(Minimal + """

            adapter:
              type: mixlora
              num_experts: 4
              top_k: 2
              r: 8
              lora_alpha: 16
              router_aux_loss_coef: 0.01
              router_z_loss_coef: 0.001
              target_modules: [q_proj, v_proj, gate_proj, up_proj, down_proj]
              expert_lora: {r: 4, lora_alpha: 8}
            """);
        Assert.Equal(RecipeMethod.MixLora, mix.Method);
        Assert.Equal(4, mix.MixLora!.NumExperts);
        Assert.Equal(0.01, mix.MixLora.RouterAuxLossCoef);
        Assert.Equal(0.001, mix.MixLora.RouterZLossCoef);
        Assert.Equal(4, mix.MixLora.ExpertR);
        Assert.Equal(["q_proj", "v_proj"], mix.MixLora.AttentionTargets);

        var pre = Parse("""
            model_init:
              hidden_size: 64
              intermediate_size: 128
              num_hidden_layers: 2
              num_attention_heads: 4
              num_key_value_heads: 2
              head_dim: 16
              max_position_embeddings: 256
              tie_word_embeddings: true
              tokenizer: byte-level
              seed: 5
            dataset: {task_world: {families: pretrain, count: 100}}
            output_dir: out/pre
            """);
        Assert.Equal(RecipeMethod.Full, pre.Method);
        Assert.Equal(64, pre.ModelInit!.Architecture.HiddenSize);
        Assert.True(pre.ModelInit.Architecture.TieWordEmbeddings);
        Assert.Equal(5, pre.ModelInit.Seed);
        Assert.Equal(TaskWorld.PretrainFamilies, pre.Dataset.TaskWorld!.Families);
        Assert.Equal(TaskSplit.Train, pre.Dataset.TaskWorld.Split);
        Assert.Equal(InstructionPlacement.System, pre.Dataset.TaskWorld.Placement);

        var badShape = Assert.Throws<ConfigFileException>(() => Parse("model_init: {hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 3, intermediate_size: 8, num_hidden_layers: 1, tokenizer: byte-level}\ndataset: d.jsonl\noutput_dir: o\n"));
        Assert.Contains("num_key_value_heads", badShape.Message);
    }
}

/// <summary>The example recipes and data under examples/ stay valid.</summary>
public sealed class RecipeExampleTests
{
    private static string ExamplesDir()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "examples", "pretrain-tiny.yaml"))) return Path.Combine(dir.FullName, "examples");
        throw new InvalidOperationException("examples/ not found above " + AppContext.BaseDirectory);
    }

    [Theory]
    [InlineData("lora-task-world.yaml", RecipeMethod.Lora)]
    [InlineData("mixlora-task-world.yaml", RecipeMethod.MixLora)]
    [InlineData("pretrain-tiny.yaml", RecipeMethod.Full)]
    [InlineData("pretrain-tiny-v2.yaml", RecipeMethod.Full)]
    [InlineData("lora-alpaca.yaml", RecipeMethod.Lora)]
    [InlineData("xlora-task-world.yaml", RecipeMethod.XLora)]
    public void ExampleRecipesParse(string file, RecipeMethod method)
    {
        var r = TrainingRecipe.Load(Path.Combine(ExamplesDir(), file));
        Assert.Equal(method, r.Method);
    }

    [Fact]
    public void ThePretrainExampleIsTheTinyArchitectureOnThePretrainFamilies()
    {
        var r = TrainingRecipe.Load(Path.Combine(ExamplesDir(), "pretrain-tiny.yaml"));
        var a = r.ModelInit!.Architecture with { VocabSize = LoraMix.Tokenization.ByteLevelTokenizerFiles.VocabSize() };
        Assert.InRange(a.ParameterCount(), 2_500_000, 3_500_000);
        Assert.Equal(TaskWorld.PretrainFamilies, r.Dataset.TaskWorld!.Families);
        Assert.Empty(r.Dataset.TaskWorld.Families.Intersect(TaskWorld.HeldOutFamilies));
        Assert.Null(r.Dataset.TaskWorld.Placement);
        Assert.Equal("models/loramix-tiny", r.Trainer.OutputDir);
    }

    [Fact]
    public void TheExampleDataTrainsOneStepOnATinyModel()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        string ex = ExamplesDir();
        var r = TrainingRecipe.Load(Path.Combine(ex, "lora-alpaca.yaml"),
        [
            $"model={model}", $"output_dir={dir.Sub("out")}", "max_steps=1", "num_epochs=1",
            $"dataset=[{Path.Combine(ex, "data", "alpaca-tiny.jsonl")}, {Path.Combine(ex, "data", "chat-tiny.jsonl")}]",
        ]);
        var result = r.Run();
        Assert.Equal(10, result.TrainExamples + result.EvalExamples);
        Assert.Empty(result.Skipped);
        Assert.True(File.Exists(Path.Combine(dir.Sub("out"), "adapter_model.safetensors")));
    }
}
