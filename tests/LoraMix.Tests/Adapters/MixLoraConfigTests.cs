using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;

namespace LoraMix.Tests.Adapters;

public sealed class MixLoraConfigTests
{
    private static MixLoraConfig Parse(string json) => MixLoraConfig.Parse(JsonNode.Parse(json)!.AsObject(), "test.json");

    [Fact]
    public void TheDefaultsAreMoePefts()
    {
        var top = Parse("""{"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj"], "routing_strategy": "mixlora", "num_experts": 8}""");
        Assert.Equal(2, top.TopK);
        Assert.Equal(0.02, top.EffectiveRouterInitRange);
        Assert.Equal(0.0, top.EffectiveJitterNoise);
        Assert.Equal(0.001, top.RouterAuxLossCoef);
        Assert.True(top.RouterLoss);
        Assert.Equal(0.0, top.EffectiveRouterZLossCoef);
        Assert.Null(top.ActFn);
        Assert.Equal("CAUSAL_LM", top.TaskType);

        var dynamic = Parse("""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["up_proj"], "routing_strategy": "mixlora-dynamic", "num_experts": 4}""");
        Assert.Equal(0.8, dynamic.TopP);
        Assert.Equal(0.0, dynamic.Temperature);

        var sw = Parse("""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": {"up_proj": true, "q_proj": false}, "routing_strategy": "mixlora-switch", "num_experts": 4}""");
        Assert.Equal(1.0, sw.EffectiveRouterInitRange);
        Assert.Equal(0.01, sw.EffectiveJitterNoise);
        Assert.Equal(0.001, sw.EffectiveRouterZLossCoef);
        Assert.Equal(32, sw.ExpertCapacity);
        Assert.Equal(0.0, sw.FfnDropout);
        Assert.Null(sw.SparseStep);
        Assert.Equal(["up_proj"], sw.TargetModules);
    }

    [Fact]
    public void MoePeftsExportedExampleParses()
    {
        var c = Parse("""
            {
              "bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "target_modules": ["q_proj","k_proj","v_proj","o_proj","gate_proj","down_proj","up_proj"],
              "routing_strategy": "mixlora", "num_experts": 8, "act_fn": "silu", "top_k": 2,
              "base_model_name_or_path": "/home/lidengchun/models/Llama-2-7b-hf", "task_type": "QUESTION_ANS"
            }
            """);
        Assert.Equal(new MixLoraConfig
        {
            ActFn = "silu", BaseModelNameOrPath = "/home/lidengchun/models/Llama-2-7b-hf", TaskType = "QUESTION_ANS",
        }, c with { TargetModules = MixLoraConfig.LlamaTargetOrder });
        Assert.Equal(MixLoraConfig.LlamaTargetOrder, c.TargetModules);
        Assert.Equal(["q_proj", "k_proj", "v_proj", "o_proj"], c.AttentionTargets);
        Assert.Equal(["gate_proj", "down_proj", "up_proj"], c.ExpertTargets);
    }

    [Fact]
    public void ItIsWrittenAsMoePeftExportsIt()
    {
        var top = new MixLoraConfig { TargetModules = ["up_proj", "q_proj", "v_proj"], BaseModelNameOrPath = "m", ActFn = "silu" };
        Assert.Equal("""
            {
                "bias": "none",
                "peft_type": "MIXLORA",
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "target_modules": [
                    "q_proj",
                    "v_proj",
                    "up_proj"
                ],
                "routing_strategy": "mixlora",
                "num_experts": 8,
                "act_fn": "silu",
                "top_k": 2,
                "base_model_name_or_path": "m",
                "task_type": "CAUSAL_LM"
            }
            """.ReplaceLineEndings("\n"), top.ToJson().ReplaceLineEndings("\n"));

        var dyn = new MixLoraConfig
        {
            RoutingStrategy = MixLoraConfig.TopPStrategy, UseRsLora = true, LoraDropout = 0.0, TargetModules = ["gate_proj"],
            ExpertLora = new ExpertLoraConfig { R = 4, LoraAlpha = 8, LoraDropout = 1e-5 },
        };
        Assert.Equal("""
            {
                "use_rslora": true,
                "bias": "none",
                "peft_type": "MIXLORA",
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": [
                    "gate_proj"
                ],
                "expert_lora": {
                    "bias": "none",
                    "r": 4,
                    "lora_alpha": 8,
                    "lora_dropout": 1e-05
                },
                "routing_strategy": "mixlora-dynamic",
                "num_experts": 8,
                "act_fn": "silu",
                "top_p": 0.8,
                "temperature": 0.0,
                "base_model_name_or_path": null,
                "task_type": "CAUSAL_LM"
            }
            """.ReplaceLineEndings("\n"), dyn.ToJson().ReplaceLineEndings("\n"));

        var sw = JsonNode.Parse(new MixLoraConfig { RoutingStrategy = MixLoraConfig.SwitchStrategy, ExpertCapacity = 16 }.ToJson())!.AsObject();
        Assert.Equal(["bias", "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "routing_strategy", "num_experts",
            "act_fn", "expert_capacity", "sparse_step", "base_model_name_or_path", "task_type"], sw.Select(kv => kv.Key));
        Assert.Null(sw["sparse_step"]);
    }

    [Theory]
    [InlineData(MixLoraConfig.TopKStrategy)]
    [InlineData(MixLoraConfig.TopPStrategy)]
    [InlineData(MixLoraConfig.SwitchStrategy)]
    public void ExportedConfigsParseBackToTheSameConfig(string strategy)
    {
        var c = new MixLoraConfig
        {
            RoutingStrategy = strategy, NumExperts = 6, TopK = 3, TopP = 0.7, Temperature = 0.5, ExpertCapacity = 7, SparseStep = 2,
            ActFn = "gelu_new", R = 4, LoraAlpha = 6, LoraDropout = 0.1, ExpertLora = new ExpertLoraConfig { R = 2, LoraAlpha = 2, LoraDropout = 0.2 },
            TargetModules = ["o_proj", "down_proj"], BaseModelNameOrPath = "base", TaskType = "QUESTION_ANS",
        };
        var back = Parse(c.ToJson());
        // keys MoE-PEFT does not export come back as their defaults
        var expected = strategy switch
        {
            MixLoraConfig.TopKStrategy => c with { TopP = 0.8, Temperature = 0, ExpertCapacity = 32, SparseStep = null },
            MixLoraConfig.TopPStrategy => c with { TopK = 2, ExpertCapacity = 32, SparseStep = null },
            _ => c with { TopK = 2, TopP = 0.8, Temperature = 0 },
        };
        Assert.Equal(expected, back with { TargetModules = c.TargetModules });
        Assert.Equal(c.TargetModules, back.TargetModules);
    }

    [Theory]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"top_k\": 5", "top_k")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"top_k\": 0", "top_k")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 0", "num_experts")]
    [InlineData("\"routing_strategy\": \"hash\", \"num_experts\": 4", "routing_strategy")]
    [InlineData("\"num_experts\": 4", "routing_strategy")]
    [InlineData("\"routing_strategy\": \"mixlora\"", "num_experts")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"top_p\": 0.5", "top_p")]
    [InlineData("\"routing_strategy\": \"mixlora-switch\", \"num_experts\": 4, \"top_k\": 1", "top_k")]
    [InlineData("\"routing_strategy\": \"mixlora-dynamic\", \"num_experts\": 4, \"top_p\": 1.5", "top_p")]
    [InlineData("\"routing_strategy\": \"mixlora-dynamic\", \"num_experts\": 4, \"temperature\": -1", "temperature")]
    [InlineData("\"routing_strategy\": \"mixlora-switch\", \"num_experts\": 4, \"expert_capacity\": 0", "expert_capacity")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"use_dora\": true", "use_dora")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"act_fn\": \"swish2\"", "act_fn")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"jitter_noise\": 1.5", "jitter_noise")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"router_aux_loss_coef\": -0.1", "router_aux_loss_coef")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"bias\": \"all\"", "bias")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"peft_type\": \"LORA\"", "peft_type")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"expert_lora\": {\"r\": 0}", "expert_lora.r")]
    [InlineData("\"routing_strategy\": \"mixlora\", \"num_experts\": 4, \"router_loss\": 1", "router_loss")]
    public void InvalidCombinationsAreRejectedWithTheKeyAndAReason(string fields, string key)
    {
        var e = Assert.Throws<AdapterConfigException>(() =>
            Parse($$"""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "up_proj"], {{fields}}}"""));
        Assert.Equal(key, e.Key);
        Assert.Equal("test.json", e.ConfigSource);
        Assert.False(string.IsNullOrWhiteSpace(e.Reason));
        Assert.Contains(key, e.Message);
    }

    [Theory]
    [InlineData("\"lora_alpha\": 16.5", "lora_alpha")]
    [InlineData("\"r\": 0", "r")]
    [InlineData("\"lora_dropout\": 1.0", "lora_dropout")]
    [InlineData("\"target_modules\": []", "target_modules")]
    [InlineData("\"target_modules\": [\"fc1\"]", "target_modules")]
    [InlineData("\"target_modules\": [\"lm_head\"]", "target_modules")]
    [InlineData("\"target_modules\": \"all-linear\"", "target_modules")]
    public void InvalidLoraFieldsAreRejected(string field, string key)
    {
        var json = JsonNode.Parse("""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"], "routing_strategy": "mixlora", "num_experts": 4}""")!.AsObject();
        var patch = JsonNode.Parse("{" + field + "}")!.AsObject();
        foreach (var (k, v) in patch.ToList()) json[k] = v?.DeepClone();
        var e = Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(json, "x"));
        Assert.Equal(key, e.Key);
    }

    [Fact]
    public void ExpertLoraWithoutAnyMlpTargetIsRejected()
    {
        var c = new MixLoraConfig { TargetModules = ["q_proj"], ExpertLora = new ExpertLoraConfig() };
        Assert.Equal("expert_lora", Assert.Throws<AdapterConfigException>(() => c.Validate()).Key);
        Assert.Equal("top_k", Assert.Throws<AdapterConfigException>(() => (new MixLoraConfig { NumExperts = 2, TopK = 3 }).Validate()).Key);
    }

    [Fact]
    public void LegacyNamesAreAccepted()
    {
        var c = Parse("""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "w1_proj", "w2_proj", "w3_proj"], "routing_strategy": "mixtral", "num_experts": 8, "top_k": 2}""");
        Assert.Equal(MixLoraConfig.TopKStrategy, c.RoutingStrategy);
        Assert.Equal(["gate_proj", "down_proj", "up_proj"], c.ExpertTargets);
        Assert.Equal(MixLoraConfig.SwitchStrategy, Parse("""{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"], "routing_strategy": "switch", "num_experts": 8}""").RoutingStrategy);
    }
}
