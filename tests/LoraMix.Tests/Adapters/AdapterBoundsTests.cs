using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Configuration;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Adapters;

/// <summary>
/// Adapter sizes are bounded when a config is read (r, lora_alpha, num_experts, top_k, coefficients) and checked against
/// the model when the adapter is attached (r at most min(in, out)); a loaded adapter's file layout is compared with the
/// layout its config implies before anything is attached.
/// </summary>
public sealed class AdapterBoundsTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-adbounds-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static JsonObject Lora() => JsonNode.Parse(new LoraConfig().ToPeftJson())!.AsObject();

    private static JsonObject Mix(string strategy = MixLoraConfig.TopKStrategy) =>
        JsonNode.Parse(new MixLoraConfig { RoutingStrategy = strategy }.ToJson())!.AsObject();

    [Theory]
    [InlineData("r", "1000000000")]
    [InlineData("r", "65537")]
    [InlineData("r", "0")]
    [InlineData("r", "2.5")]
    [InlineData("r", "1e400")]
    [InlineData("r", "\"8\"")]
    [InlineData("lora_alpha", "1e300")]
    [InlineData("lora_alpha", "0")]
    [InlineData("lora_alpha", "[]")]
    [InlineData("lora_dropout", "1")]
    [InlineData("lora_dropout", "-0.1")]
    [InlineData("target_modules", "5")]
    [InlineData("target_modules", "[\"q_proj\", 3]")]
    [InlineData("target_modules", "\"(unclosed\"")]
    [InlineData("peft_type", "3")]
    [InlineData("use_rslora", "\"yes\"")]
    [InlineData("bias", "1")]
    [InlineData("base_model_name_or_path", "{}")]
    public void LoraConfig_OutOfRangeOrMistyped_IsAdapterConfigExceptionNamingTheKey(string key, string raw)
    {
        var o = Lora();
        o[key] = JsonNode.Parse(raw);
        var e = Assert.Throws<AdapterConfigException>(() => LoraConfig.Parse(o, "adapter_config.json"));
        Assert.Equal(key, e.Key);
        Assert.Equal("adapter_config.json", e.ConfigSource);
    }

    [Theory]
    [InlineData("num_experts", "100000000", MixLoraConfig.TopKStrategy)]
    [InlineData("num_experts", "1025", MixLoraConfig.TopKStrategy)]
    [InlineData("num_experts", "0", MixLoraConfig.TopKStrategy)]
    [InlineData("top_k", "9", MixLoraConfig.TopKStrategy)]
    [InlineData("top_k", "0", MixLoraConfig.TopKStrategy)]
    [InlineData("r", "1000000000", MixLoraConfig.TopKStrategy)]
    [InlineData("lora_alpha", "2097152", MixLoraConfig.TopKStrategy)]
    [InlineData("lora_dropout", "1e400", MixLoraConfig.TopKStrategy)]
    [InlineData("temperature", "1e400", MixLoraConfig.TopPStrategy)]
    [InlineData("top_p", "0", MixLoraConfig.TopPStrategy)]
    [InlineData("router_aux_loss_coef", "1e400", MixLoraConfig.TopKStrategy)]
    [InlineData("router_init_range", "-1", MixLoraConfig.TopKStrategy)]
    [InlineData("expert_capacity", "0", MixLoraConfig.SwitchStrategy)]
    [InlineData("expert_capacity", "1e12", MixLoraConfig.SwitchStrategy)]
    public void MixLoraConfig_OutOfRange_IsAdapterConfigExceptionNamingTheKey(string key, string raw, string strategy)
    {
        var o = Mix(strategy);
        o[key] = JsonNode.Parse(raw);
        var e = Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(o, "adapter_config.json"));
        Assert.Equal(key, e.Key);
    }

    [Fact]
    public void MixLoraConfig_ExpertRank_IsBoundedToo()
    {
        var o = Mix();
        o["expert_lora"] = new JsonObject { ["r"] = 1_000_000, ["lora_alpha"] = 16, ["lora_dropout"] = 0.05 };
        Assert.Equal("expert_lora.r", Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(o, "a.json")).Key);
    }

    [Fact]
    public void Bounds_AcceptWhatDemandingUsersConfigure()
    {
        var big = new LoraConfig { R = LoraConfig.MaxRank, LoraAlpha = LoraConfig.MaxLoraAlpha, LoraDropout = 0.5 };
        big.Validate();
        new MixLoraConfig { R = 256, LoraAlpha = 512, NumExperts = MixLoraConfig.MaxExperts, TopK = 64 }.Validate();
        new MixLoraConfig { NumExperts = 1, TopK = 1 }.Validate();
    }

    [Fact]
    public void Recipes_UseTheSameValidation()
    {
        static ConfigFileException Parse(params string[] sets)
        {
            var doc = ConfigDocument.Parse("model: models/base\ndataset: data.jsonl\noutput_dir: out/a\n", "recipe.yaml");
            foreach (var s in sets) doc.Set(s);
            return Assert.Throws<ConfigFileException>(() => TrainingRecipe.Parse(doc));
        }
        Assert.Contains("num_experts", Parse("adapter.type=mixlora", "adapter.num_experts=100000000").Message);
        Assert.Contains("top_k", Parse("adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=5").Message);
        Assert.Contains("'adapter.r'", Parse("adapter.r=1000000000").Message);
    }

    [Fact]
    public void Attach_RankAboveMinInOut_IsRefusedNamingTheLayer()
    {
        using var model = TestModels.Random(TestModels.Llama, 1);   // hidden 96, k/v width 32, intermediate 256
        var e = Assert.Throws<AdapterConfigException>(() => LoraAdapters.Attach(model, new LoraConfig { R = 33, TargetModules = ["k_proj"] }));
        Assert.Equal("r", e.Key);
        Assert.Contains("model.layers.0.self_attn.k_proj", e.Message);
        Assert.Contains("expected r <= 32", e.Message);
        Assert.Empty(LoraAdapters.AdapterNames(model));
        LoraAdapters.Attach(model, new LoraConfig { R = 32, TargetModules = ["k_proj"] }, "ok");

        using var mixModel = TestModels.Random(TestModels.Llama, 2);
        var mix = new MixLoraConfig { R = 4, LoraAlpha = 8, NumExperts = 2, TopK = 1, TargetModules = ["gate_proj", "up_proj"] };
        Assert.Equal("r", Assert.Throws<AdapterConfigException>(() => MixLoraAdapters.Attach(mixModel, mix with { R = 97 })).Key);
        Assert.Equal("expert_lora.r", Assert.Throws<AdapterConfigException>(() =>
            MixLoraAdapters.Attach(mixModel, mix with { ExpertLora = new ExpertLoraConfig { R = 97 } })).Key);
        Assert.Empty(MixLoraAdapters.AdapterNames(mixModel));
        MixLoraAdapters.Attach(mixModel, mix with { R = 96 });
    }

    public static TheoryData<string> LoraTargets => new() { "q_proj,v_proj", "all-linear", "regex", "k_proj,down_proj" };

    [Theory]
    [MemberData(nameof(LoraTargets))]
    public void LoraExpectedLayout_IsTheAttachedStateDict(string targets)
    {
        using var model = TestModels.Random(TestModels.Qwen2, 1);
        var config = targets switch
        {
            "all-linear" => new LoraConfig { R = 3, AllLinear = true, TargetModules = null },
            "regex" => new LoraConfig { R = 3, TargetRegex = @"model\.layers\.[01]\.(self_attn\.o_proj|mlp\.up_proj)", TargetModules = null },
            _ => new LoraConfig { R = 3, TargetModules = targets.Split(',') },
        };
        var expected = LoraAdapters.ExpectedLayout(model, config);
        LoraAdapters.Attach(model, config);
        var actual = LoraAdapters.PeftStateDict(model).Select(kv => (kv.Key, kv.Value.shape)).ToList();
        Assert.Equal(actual.Select(a => a.Key), expected.Select(e => e.Name));
        Assert.Equal(actual.Select(a => string.Join(",", a.shape)), expected.Select(e => string.Join(",", e.Shape)));
    }

    public static TheoryData<int> MixCases => new() { 0, 1, 2, 3 };

    [Theory]
    [MemberData(nameof(MixCases))]
    public void MixLoraExpectedLayout_IsTheAttachedStateDict(int which)
    {
        using var model = TestModels.Random(TestModels.Llama, 1);
        var basis = MixLoraTestKit.Config(experts: 3, topK: 2);
        var config = which switch
        {
            0 => basis,
            1 => basis with { TargetModules = ["down_proj"], ExpertLora = new ExpertLoraConfig { R = 5, LoraAlpha = 10 } },
            2 => basis with { TargetModules = ["q_proj", "v_proj", "up_proj"], PrivilegeEmbedding = true },
            _ => basis with { TargetModules = ["o_proj"], RoutingStrategy = MixLoraConfig.SwitchStrategy, NumExperts = 5 },
        };
        var expected = MixLoraAdapters.ExpectedLayout(model, config);
        MixLoraAdapters.Attach(model, config);
        var actual = MixLoraAdapters.StateDict(model).Select(kv => (kv.Key, kv.Value.shape)).ToList();
        Assert.Equal(actual.Select(a => a.Key), expected.Select(e => e.Name));
        Assert.Equal(actual.Select(a => string.Join(",", a.shape)), expected.Select(e => string.Join(",", e.Shape)));
    }

    [Theory]
    [InlineData(AdapterFileFormats.Safetensors)]
    [InlineData(AdapterFileFormats.TorchBin)]
    public void Load_ConfigThatImpliesAnotherLayout_IsRefusedBeforeAttaching(AdapterFileFormats format)
    {
        using var model = TestModels.Random(TestModels.Llama, 1);
        var config = MixLoraTestKit.Config(experts: 2, topK: 1);
        MixLoraAdapters.Attach(model, config, "saved");
        string dir = Path.Combine(_dir, format.ToString());
        MixLoraAdapters.Save(model, config, dir, "saved", format);
        MixLoraAdapters.Remove(model, "saved");

        // num_experts 1000 is within the bound, but the file holds 2 experts: refused from the file's header/plan, with no
        // expert allocated (Attach would have built 1000 experts per layer).
        string cfgPath = Path.Combine(dir, "adapter_config.json");
        var o = JsonNode.Parse(File.ReadAllText(cfgPath))!.AsObject();
        o["num_experts"] = 1000;
        File.WriteAllText(cfgPath, o.ToJsonString());
        var e = Assert.Throws<StateDictMismatchException>(() => MixLoraAdapters.Load(model, dir, "again"));
        Assert.Contains("mixlora.layers.0.mlp.moe_gate.weight", string.Join(";", e.Misshaped));
        Assert.Equal(3 * 998 * 3 * 2, e.Missing.Count);   // layers × missing experts × projections × (A, B)
        Assert.Empty(MixLoraAdapters.AdapterNames(model));
        Assert.Empty(LoraAdapters.AdapterNames(model));

        // r above min(in, out) in the file's config: refused naming adapter_config.json, before the weights are opened.
        o["num_experts"] = 2;
        o["r"] = 200;
        File.WriteAllText(cfgPath, o.ToJsonString());
        var re = Assert.Throws<AdapterConfigException>(() => MixLoraAdapters.Load(model, dir, "again"));
        Assert.Equal((cfgPath, "r"), (re.ConfigSource, re.Key));

        // unchanged: loads
        o["r"] = config.R;
        File.WriteAllText(cfgPath, o.ToJsonString());
        MixLoraAdapters.Load(model, dir, "again");
        Assert.Equal(new[] { "again" }, MixLoraAdapters.AdapterNames(model));
    }

    [Fact]
    public void LoraLoad_RankAboveTheFileOrTheModel_IsRefusedBeforeAttaching()
    {
        using var model = TestModels.Random(TestModels.Llama, 1);
        var config = new LoraConfig { R = 4, TargetModules = ["q_proj", "v_proj"] };
        LoraAdapters.Attach(model, config, "saved");
        string dir = Path.Combine(_dir, "lora");
        LoraAdapters.Save(model, config, dir, "saved");
        LoraAdapters.Remove(model, "saved");
        string cfgPath = Path.Combine(dir, "adapter_config.json");
        File.WriteAllText(cfgPath, (config with { R = 16 }).ToPeftJson());
        var e = Assert.Throws<StateDictMismatchException>(() => LoraAdapters.Load(model, dir, "x"));
        Assert.Equal(12, e.Misshaped.Count);
        File.WriteAllText(cfgPath, (config with { R = 40 }).ToPeftJson());   // v_proj is 96 → 32
        Assert.Equal("r", Assert.Throws<AdapterConfigException>(() => LoraAdapters.Load(model, dir, "x")).Key);
        Assert.Empty(LoraAdapters.AdapterNames(model));
    }
}
