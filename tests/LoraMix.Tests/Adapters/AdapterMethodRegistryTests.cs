using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Configuration;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Tests.Adapters;

/// <summary>The adapter-method registry (<see cref="AdapterMethods"/>) and the one parser per config: a recipe's
/// <c>adapter:</c> section and the equivalent <c>adapter_config.json</c> give equal config records.</summary>
public sealed class AdapterMethodRegistryTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-registry-" + Guid.NewGuid().ToString("N"));

    public AdapterMethodRegistryTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private string AdapterDir(string name, string configJson)
    {
        string dir = Path.Combine(_dir, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, LoraAdapters.ConfigFileName), configJson);
        return dir;
    }

    private static TrainingRecipe Recipe(string adapterYaml) =>
        TrainingRecipe.Parse(ConfigDocument.Parse("model: models/base\ndataset: data.jsonl\noutput_dir: out/a\n" + adapterYaml, "recipe.yaml"));

    [Fact]
    public void LookupsByNameAndPeftType()
    {
        Assert.Equal(["lora", "mixlora", "xlora"], AdapterMethods.Names);
        Assert.Equal(["LORA", "MIXLORA", "XLORA"], AdapterMethods.PeftTypes);
        Assert.Same(AdapterMethods.XLora, AdapterMethods.ByPeftType("XLORA"));
        Assert.Same(AdapterMethods.Lora, AdapterMethods.ByPeftType("LORA"));
        Assert.Same(AdapterMethods.MixLora, AdapterMethods.ByPeftType("MIXLORA"));
        Assert.Null(AdapterMethods.ByPeftType("mixlora"));   // peft_type is exact, as PEFT compares it
        Assert.Null(AdapterMethods.ByPeftType("IA3"));
        Assert.Same(AdapterMethods.MixLora, AdapterMethods.ByName("MixLoRA"));   // adapter.type is case-insensitive
        Assert.Same(AdapterMethods.Lora, AdapterMethods.ByName("lora"));
        Assert.Null(AdapterMethods.ByName("full"));   // full training is a recipe case, not an adapter method
        Assert.IsType<LoraMethod>(AdapterMethods.Lora);
        Assert.IsType<MixLoraMethod>(AdapterMethods.MixLora);
        Assert.Equal(typeof(LoraConfig), AdapterMethods.Lora.ConfigType);
        Assert.Equal(typeof(MixLoraConfig), AdapterMethods.MixLora.ConfigType);
        foreach (var m in AdapterMethods.All) Assert.Equal(m.Name, AdapterDirectory.KindOf(m).ToString(), ignoreCase: true);
    }

    [Fact]
    public void DetectTellsLoraAndMixLoraDirectoriesApart()
    {
        string lora = AdapterDir("lora", new LoraConfig().ToPeftJson());
        string mix = AdapterDir("mix", new MixLoraConfig { NumExperts = 4 }.ToJson());
        string untypedMix = AdapterDir("untyped-mix", """{"routing_strategy": "mixlora", "r": 8}""");
        string untyped = AdapterDir("untyped", """{"r": 8, "target_modules": ["q_proj"]}""");
        Assert.Same(AdapterMethods.Lora, AdapterMethods.Detect(lora));
        Assert.Same(AdapterMethods.MixLora, AdapterMethods.Detect(mix));
        Assert.Same(AdapterMethods.MixLora, AdapterMethods.Detect(untypedMix));
        Assert.Same(AdapterMethods.Lora, AdapterMethods.Detect(untyped));
        Assert.Equal(AdapterKind.Lora, AdapterDirectory.Detect(lora));
        Assert.Equal(AdapterKind.MixLora, AdapterDirectory.Detect(mix));

        Assert.Equal(new LoraConfig().R, ((LoraConfig)AdapterMethods.Lora.LoadConfig(lora)).R);
        Assert.Equal(4, ((MixLoraConfig)AdapterMethods.MixLora.LoadConfig(mix)).NumExperts);
    }

    [Fact]
    public void DetectRefusesAPeftTypeTheRegistryLacksListingTheRegisteredOnes()
    {
        string ia3 = AdapterDir("ia3", """{"peft_type": "IA3", "target_modules": ["k_proj"]}""");
        var e = Assert.Throws<AdapterConfigException>(() => AdapterMethods.Detect(ia3));
        Assert.Equal("peft_type", e.Key);
        Assert.Contains("IA3", e.Message);
        foreach (var t in AdapterMethods.PeftTypes) Assert.Contains(t, e.Message);
        Assert.Equal(Path.Combine(ia3, LoraAdapters.ConfigFileName), e.ConfigSource);
        Assert.Equal("peft_type", Assert.Throws<AdapterConfigException>(() => AdapterDirectory.Detect(ia3)).Key);

        Assert.Throws<LoraMixException>(() => AdapterMethods.Detect(Path.Combine(_dir, "missing")));
        string empty = Path.Combine(_dir, "empty");
        Directory.CreateDirectory(empty);
        Assert.Equal("(file)", Assert.Throws<AdapterConfigException>(() => AdapterMethods.Detect(empty)).Key);
        Assert.Equal("(json)", Assert.Throws<AdapterConfigException>(() => AdapterMethods.Detect(AdapterDir("bad", "{not json"))).Key);
    }

    [Fact]
    public void RecipeAdapterTypeResolvesThroughTheRegistry()
    {
        Assert.Equal(RecipeMethod.MixLora, Recipe("adapter: {type: MixLoRA}").Method);
        Assert.Same(AdapterMethods.MixLora, Recipe("adapter: {type: mixlora}").AdapterMethod);
        Assert.Same(AdapterMethods.Lora, Recipe("adapter: {type: lora}").AdapterMethod);
        var e = Assert.Throws<ConfigFileException>(() => Recipe("adapter: {type: ia3}"));
        Assert.Equal("adapter.type", e.Key);
        foreach (var n in AdapterMethods.Names) Assert.Contains(n, e.Message);
        Assert.Contains("full", e.Message);
        foreach (var m in AdapterMethods.All)
            foreach (var k in m.RecipeKeys) Assert.Contains("adapter." + k.Key, TrainingRecipe.RecipeKeys);
    }

    private static void AssertSame(LoraConfig expected, LoraConfig actual)
    {
        Assert.Equal(expected.TargetModules, actual.TargetModules);
        Assert.Equal(expected with { TargetModules = null }, actual with { TargetModules = null });
    }

    private static void AssertSame(MixLoraConfig expected, MixLoraConfig actual)
    {
        Assert.Equal(expected.TargetModules, actual.TargetModules);
        Assert.Equal(expected with { TargetModules = [] }, actual with { TargetModules = [] });
    }

    [Theory]
    [InlineData("{type: lora, r: 16, lora_alpha: 32, lora_dropout: 0.1, target_modules: [q_proj, k_proj], use_rslora: true}",
        """{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj"], "use_rslora": true, "base_model_name_or_path": "models/base"}""")]
    [InlineData("{type: lora, r: 4, target_modules: all-linear}",
        """{"r": 4, "target_modules": "all-linear", "base_model_name_or_path": "models/base"}""")]
    [InlineData("{type: lora, target_modules: '.*\\.(q|v)_proj'}",
        """{"target_modules": ".*\\.(q|v)_proj", "base_model_name_or_path": "models/base"}""")]
    public void ALoraRecipeSectionAndItsAdapterConfigGiveEqualConfigs(string adapterYaml, string json)
    {
        var fromRecipe = Recipe("adapter: " + adapterYaml).Lora!;
        var fromJson = (LoraConfig)AdapterMethods.Lora.ParseConfig(JsonNode.Parse(json)!.AsObject(), "adapter_config.json");
        AssertSame(fromJson, fromRecipe);
        AssertSame(fromJson, LoraConfig.Load(Path.Combine(AdapterDir("lora", fromRecipe.ToPeftJson()), LoraAdapters.ConfigFileName)));
    }

    [Theory]
    [InlineData("""
        {type: mixlora, r: 8, lora_alpha: 16, lora_dropout: 0.05, target_modules: [q_proj, gate_proj, down_proj, up_proj],
         routing_strategy: mixlora, num_experts: 4, top_k: 2, router_policy: privileged, privileged_snapshot: pooled,
         expert_lora: {r: 4, lora_alpha: 8, lora_dropout: 0.1, use_rslora: true}}
        """, """
        {"peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "gate_proj", "down_proj", "up_proj"],
         "routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "router_policy": "privileged", "privileged_snapshot": "pooled",
         "expert_lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_rslora": true}, "base_model_name_or_path": "models/base"}
        """)]
    [InlineData("""
        {type: mixlora, r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear, routing_strategy: mixlora-switch,
         num_experts: 8, expert_capacity: 16, jitter_noise: 0.02, router_z_loss_coef: 0.01, act_fn: gelu, privilege_embedding: true}
        """, """
        {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
         "routing_strategy": "mixlora-switch", "num_experts": 8, "expert_capacity": 16, "jitter_noise": 0.02, "router_z_loss_coef": 0.01,
         "act_fn": "gelu", "privilege_embedding": true, "base_model_name_or_path": "models/base"}
        """)]
    [InlineData("""
        {type: mixlora, r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: [gate_proj, up_proj], routing_strategy: mixlora-dynamic,
         num_experts: 6, top_p: 0.7, temperature: 0.5, router_policy: free, expert_lora: {r: 8}}
        """, """
        {"peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["gate_proj", "up_proj"],
         "routing_strategy": "mixlora-dynamic", "num_experts": 6, "top_p": 0.7, "temperature": 0.5, "router_policy": "free",
         "expert_lora": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05}, "base_model_name_or_path": "models/base"}
        """)]
    public void AMixLoraRecipeSectionAndItsAdapterConfigGiveEqualConfigs(string adapterYaml, string json)
    {
        var fromRecipe = Recipe("adapter: " + adapterYaml.ReplaceLineEndings(" ")).MixLora!;
        var obj = JsonNode.Parse(json)!.AsObject();
        Assert.Same(AdapterMethods.MixLora, AdapterMethods.Detect(obj, "adapter_config.json"));
        var fromJson = (MixLoraConfig)AdapterMethods.MixLora.ParseConfig(obj, "adapter_config.json");
        AssertSame(fromJson, fromRecipe);
        Assert.Equal(fromJson.ToJson(), fromRecipe.ToJson());   // (ToJson writes MoE-PEFT's export, which drops some keys)
    }

    [Fact]
    public void ARecipeKeepsItsDefaultsWhereAFileMustGiveTheKey()
    {
        // a recipe may leave out what MoE-PEFT requires of a file; the file parser still refuses it
        AssertSame(new MixLoraConfig { BaseModelNameOrPath = "models/base" }, Recipe("adapter: {type: mixlora}").MixLora!);
        Assert.Equal("r", Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Parse(
            JsonNode.Parse("""{"routing_strategy": "mixlora", "target_modules": ["gate_proj"]}""")!.AsObject())).Key);
        // expert_lora: a recipe fills missing keys with ExpertLoraConfig's defaults, a file with the top-level values
        Assert.Equal(new ExpertLoraConfig { R = 4 }, Recipe("adapter: {type: mixlora, r: 8, expert_lora: {r: 4}}").MixLora!.ExpertLora);
        AssertSame(new LoraConfig { BaseModelNameOrPath = "models/base" }, Recipe("adapter: {type: lora}").Lora!);
        Assert.Equal("target_modules", Assert.Throws<AdapterConfigException>(() => LoraConfig.Parse(new JsonObject(), "adapter_config.json")).Key);
        Assert.True(Recipe("adapter: {type: lora, target_modules: all}").Lora!.AllLinear);
        Assert.Equal(MixLoraConfig.LlamaTargetOrder, Recipe("adapter: {type: mixlora, target_modules: all}").MixLora!.TargetModules);
    }

    [Theory]
    [InlineData("router_polcy")]
    [InlineData("routerPolicy")]
    [InlineData("privileged-snapshot")]
    public void AMisspeltRouterKeyIsAnErrorInBoth(string typo)
    {
        var recipe = Assert.Throws<ConfigFileException>(() => Recipe($"adapter: {{type: mixlora, {typo}: privileged}}"));
        Assert.Equal("adapter." + typo, recipe.Key);
        Assert.Contains("recipe.yaml", recipe.Message);
        var obj = JsonNode.Parse($$"""{"peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["gate_proj"], "routing_strategy": "mixlora", "num_experts": 4, "{{typo}}": "privileged"}""")!.AsObject();
        var file = Assert.Throws<AdapterConfigException>(() => AdapterMethods.MixLora.ParseConfig(obj, "adapter_config.json"));
        Assert.Equal(typo, file.Key);
        Assert.Contains("adapter_config.json", file.Message);
    }

    [Fact]
    public void AMisspeltLoraKeyIsAnErrorInARecipeAndIgnoredInAFileAsPeftDoes()
    {
        Assert.Equal("adapter.lora_alpah", Assert.Throws<ConfigFileException>(() => Recipe("adapter: {type: lora, lora_alpah: 16}")).Key);
        var cfg = (LoraConfig)AdapterMethods.Lora.ParseConfig(JsonNode.Parse("""{"target_modules": ["q_proj"], "lora_alpah": 16}""")!.AsObject(), "adapter_config.json");
        Assert.Equal(8, cfg.LoraAlpha);
    }

    [Theory]
    [InlineData("adapter: {type: lora, r: 0}", "adapter.r")]
    [InlineData("adapter: {type: lora, lora_dropout: 1.5}", "adapter.lora_dropout")]
    [InlineData("adapter: {type: lora, r: abc}", "adapter.r")]
    [InlineData("adapter: {type: mixlora, num_experts: 2, top_k: 3}", "adapter.top_k")]
    [InlineData("adapter: {type: mixlora, expert_lora: {lora_alpha: 0}}", "adapter.expert_lora.lora_alpha")]
    [InlineData("adapter: {type: mixlora, target_modules: dense}", "adapter.target_modules")]
    [InlineData("adapter: {type: mixlora, router_policy: null}", "adapter.router_policy")]
    public void RecipeErrorsNameTheFileAndTheAdapterKey(string yaml, string key)
    {
        var e = Assert.Throws<ConfigFileException>(() => Recipe(yaml));
        Assert.Equal(key, e.Key);
        Assert.StartsWith("recipe.yaml: ", e.Message);
    }
}
