using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

public sealed class LoraTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-lora-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static readonly LoraConfig AllLinear = new() { R = 4, LoraAlpha = 8, AllLinear = true, TargetModules = null };

    private static void RandomizeB(LlamaForCausalLM model, string adapter, int seed)
    {
        using var gen = new TorchSharp.torch.Generator((ulong)seed, CPU);
        using var noGrad = no_grad();
        foreach (var (_, layer) in LoraAdapters.AdaptedLayers(model))
            if (layer.HasAdapter(adapter)) layer.GetAdapter(adapter).B.normal_(0, 0.05, gen);
    }

    private static Tensor Ids(params long[] ids) => tensor(ids).unsqueeze(0);

    [Fact]
    public void FreshAdapterIsAnExactNoOp()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 1);
        var before = model.Forward(Ids(1, 5, 9, 200));
        LoraAdapters.Attach(model, AllLinear);
        Assert.Equal(7 * TestModels.Llama.NumHiddenLayers, LoraAdapters.AdaptedLayers(model).Count);
        Assert.True(before.equal(model.Forward(Ids(1, 5, 9, 200), adapters: AdapterSelection.Of("default"))).all().item<bool>());
    }

    [Fact]
    public void AdaptedForwardEqualsTheNaiveModelWithMergedWeights()
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama3Scaled;   // tied embeddings, biases, GQA
        using var model = TestModels.Random(cfg, 2);
        LoraAdapters.Attach(model, AllLinear with { UseRsLora = true });
        RandomizeB(model, "default", 3);
        var ids = TestModels.RandomIds(9, cfg.VocabSize, 4);
        // Independent: W' = W + (α/√r)·B·A computed here, run through the float64 reference.
        var sd = model.state_dict().Where(kv => !kv.Key.Contains(".lora.")).ToDictionary(kv => kv.Key, kv => kv.Value.to(ScalarType.Float64));
        foreach (var (path, layer) in LoraAdapters.AdaptedLayers(model))
        {
            var d = layer.GetAdapter("default");
            sd[path + ".weight"] = sd[path + ".weight"] + d.B.to(ScalarType.Float64).matmul(d.A.to(ScalarType.Float64)) * (8 / Math.Sqrt(4));
        }
        var expected = NaiveLlama.Forward(cfg, sd, ids);
        double err = TestModels.RelativeError(model.Forward(tensor(ids).unsqueeze(0), adapters: AdapterSelection.Of("default"))[0], expected);
        Assert.True(err < 2e-5, $"relative error {err:E3}");
    }

    [Fact]
    public void MergeUnmergeAndExportedMergedCheckpointEqualBasePlusAdapter()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 5);
        var originalQ = model.Model.Layers[0].SelfAttention.GetProjection("q_proj") is LinearLayer l ? l.Weight.clone() : throw new InvalidOperationException();
        LoraAdapters.Attach(model, AllLinear);
        RandomizeB(model, "default", 6);
        var ids = Ids(1, 2, 3, 4, 5, 6);
        var adapted = model.Forward(ids, adapters: AdapterSelection.Of("default"));

        LoraAdapters.ExportMerged(model, _dir);
        using var merged = LlamaForCausalLM.FromPretrained(_dir);
        Assert.True(TestModels.RelativeError(merged.Forward(ids), adapted) < 1e-5);

        LoraAdapters.Merge(model);
        Assert.True(TestModels.RelativeError(model.Forward(ids, adapters: AdapterSelection.Of("default")), adapted) < 1e-5);
        LoraAdapters.Unmerge(model);
        var q = ((AdaptedLinear)model.Model.Layers[0].SelfAttention.GetProjection("q_proj")).Weight;
        Assert.True(TestModels.RelativeError(q, originalQ) < 1e-6);
        Assert.True(TestModels.RelativeError(model.Forward(ids, adapters: AdapterSelection.Of("default")), adapted) < 1e-5);
    }

    [Fact]
    public void SavedAdapterHasPeftLayoutAndLoadsBackIdentically()
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama;
        using var model = TestModels.Random(cfg, 7);
        var config = new LoraConfig { R = 8, LoraAlpha = 16, LoraDropout = 0.05, TargetModules = ["q_proj", "v_proj", "down_proj"], BaseModelNameOrPath = "tiny" };
        LoraAdapters.Attach(model, config);
        RandomizeB(model, "default", 8);
        LoraAdapters.Save(model, config, _dir);

        // adapter_config.json: PEFT's field set, sorted keys
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "adapter_config.json")))!.AsObject();
        var keys = json.Select(kv => kv.Key).ToList();
        Assert.Equal(keys.OrderBy(k => k, StringComparer.Ordinal), keys);
        Assert.Equal("LORA", (string?)json["peft_type"]);
        Assert.Equal(8, (int)json["r"]!);
        Assert.Equal(16, (int)json["lora_alpha"]!);
        Assert.Equal("CAUSAL_LM", (string?)json["task_type"]);
        Assert.Equal("none", (string?)json["bias"]);
        Assert.False((bool)json["use_rslora"]!);
        Assert.Equal(["q_proj", "v_proj", "down_proj"], json["target_modules"]!.AsArray().Select(n => (string)n!));

        // adapter_model.safetensors: PEFT key names, shapes, fp32
        using (var st = SafetensorsReader.Open(Path.Combine(_dir, "adapter_model.safetensors")))
        {
            Assert.Equal("pt", st.Metadata["format"]);
            var expected = new List<string>();
            for (int i = 0; i < cfg.NumHiddenLayers; i++)
                foreach (var m in new[] { "self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj" })
                    expected.AddRange([$"base_model.model.model.layers.{i}.{m}.lora_A.weight", $"base_model.model.model.layers.{i}.{m}.lora_B.weight"]);
            Assert.Equal(expected.Order(), st.Entries.Select(e => e.Name).Order());
            Assert.All(st.Entries, e => Assert.Equal(SafetensorsDType.F32, e.DType));
            Assert.Equal([8L, 96], st.GetEntry("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").Shape);
            Assert.Equal([32L, 8], st.GetEntry("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").Shape);
            Assert.Equal([96L, 8], st.GetEntry("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight").Shape);
            Assert.Equal([8L, 256], st.GetEntry("base_model.model.model.layers.2.mlp.down_proj.lora_A.weight").Shape);
        }

        model.eval();
        var ids = Ids(1, 9, 8, 7);
        var expectedLogits = model.Forward(ids, adapters: AdapterSelection.Of("default"));
        using var fresh = TestModels.Random(cfg, 7);
        var loadedCfg = LoraAdapters.Load(fresh, _dir);
        fresh.eval();
        Assert.Equal(config with { InferenceMode = loadedCfg.InferenceMode }, loadedCfg with { TargetModules = config.TargetModules });
        Assert.True(expectedLogits.equal(fresh.Forward(ids, adapters: AdapterSelection.Of("default"))).all().item<bool>());
    }

    [Fact]
    public void AHandWrittenPeftAdapterLoads()
    {
        // What PEFT writes for LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]) on a 3-layer model, written here
        // without LoraMix's writer for the config.
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama;
        Directory.CreateDirectory(_dir);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), """
            {
              "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "meta-llama/Llama-3.2-1B", "bias": "none",
              "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layer_replication": null,
              "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 4, "lora_dropout": 0.1,
              "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null, "peft_type": "LORA", "r": 2,
              "rank_pattern": {}, "revision": null, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "use_dora": false,
              "use_rslora": false
            }
            """);
        var tensors = new Dictionary<string, Tensor>();
        using var gen = new TorchSharp.torch.Generator(11, CPU);
        for (int i = 0; i < cfg.NumHiddenLayers; i++)
        {
            tensors[$"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = randn([2, 96], generator: gen);
            tensors[$"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = randn([96, 2], generator: gen);
        }
        SafetensorsWriter.Write(Path.Combine(_dir, "adapter_model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        using var model = TestModels.Random(cfg, 1);
        var baseline = model.Forward(Ids(1, 2, 3));
        LoraAdapters.Load(model, _dir, "peft");
        model.eval();
        var q0 = (AdaptedLinear)model.Model.Layers[0].SelfAttention.GetProjection("q_proj");
        Assert.Equal(2.0, q0.GetAdapter("peft").Scale);
        Assert.True(q0.GetAdapter("peft").A.equal(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]).all().item<bool>());
        Assert.False(baseline.equal(model.Forward(Ids(1, 2, 3), adapters: AdapterSelection.Of("peft"))).all().item<bool>());
        // no selection: back to the base model exactly
        Assert.True(baseline.equal(model.Forward(Ids(1, 2, 3))).all().item<bool>());
    }

    [Fact]
    public void MismatchedAdapterFilesAreRejectedAndLeaveTheModelClean()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 1);
        var config = new LoraConfig { R = 2, LoraAlpha = 2, TargetModules = ["q_proj"] };
        LoraAdapters.Attach(model, config, "a");
        LoraAdapters.Save(model, config, _dir, "a");
        // the config now claims v_proj too: the file lacks those keys
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), config with { TargetModules = ["q_proj", "v_proj"] } is var c ? c.ToPeftJson() : "");
        var e = Assert.Throws<StateDictMismatchException>(() => LoraAdapters.Load(model, _dir, "b"));
        Assert.Equal(6, e.Missing.Count);   // lora_A and lora_B of v_proj in 3 layers
        Assert.DoesNotContain("b", LoraAdapters.AdapterNames(model));

        var json = JsonNode.Parse(config.ToPeftJson())!.AsObject();
        json["use_dora"] = true;
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), json.ToJsonString());
        var dora = Assert.Throws<AdapterConfigException>(() => LoraAdapters.Load(model, _dir, "c"));
        Assert.Contains("use_dora", dora.Message);
    }

    [Fact]
    public void SeveralNamedAdaptersSwitchAndDropoutIsOffInEval()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 3);
        var ids = Ids(1, 4, 4, 2);
        var baseLogits = model.Forward(ids);
        LoraAdapters.Attach(model, AllLinear with { LoraDropout = 0.5 }, "x", seed: 1);
        RandomizeB(model, "x", 1);
        LoraAdapters.Attach(model, AllLinear with { TargetModules = ["o_proj"], AllLinear = false }, "y", seed: 2);
        RandomizeB(model, "y", 2);
        model.eval();
        var x1 = model.Forward(ids, adapters: AdapterSelection.Of("x"));
        Assert.True(x1.equal(model.Forward(ids, adapters: AdapterSelection.Of("x"))).all().item<bool>());            // eval: no dropout
        var y = model.Forward(ids, adapters: AdapterSelection.Of("y"));
        Assert.False(x1.equal(y).all().item<bool>());
        Assert.False(model.Forward(ids, adapters: AdapterSelection.Of(AdapterChoice.Compose(["x", "y"]))).equal(x1).all().item<bool>());
        Assert.True(baseLogits.equal(model.Forward(ids)).all().item<bool>());
        model.train();
        Assert.False(model.Forward(ids, adapters: AdapterSelection.Of("x")).equal(model.Forward(ids, adapters: AdapterSelection.Of("x"))).all().item<bool>());   // train: dropout on
    }

    [Fact]
    public void OnlyLoraParametersTrain()
    {
        using var scope = NewDisposeScope();
        using var model = TestModels.Random(TestModels.Llama, 4);
        LoraAdapters.Attach(model, AllLinear);
        var trainable = LoraAdapters.PrepareForTraining(model);
        Assert.Equal(2 * 7 * 3, trainable.Count);
        Assert.Equal(trainable.Count, model.parameters().Count(p => p.requires_grad));
        RandomizeB(model, "default", 9);
        var logits = model.Forward(Ids(1, 2, 3, 4), adapters: AdapterSelection.Of("default"));
        logits.sum().backward();
        Assert.All(trainable, p => Assert.NotNull(p.grad));
        Assert.Null(model.Model.EmbedTokens.Weight.grad);
    }

    [Fact]
    public void AdapterModelBinLoadsThroughTheRestrictedPickleReader()
    {
        using var scope = NewDisposeScope();
        var cfg = TestModels.Llama;
        using var model = TestModels.Random(cfg, 12);
        var config = new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ["k_proj", "up_proj"] };
        LoraAdapters.Attach(model, config);
        RandomizeB(model, "default", 13);
        LoraAdapters.Save(model, config, _dir);
        // the same tensors as PEFT's legacy adapter_model.bin (torch zip pickle)
        using (var st = SafetensorsCheckpoint.OpenFile(Path.Combine(_dir, "adapter_model.safetensors")))
            TorchPickleWriter.Write(Path.Combine(_dir, "adapter_model.bin"), st.TensorNames.Select(n => new KeyValuePair<string, Tensor>(n, st.ReadTensor(n))).ToList());
        File.Delete(Path.Combine(_dir, "adapter_model.safetensors"));
        var ids = Ids(1, 3, 5);
        var expected = model.Forward(ids, adapters: AdapterSelection.Of("default"));
        using var fresh = TestModels.Random(cfg, 12);
        LoraAdapters.Load(fresh, _dir);
        Assert.True(expected.equal(fresh.Forward(ids, adapters: AdapterSelection.Of("default"))).all().item<bool>());
    }
}
