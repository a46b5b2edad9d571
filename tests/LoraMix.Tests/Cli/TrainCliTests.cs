using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Cli;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Adapters;
using LoraMix.Tests.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Cli;

/// <summary>The training verbs: train, pretrain, eval, merge — on tiny random models with a byte-level tokenizer.</summary>
public sealed class TrainCliTests : IDisposable
{
    private readonly TempDir _dir = new();

    public TrainCliTests() => Directory.CreateDirectory(_dir.Path);

    public void Dispose() => _dir.Dispose();

    private static (int Code, string Out, string Err) Run(params string[] args) => CliRun.Run(args);

    private static List<JsonObject> Metrics(string dir) =>
        File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    [Fact]
    public void TrainWritesAPeftAdapterMetricsAndLossPlotAndHonoursSetOverrides()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"));
        string outDir = _dir.Sub("out");
        string config = RecipeFixtures.LoraYaml(_dir.Sub("lora.yaml"), model, data, outDir);

        var r = Run("train", "--config", config, "--set", "max_steps=2", "--set", "adapter.r=2");
        Assert.True(r.Code == 0, r.Err + r.Out);
        foreach (var f in new[] { "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "trainer_state.json", "training_args.json" })
            Assert.True(File.Exists(Path.Combine(outDir, f)), f);
        Assert.False(File.Exists(Path.Combine(outDir, "adapter_model.bin")));
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!.AsObject();
        Assert.Equal("LORA", cfg["peft_type"]!.GetValue<string>());
        Assert.Equal(2, cfg["r"]!.GetValue<int>());                              // --set adapter.r=2
        Assert.Equal("all-linear", cfg["target_modules"]!.GetValue<string>());
        Assert.Equal(model, cfg["base_model_name_or_path"]!.GetValue<string>());
        Assert.Equal([1, 2], Metrics(outDir).Select(m => m["step"]!.GetValue<int>()));   // --set max_steps=2
        Assert.Contains($"adapter:     {outDir}", r.Out);
        Assert.Contains(Path.Combine(outDir, "metrics.jsonl"), r.Out);
        Assert.Contains(Path.Combine(outDir, "loss.png"), r.Out);
        Assert.Contains("step 2/2", r.Out);

        // the adapter loads in the engine with PEFT key names and changes the output
        using var engine = ChatEngine.Load(model, new EngineOptions { Adapters = [outDir] });
        var keys = LoraAdapters.PeftStateDict(engine.Model).Select(kv => kv.Key).ToList();
        Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", keys);
        Assert.Contains("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight", keys);
    }

    [Fact]
    public void ResumeLatestContinuesTheRun()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"));
        string outDir = _dir.Sub("out");
        string config = RecipeFixtures.LoraYaml(_dir.Sub("lora.yaml"), model, data, outDir, "save_steps: 2");

        var first = Run("train", "--config", config, "--set", "max_steps=2");
        Assert.True(first.Code == 0, first.Err);
        Assert.True(Directory.Exists(Path.Combine(outDir, "checkpoint-2")));
        var before = Metrics(outDir);

        // a fresh run into the same directory is refused; --resume (latest) continues from checkpoint-2
        var refused = Run("train", "--config", config, "--set", "max_steps=4");
        Assert.Equal(CliApp.ExitError, refused.Code);
        Assert.Contains("resume_from_checkpoint", refused.Err);
        var resumed = Run("train", "--config", config, "--set", "max_steps=4", "--resume");
        Assert.True(resumed.Code == 0, resumed.Err);
        Assert.Contains("resumed from", resumed.Out);
        Assert.Contains("checkpoint-2", resumed.Out);
        var after = Metrics(outDir);
        Assert.Equal([1, 2, 3, 4], after.Select(m => m["step"]!.GetValue<int>()));
        Assert.Equal(before.Select(m => m["loss"]!.GetValue<double>()), after.Take(2).Select(m => m["loss"]!.GetValue<double>()));

        var explicitDir = Run("train", "--config", config, "--set", "max_steps=5", "--resume", Path.Combine(outDir, "checkpoint-4"));
        Assert.True(explicitDir.Code == 0, explicitDir.Err);
        Assert.Equal(5, Metrics(outDir).Count);
    }

    [Fact]
    public void UnknownKeysAndBadDataFailWithExitCode1NamingKeyFileAndLine()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"), 6, badLineAt3: "{not json");
        string config = RecipeFixtures.LoraYaml(_dir.Sub("lora.yaml"), model, data, _dir.Sub("out"), "lora_rank: 8");
        var unknown = Run("train", "--config", config);
        Assert.Equal(CliApp.ExitError, unknown.Code);
        Assert.Contains("lora_rank", unknown.Err);
        Assert.Contains(config, unknown.Err);

        File.WriteAllText(config, File.ReadAllText(config).Replace("lora_rank: 8", ""));
        var bad = Run("train", "--config", config);
        Assert.Equal(CliApp.ExitError, bad.Code);
        Assert.Contains($"{data}:3:", bad.Err);
        var skipped = Run("train", "--config", config, "--set", "skip_bad=true", "--set", "max_steps=1");
        Assert.True(skipped.Code == 0, skipped.Err);
        Assert.Contains("1 bad record", skipped.Out);

        Assert.Equal(CliApp.ExitUsage, Run("train").Code);                     // --config is required
    }

    [Fact]
    public void EvalPrintsLossPerplexityAndExactMatchPerFamily()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"), 6);
        var r = Run("eval", "--model", model, "--dataset", data, "--max-new-tokens", "4", "--json");
        Assert.True(r.Code == 0, r.Err);
        var o = JsonNode.Parse(r.Out)!.AsObject();
        double loss = o["loss"]!.GetValue<double>();
        Assert.InRange(loss, 1.0, 20.0);
        Assert.Equal(Math.Exp(loss), o["perplexity"]!.GetValue<double>(), 6);
        Assert.Equal(6, o["examples"]!.GetValue<int>());
        Assert.Equal(6, o["exact_match_count"]!.GetValue<int>());
        Assert.InRange(o["exact_match"]!.GetValue<double>(), 0.0, 1.0);
        var families = o["exact_match_by_family"]!.AsObject().Select(kv => kv.Key).ToList();
        Assert.Equal(["even", "odd"], families);

        var text = Run("eval", "--model", model, "--dataset", data, "--max-new-tokens", "4");
        Assert.True(text.Code == 0, text.Err);
        Assert.Contains("perplexity:", text.Out);
        Assert.Contains("exact match:", text.Out);
        Assert.Contains("even", text.Out);

        // plain text data has no answers: loss and perplexity only
        string texts = _dir.Sub("t.txt");
        File.WriteAllText(texts, "hello there\n\nanother document\n");
        var t = JsonNode.Parse(Run("eval", "--model", model, "--dataset", texts, "--json").Out)!.AsObject();
        Assert.Null(t["exact_match"]);
        Assert.Equal(2, t["examples"]!.GetValue<int>());
    }

    [Fact]
    public void MergeEqualsBasePlusAdapterAndRefusesMixLora()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string adapter = _dir.Sub("adapter");
        var cfg = new LoraConfig { R = 4, LoraAlpha = 8, AllLinear = true, TargetModules = null };
        using (var m = LlamaForCausalLM.FromPretrained(model))
        {
            LoraAdapters.Attach(m, cfg, seed: 1);
            using (no_grad())
                foreach (var (key, t) in LoraAdapters.PeftStateDict(m))
                    if (key.Contains("lora_B", StringComparison.Ordinal)) t.copy_(randn(t.shape, generator: new TorchSharp.torch.Generator(5)) * 0.05);
            LoraAdapters.Save(m, cfg, adapter);
        }
        string merged = _dir.Sub("merged");
        var r = Run("merge", "--model", model, "--adapter", adapter, "--out", merged);
        Assert.True(r.Code == 0, r.Err);
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json" })
            Assert.True(File.Exists(Path.Combine(merged, f)), f);

        using var ids = tensor(new long[] { 60, 61, 62, 257, 10, 70, 71 }, [1, 7]);
        using var withAdapter = ChatEngine.Load(model, new EngineOptions { Adapters = [adapter] });
        using var baseOnly = ChatEngine.Load(model);
        using var mergedEngine = ChatEngine.Load(merged);
        using var a = withAdapter.Model.Forward(ids, adapters: AdapterSelection.Of(withAdapter.DefaultAdapters));
        using var m2 = mergedEngine.Model.Forward(ids);
        using var b = baseOnly.Model.Forward(ids);
        Assert.True(a.allclose(m2, rtol: 1e-4, atol: 1e-5), $"max diff {(a - m2).abs().max().item<float>()}");
        Assert.False(a.allclose(b, rtol: 1e-4, atol: 1e-5));                 // the adapter does change the output

        // MixLoRA cannot be merged: a clear error, nothing written
        string mix = _dir.Sub("mix");
        using (var m = LlamaForCausalLM.FromPretrained(model))
        {
            var mc = MixLoraTestKit.Config();
            MixLoraAdapters.Attach(m, mc);
            MixLoraAdapters.Save(m, mc, mix);
        }
        var refused = Run("merge", "--model", model, "--adapter", mix, "--out", _dir.Sub("merged-mix"));
        Assert.Equal(CliApp.ExitError, refused.Code);
        Assert.Contains("MixLoRA adapter, which cannot be merged", refused.Err);
        Assert.False(Directory.Exists(_dir.Sub("merged-mix")));
    }

    [Fact]
    public void PretrainWritesALoadableModelDirectoryWithTokenizerAndReport()
    {
        string outDir = _dir.Sub("pre");
        string config = _dir.Sub("pre.yaml");
        File.WriteAllText(config, $"""
            model_init:
              hidden_size: 32
              intermediate_size: 64
              num_hidden_layers: 2
              num_attention_heads: 2
              num_key_value_heads: 1
              head_dim: 16
              max_position_embeddings: 256
              tie_word_embeddings: true
              tokenizer: byte-level
            dataset:
              task_world:
                families: [uppercase, sort_words]
                count: 16
                placement: mixed
            output_dir: {outDir}
            cutoff_len: 160
            learning_rate: 2.0e-3
            max_steps: 2
            batch_size: 8
            logging_steps: 1
            report_samples_per_family: 1
            eval_max_new_tokens: 4
            """);
        var r = Run("pretrain", "--config", config);
        Assert.True(r.Code == 0, r.Err + r.Out);
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "pretrain_report.json", "metrics.jsonl", "loss.png" })
            Assert.True(File.Exists(Path.Combine(outDir, f)), f);
        Assert.Contains("pretrain_report.json", r.Out);

        var report = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "pretrain_report.json")))!.AsObject();
        Assert.Equal(LoraMix.Data.TaskWorld.Families.Order(), report["exact_match_by_family"]!.AsObject().Select(kv => kv.Key).Order());
        Assert.Equal(["uppercase", "sort_words"], report["trained_families"]!.AsArray().Select(n => n!.GetValue<string>()));
        Assert.Equal(2, report["steps"]!.GetValue<int>());

        using var engine = ChatEngine.Load(outDir);                             // weights + tokenizer + template
        Assert.Equal(LoraMix.Tokenization.ByteLevelTokenizerFiles.VocabSize(), engine.Model.Config.VocabSize);
        Assert.True(engine.Model.Config.TieWordEmbeddings);
        Assert.Equal([engine.Tokenizer.EosId!.Value], engine.Model.Config.EosTokenIds);
        Assert.Equal("chatml", engine.Renderer.Template.Name);

        var notInit = Run("pretrain", "--config", RecipeFixtures.LoraYaml(_dir.Sub("l.yaml"), outDir, "x.jsonl", _dir.Sub("o")));
        Assert.Equal(CliApp.ExitError, notInit.Code);
        Assert.Contains("model_init", notInit.Err);
    }
}
