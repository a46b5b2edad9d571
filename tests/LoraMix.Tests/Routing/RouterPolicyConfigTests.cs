using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;
using LoraMix.Routing;

namespace LoraMix.Tests.Routing;

public sealed class RouterPolicyConfigTests
{
    [Fact]
    public void TheDefaultIsFreeAndWritesNoExtraKey()
    {
        var config = new MixLoraConfig();
        Assert.Equal("free", config.RouterPolicy);
        Assert.Same(FreeRouterPolicy.Instance, config.CreatePolicy());
        string json = config.ToJson();
        Assert.DoesNotContain("router_policy", json);
        Assert.DoesNotContain("privileged_snapshot", json);
        Assert.Equal(config with { ActFn = "silu" }, MixLoraConfig.Parse((JsonObject)JsonNode.Parse(json)!) with { TargetModules = config.TargetModules });
    }

    [Theory]
    [InlineData("last")]
    [InlineData("pooled")]
    public void PrivilegedRoundTripsAndWritesOnlyNonDefaultKeys(string snapshot)
    {
        var config = new MixLoraConfig { RouterPolicy = "privileged", PrivilegedSnapshot = snapshot };
        var obj = (JsonObject)JsonNode.Parse(config.ToJson())!;
        Assert.Equal("privileged", obj["router_policy"]!.GetValue<string>());
        Assert.Equal(snapshot == "pooled", obj.ContainsKey("privileged_snapshot"));
        var back = MixLoraConfig.Parse(obj);
        Assert.Equal("privileged", back.RouterPolicy);
        Assert.Equal(snapshot, back.PrivilegedSnapshot);
        Assert.Same(snapshot == "last" ? PrivilegedRouterPolicy.Last : PrivilegedRouterPolicy.Pooled, back.CreatePolicy());
        // the MoE-PEFT keys are unchanged: the export without the two keys is the free config's export
        obj.Remove("router_policy");
        obj.Remove("privileged_snapshot");
        Assert.Equal(JsonNode.Parse(new MixLoraConfig().ToJson())!.ToJsonString(), obj.ToJsonString());
    }

    [Theory]
    [InlineData("{\"router_policy\": \"strict\"}", "router_policy")]
    [InlineData("{\"router_policy\": \"privileged\", \"privileged_snapshot\": \"first\"}", "privileged_snapshot")]
    [InlineData("{\"privileged_snapshot\": \"pooled\"}", "privileged_snapshot")]
    [InlineData("{\"router_policy\": 1}", "router_policy")]
    public void InvalidPolicyKeysAreRejectedWithTheKey(string extra, string key)
    {
        var obj = (JsonObject)JsonNode.Parse(new MixLoraConfig().ToJson())!;
        foreach (var (k, v) in (JsonObject)JsonNode.Parse(extra)!) obj[k] = v?.DeepClone();
        var ex = Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(obj));
        Assert.Contains(key, ex.Message);
    }
}

/// <summary>Finding 4 of the routing review: LoraMix's router keys never downgrade silently.</summary>
public sealed class RouterKeyStrictnessTests
{
    private static JsonObject Base() => (JsonObject)JsonNode.Parse(new MixLoraConfig { RouterPolicy = "privileged" }.ToJson())!;

    [Theory]
    [InlineData("router_policy")]
    [InlineData("privileged_snapshot")]
    [InlineData("privilege_embedding")]
    public void ANullOwnKeyIsAnErrorNamingTheKey(string key)
    {
        var obj = Base();
        obj[key] = null;
        var e = Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(obj, "adapter_config.json"));
        Assert.Contains(key, e.Message);
        Assert.Contains("null", e.Message);
        Assert.Contains("adapter_config.json", e.Message);
    }

    [Theory]
    [InlineData("router-policy", "router_policy")]
    [InlineData("routerPolicy", "router_policy")]
    [InlineData("RouterPolicy", "router_policy")]
    [InlineData("Router_Policy", "router_policy")]
    [InlineData("router_polcy", "router_policy")]
    [InlineData("router_policies", "router_policy")]
    [InlineData("router policy", "router_policy")]
    [InlineData("privileged-snapshot", "privileged_snapshot")]
    [InlineData("privilegedSnapshot", "privileged_snapshot")]
    [InlineData("privilege_embeding", "privilege_embedding")]
    [InlineData("privilegeEmbedding", "privilege_embedding")]
    public void AKeyThatLooksLikeOursIsAnErrorNamingItAndTheRealOne(string typo, string meant)
    {
        var obj = (JsonObject)JsonNode.Parse(new MixLoraConfig().ToJson())!;
        obj[typo] = typo.Contains("embed", StringComparison.OrdinalIgnoreCase) ? JsonValue.Create(true) : JsonValue.Create("privileged");
        var e = Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(obj, "adapter_config.json"));
        Assert.Contains(typo, e.Message);
        Assert.Contains(meant, e.Message);
    }

    [Theory]
    [InlineData("routing_strategy_note")]
    [InlineData("peft_version")]
    [InlineData("router")]
    [InlineData("policy")]
    [InlineData("")]
    public void OtherUnknownKeysAreIgnoredAsMoePeftDoes(string key)
    {
        var obj = (JsonObject)JsonNode.Parse(new MixLoraConfig().ToJson())!;
        obj[key] = "x";
        Assert.Equal("free", MixLoraConfig.Parse(obj).RouterPolicy);
    }

    [Fact]
    public void AMoePeftAdapterWithoutTheKeyIsFree()
    {
        var obj = (JsonObject)JsonNode.Parse(new MixLoraConfig().ToJson())!;
        Assert.False(obj.ContainsKey("router_policy"));
        Assert.Equal("free", MixLoraConfig.Parse(obj).RouterPolicy);
    }

    [Theory]
    [InlineData("router_policy")]
    [InlineData("privileged_snapshot")]
    [InlineData("privilege_embedding")]
    public void ARecipeWithANullRouterKeyIsAnErrorNamingTheKey(string key)
    {
        string yaml = $"""
            model: models/base
            dataset: data.jsonl
            output_dir: out/a
            adapter:
              type: mixlora
              {key}:
            """;
        var e = Assert.Throws<LoraMix.Configuration.ConfigFileException>(() =>
            LoraMix.Workflows.TrainingRecipe.Parse(LoraMix.Configuration.ConfigDocument.Parse(yaml, "recipe.yaml")));
        Assert.Contains("adapter." + key, e.Message);
        Assert.Contains("recipe.yaml", e.Message);
    }

    [Theory]
    [InlineData("router-policy")]
    [InlineData("routerPolicy")]
    public void ARecipeWithALookAlikeRouterKeyIsAnError(string key)
    {
        string yaml = $"""
            model: models/base
            dataset: data.jsonl
            output_dir: out/a
            adapter:
              type: mixlora
              {key}: privileged
            """;
        var e = Assert.ThrowsAny<LoraMixException>(() =>
            LoraMix.Workflows.TrainingRecipe.Parse(LoraMix.Configuration.ConfigDocument.Parse(yaml, "recipe.yaml")));
        Assert.Contains(key, e.Message);
    }
}
