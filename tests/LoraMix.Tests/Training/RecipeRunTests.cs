using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Modeling;
using LoraMix.Tokenization;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Training;

/// <summary>Recipes run end to end on a tiny random model with a byte-level tokenizer (a few steps each).</summary>
public sealed class RecipeRunTests
{
    private static TrainingRecipe Recipe(string yaml, string source) => TrainingRecipe.Parse(ConfigDocument.Parse(yaml, source));

    [Fact]
    public void ABadRecordFailsWithFileAndLineAndSkipBadCountsIt()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(dir.Sub("data.jsonl"), 8, badLineAt3: """{"messages":[{"role":"wizard","content":"x"}]}""");
        string yaml = File.ReadAllText(RecipeFixtures.LoraYaml(dir.Sub("r.yaml"), model, data, dir.Sub("out"))).Replace("max_steps: 3", "max_steps: 1");

        var e = Assert.Throws<DatasetFileException>(() => Recipe(yaml, "r.yaml").Run());
        Assert.Equal(3, e.Line);
        Assert.Contains($"{data}:3:", e.Message);
        Assert.Contains("wizard", e.Message);

        var result = Recipe(yaml + "\nskip_bad: true\n", "r.yaml").Run();
        Assert.Single(result.Skipped);
        Assert.Contains($"{data}:3:", result.Skipped[0]);
        Assert.Equal(7, result.TrainExamples);

        // a record that parses but cannot be turned into an example (an empty text) also names its file and line
        string texts = dir.Sub("texts.jsonl");
        File.WriteAllText(texts, "{\"text\": \"hello there\"}\n{\"text\": \"\"}\n");
        string yaml2 = yaml.Replace(data, texts).Replace(dir.Sub("out"), dir.Sub("out2"));
        var e2 = Assert.Throws<DatasetFileException>(() => Recipe(yaml2, "r.yaml").Run());
        Assert.Contains($"{texts}:2:", e2.Message);
    }

    [Fact]
    public void MixLoraTrainsThroughTheRecipeWritingMoePeftFilesAndLoggingRouterLosses()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(dir.Sub("data.jsonl"), 12);
        string outDir = dir.Sub("mix");
        var recipe = Recipe($"""
            model: {model}
            dataset: {data}
            val_size: 0.25
            eval_exact_match: true
            eval_max_new_tokens: 8
            output_dir: {outDir}
            cutoff_len: 64
            adapter:
              type: mixlora
              num_experts: 4
              top_k: 2
              r: 4
              lora_alpha: 8
              router_aux_loss_coef: 0.01
              router_z_loss_coef: 0.001
              target_modules: all-linear
            learning_rate: 5.0e-3
            max_steps: 3
            batch_size: 4
            logging_steps: 1
            eval_steps: 3
            """, "mix.yaml");
        var result = recipe.Run();

        foreach (var f in new[] { "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "routing_stats.json", "eval_results.json" })
            Assert.True(File.Exists(Path.Combine(outDir, f)), f);
        var cfg = MixLoraConfig.Load(Path.Combine(outDir, "adapter_config.json"));
        Assert.Equal(4, cfg.NumExperts);
        Assert.Equal(model, cfg.BaseModelNameOrPath);

        var lines = File.ReadAllLines(Path.Combine(outDir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(3, lines.Count);
        foreach (var l in lines)
        {
            Assert.True(l["load_balance_loss"]!.GetValue<double>() > 0);
            Assert.True(l["z_loss"]!.GetValue<double>() > 0);
            Assert.Equal(l["load_balance_loss"]!.GetValue<double>() + l["z_loss"]!.GetValue<double>(), l["aux_loss"]!.GetValue<double>(), 6);
            Assert.True(l["router_entropy"]!.GetValue<double>() > 0);
        }
        Assert.NotNull(lines[^1]["eval_loss"]);
        Assert.NotNull(lines[^1]["eval_router_entropy"]);
        Assert.Equal(3, result.Routing!.Count);                                  // tiny has 3 layers
        foreach (var layer in result.Routing) Assert.Equal(1.0, layer.ExpertLoad.Sum(), 6);
        Assert.NotNull(result.ExactMatch);                                       // evaluated through the engine, MixLoRA loaded from disk
        Assert.Equal(3, result.ExactMatch!.Total);
        Assert.Equal(result.AdapterDir, outDir);
    }

    [Fact]
    public void TextRecordsTrainOnEveryTokenAndTrainOnPromptExtendsTheChatMask()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        var tok = TextTokenizer.FromDirectory(model);
        var renderer = new ChatRenderer(tok);
        var text = TrainingData.FromRecord(new DatasetRecord(1, null, "hello"), renderer);
        Assert.Equal([.. tok.Encode("hello", false), tok.EosId!.Value], text.InputIds);
        Assert.All(text.LossMask, Assert.True);

        var chat = new DatasetRecord(1, [ChatMessage.User("hi"), ChatMessage.Assistant("yo")], null);
        var assistantOnly = TrainingData.FromRecord(chat, renderer);
        var all = TrainingData.FromRecord(chat, renderer, trainOnPrompt: true);
        Assert.Equal(assistantOnly.InputIds, all.InputIds);
        Assert.Equal(renderer.Render(chat.Messages!).LossMask, assistantOnly.LossMask);
        Assert.True(assistantOnly.TargetCount < all.TargetCount);
        Assert.All(all.LossMask, Assert.True);
    }
}
