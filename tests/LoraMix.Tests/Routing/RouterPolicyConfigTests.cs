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
