using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.MixLora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

public sealed class MixLoraFormatTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-mixlora-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static Tensor Ids() => tensor(new long[] { 1, 17, 300, 42, 8, 99, 5 }).unsqueeze(0);

    /// <summary>
    /// The keys MoE-PEFT writes (research/mixlora.md §2), spelled out here for the tiny preset (hidden 96, intermediate
    /// 256, 3 layers, q/o 96 wide, k/v 32 wide): per layer the router gate [E, hidden], the attention LoRAs (q, k, v, o;
    /// A [r, in] then B [out, r]), then gate_proj, down_proj, up_proj each over experts 0..E-1.
    /// </summary>
    private static List<(string Key, long[] Shape)> MoePeftKeys(int experts, int r, int expertR, string[] attention, string[] mlp)
    {
        var inOut = new Dictionary<string, (long In, long Out)>
        {
            ["q_proj"] = (96, 96), ["k_proj"] = (96, 32), ["v_proj"] = (96, 32), ["o_proj"] = (96, 96),
            ["gate_proj"] = (96, 256), ["down_proj"] = (256, 96), ["up_proj"] = (96, 256),
        };
        var keys = new List<(string, long[])>();
        for (int l = 0; l < 3; l++)
        {
            keys.Add(($"mixlora.layers.{l}.mlp.moe_gate.weight", [experts, 96]));
            foreach (var p in new[] { "q_proj", "k_proj", "v_proj", "o_proj" }.Where(attention.Contains))
            {
                keys.Add(($"mixlora.layers.{l}.self_attn.{p}.lora_A.weight", [r, inOut[p].In]));
                keys.Add(($"mixlora.layers.{l}.self_attn.{p}.lora_B.weight", [inOut[p].Out, r]));
            }
            foreach (var p in new[] { "gate_proj", "down_proj", "up_proj" }.Where(mlp.Contains))
                for (int e = 0; e < experts; e++)
                {
                    keys.Add(($"mixlora.layers.{l}.mlp.{p}.experts.{e}.lora_A.weight", [expertR, inOut[p].In]));
                    keys.Add(($"mixlora.layers.{l}.mlp.{p}.experts.{e}.lora_B.weight", [inOut[p].Out, expertR]));
                }
        }
        return keys;
    }

    private void AssertFilesHold(List<(string Key, long[] Shape)> expected)
    {
        // adapter_model.bin: MoE-PEFT's dict order, shapes, fp32
        var entries = TorchPickleReader.ReadEntries(Path.Combine(_dir, "adapter_model.bin"));
        Assert.Equal(expected.Select(e => e.Key), entries.Select(e => e.Name));
        for (int i = 0; i < entries.Count; i++) Assert.Equal(expected[i].Shape, entries[i].Shape);
        Assert.All(entries, e => Assert.Equal(SafetensorsDType.F32, e.DType));
        // adapter_model.safetensors: the same tensors
        using var st = SafetensorsReader.Open(Path.Combine(_dir, "adapter_model.safetensors"));
        Assert.Equal(expected.Select(e => e.Key).Order(), st.Entries.Select(e => e.Name).Order());
        Assert.All(st.Entries, e => Assert.Equal(SafetensorsDType.F32, e.DType));
        foreach (var (key, shape) in expected) Assert.Equal(shape, st.GetEntry(key).Shape);
    }

    [Fact]
    public void TheSavedKeySetIsWhatMoePeftWrites()
    {
        using var scope = NewDisposeScope();
        var config = new MixLoraConfig { R = 4, LoraAlpha = 8, NumExperts = 3, TopK = 2 };   // all 7 projections
        using var model = MixLoraTestKit.Model(config, 1);
        MixLoraAdapters.Save(model, config, _dir);
        AssertFilesHold(MoePeftKeys(3, 4, 4, ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "down_proj", "up_proj"]));
        Assert.Equal(3 * 27, MixLoraAdapters.StateDict(model).Count);
    }

    [Fact]
    public void ExpertLoraAndPartialTargetsGiveMoePeftsKeysAndShapes()
    {
        using var scope = NewDisposeScope();
        var config = new MixLoraConfig
        {
            R = 6, LoraAlpha = 12, NumExperts = 2, TopK = 1, TargetModules = ["v_proj", "up_proj", "q_proj", "down_proj"],
            ExpertLora = new ExpertLoraConfig { R = 2, LoraAlpha = 4, LoraDropout = 0.1 },
        };
        using var model = MixLoraTestKit.Model(config, 2);
        MixLoraAdapters.Save(model, config, _dir);
        AssertFilesHold(MoePeftKeys(2, 6, 2, ["q_proj", "v_proj"], ["down_proj", "up_proj"]));
        var block = (MixLoraFeedForward)model.Model.Layers[0].FeedForward;
        Assert.Equal(4.0 / 2, block.GetAdapter("default").Experts[0].Get("up_proj")!.Scale);
        Assert.Null(block.GetAdapter("default").Experts[0].Get("gate_proj"));
    }

    [Fact]
    public void ARouterOnlyAdapterStillHasAGatePerLayer()
    {
        using var scope = NewDisposeScope();
        var config = new MixLoraConfig { NumExperts = 2, TargetModules = ["q_proj"] };
        using var model = MixLoraTestKit.Model(config, 3);
        MixLoraAdapters.Save(model, config, _dir);
        AssertFilesHold(MoePeftKeys(2, 16, 16, ["q_proj"], []));
    }

    [Theory]
    [InlineData(AdapterFileFormats.Both)]
    [InlineData(AdapterFileFormats.TorchBin)]
    [InlineData(AdapterFileFormats.Safetensors)]
    public void ASavedThenLoadedAdapterGivesIdenticalLogits(AdapterFileFormats format)
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config(MixLoraConfig.TopPStrategy) with { BaseModelNameOrPath = "tiny" };
        using var model = MixLoraTestKit.Model(config, 4);
        model.eval();
        var expected = model.Forward(Ids(), adapters: MixLoraTestKit.Default);
        MixLoraAdapters.Save(model, config, _dir, formats: format);
        Assert.Equal(format.HasFlag(AdapterFileFormats.TorchBin), File.Exists(Path.Combine(_dir, "adapter_model.bin")));
        Assert.Equal(format.HasFlag(AdapterFileFormats.Safetensors), File.Exists(Path.Combine(_dir, "adapter_model.safetensors")));

        using var fresh = TestModels.Random(TestModels.Llama, 4);
        var loaded = MixLoraAdapters.Load(fresh, _dir, "again");
        fresh.eval();
        Assert.True(expected.equal(fresh.Forward(Ids(), adapters: AdapterSelection.Of("again"))).all().item<bool>());
        Assert.Equal(config with { ActFn = "silu" }, loaded with { TargetModules = config.TargetModules });
    }

    [Fact]
    public void BinAndSafetensorsHoldTheSameTensors()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config();
        using var model = MixLoraTestKit.Model(config, 5);
        MixLoraAdapters.Save(model, config, _dir);
        var bin = TorchPickleReader.Read(Path.Combine(_dir, "adapter_model.bin"));
        using var st = SafetensorsCheckpoint.OpenFile(Path.Combine(_dir, "adapter_model.safetensors"));
        foreach (var (key, t) in bin) Assert.True(t.equal(st.ReadTensor(key)).all().item<bool>(), key);
        foreach (var (key, t) in MixLoraAdapters.StateDict(model)) Assert.True(t.equal(bin[key]).all().item<bool>(), key);
    }

    [Fact]
    public void AnAdapterInMoePeftsLayoutLoadsAndRuns()
    {
        // What MoE-PEFT writes for this config (research/mixlora.md §1.5), written here by hand, with weights in its key
        // scheme and order written through the torch zip-pickle writer.
        using var scope = NewDisposeScope();
        Directory.CreateDirectory(_dir);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), """
            {
                "bias": "none",
                "peft_type": "MIXLORA",
                "r": 2,
                "lora_alpha": 4,
                "lora_dropout": 0.05,
                "target_modules": [
                    "q_proj",
                    "gate_proj",
                    "down_proj",
                    "up_proj"
                ],
                "routing_strategy": "mixlora",
                "num_experts": 3,
                "act_fn": "silu",
                "top_k": 2,
                "base_model_name_or_path": "/home/someone/models/loramix-tiny",
                "task_type": "QUESTION_ANS"
            }
            """);
        var keys = MoePeftKeys(3, 2, 2, ["q_proj"], ["gate_proj", "down_proj", "up_proj"]);
        using var gen = new TorchSharp.torch.Generator(21, CPU);
        var tensors = keys.Select(k => new KeyValuePair<string, Tensor>(k.Key, randn(k.Shape, generator: gen) * 0.2)).ToList();
        TorchPickleWriter.Write(Path.Combine(_dir, "adapter_model.bin"), tensors);

        using var model = TestModels.Random(TestModels.Llama, 6);
        var baseLogits = model.Forward(Ids());
        var config = MixLoraAdapters.Load(model, _dir);
        model.eval();
        Assert.Equal("QUESTION_ANS", config.TaskType);
        Assert.Equal(3, config.NumExperts);
        var block = (MixLoraFeedForward)model.Model.Layers[1].FeedForward;
        Assert.True(block.GetAdapter("default").RouterWeight.equal(tensors.Single(t => t.Key == "mixlora.layers.1.mlp.moe_gate.weight").Value).all().item<bool>());
        Assert.True(block.GetAdapter("default").Experts[2].Get("down_proj")!.B
            .equal(tensors.Single(t => t.Key == "mixlora.layers.1.mlp.down_proj.experts.2.lora_B.weight").Value).all().item<bool>());
        var logits = model.Forward(Ids(), adapters: MixLoraTestKit.Default);
        Assert.True(logits.isfinite().all().item<bool>());
        Assert.False(logits.equal(baseLogits).all().item<bool>());
        // no selection: the base model
        Assert.True(model.Forward(Ids()).equal(baseLogits).all().item<bool>());
    }

    [Fact]
    public void TheLegacyKeySchemeLoads()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config();
        using var model = MixLoraTestKit.Model(config, 7);
        model.eval();
        var expected = model.Forward(Ids(), adapters: MixLoraTestKit.Default);
        // legacy m-LoRA: mixlora.layers.L.gate.weight, mixlora.layers.L.experts.E.w1_proj|w2_proj|w3_proj.lora_X.weight
        string Legacy(string key)
        {
            var k = key.Replace(".mlp.moe_gate.weight", ".gate.weight");
            foreach (var (modern, old) in new[] { ("gate_proj", "w1_proj"), ("down_proj", "w2_proj"), ("up_proj", "w3_proj") })
            {
                var m = System.Text.RegularExpressions.Regex.Match(k, $@"^(mixlora\.layers\.\d+)\.mlp\.{modern}\.experts\.(\d+)\.(lora_[AB]\.weight)$");
                if (m.Success) k = $"{m.Groups[1].Value}.experts.{m.Groups[2].Value}.{old}.{m.Groups[3].Value}";
            }
            return k;
        }
        Directory.CreateDirectory(_dir);
        var legacy = MixLoraAdapters.StateDict(model).Select(kv => new KeyValuePair<string, Tensor>(Legacy(kv.Key), kv.Value.detach())).ToList();
        Assert.Contains(legacy, kv => kv.Key == "mixlora.layers.2.experts.3.w2_proj.lora_B.weight");
        Assert.Contains(legacy, kv => kv.Key == "mixlora.layers.0.gate.weight");
        TorchPickleWriter.Write(Path.Combine(_dir, "adapter_model.bin"), legacy);
        var json = JsonNode.Parse(config.ToJson())!.AsObject();
        json["routing_strategy"] = "mixtral";
        json["target_modules"] = new JsonArray("q_proj", "k_proj", "v_proj", "o_proj", "w1_proj", "w2_proj", "w3_proj");
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), json.ToJsonString());

        using var fresh = TestModels.Random(TestModels.Llama, 7);
        var loaded = MixLoraAdapters.Load(fresh, _dir);
        fresh.eval();
        Assert.Equal(MixLoraConfig.TopKStrategy, loaded.RoutingStrategy);
        Assert.True(expected.equal(fresh.Forward(Ids(), adapters: MixLoraTestKit.Default)).all().item<bool>());
    }

    [Fact]
    public void AMismatchedFileIsRejectedAndLeavesTheModelClean()
    {
        using var scope = NewDisposeScope();
        var config = MixLoraTestKit.Config();
        using var model = MixLoraTestKit.Model(config, 8);
        MixLoraAdapters.Save(model, config, _dir, formats: AdapterFileFormats.TorchBin);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), (config with { NumExperts = 5 }).ToJson());
        using var fresh = TestModels.Random(TestModels.Llama, 8);
        var e = Assert.Throws<StateDictMismatchException>(() => MixLoraAdapters.Load(fresh, _dir));
        Assert.Equal(3 * 3 * 2, e.Missing.Count);            // experts 4 of 3 projections × A/B in 3 layers
        Assert.Equal(3, e.Misshaped.Count);                   // the gates: [4, 96] in the file, [5, 96] in the model
        Assert.All(fresh.Model.Layers, l => Assert.IsType<LlamaMlp>(l.FeedForward));
        Assert.Empty(LoraMix.Adapters.Lora.LoraAdapters.AdapterNames(fresh));
    }
}
