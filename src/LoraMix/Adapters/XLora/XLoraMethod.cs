using System.Text.Json.Nodes;
using LoraMix.Modeling;

namespace LoraMix.Adapters.XLora;

/// <summary>X-LoRA (PEFT <c>XLORA</c>) as an <see cref="IAdapterMethod"/> (registered in <see cref="AdapterMethods"/>).</summary>
public sealed class XLoraMethod : IAdapterMethod
{
    public string Name => XLoraAdapters.MethodName;
    public string PeftType => XLoraConfig.PeftType;
    public string DisplayName => "X-LoRA";
    public string OutputDescription => "PEFT X-LoRA: adapter_config.json + adapter_model.safetensors (the head) + one PEFT LoRA directory per expert";
    public Type ConfigType => typeof(XLoraConfig);
    /// <summary>The recipe's <c>adapter.*</c> keys for X-LoRA: the experts (<c>adapters: {name: path}</c>) and the head's
    /// PEFT fields (<c>hidden_size</c> defaults to the model's).</summary>
    public IReadOnlyList<RecipeKey> RecipeKeys { get; } =
    [
        new("adapters", RecipeValueKind.StringMap), new("hidden_size", RecipeValueKind.Int),
        new("enable_softmax", RecipeValueKind.Bool), new("enable_softmax_topk", RecipeValueKind.Bool),
        new("softmax_temperature", RecipeValueKind.Number), new("layerwise_scalings", RecipeValueKind.Bool),
        new("top_k_lora", RecipeValueKind.Int), new("xlora_depth", RecipeValueKind.Int), new("xlora_size", RecipeValueKind.Int),
        new("xlora_dropout_p", RecipeValueKind.Number), new("use_trainable_adapters", RecipeValueKind.Bool),
        new("scaling_pass_value", RecipeValueKind.Number), new("global_scaling_weight", RecipeValueKind.Number),
        new("router_policy", RecipeValueKind.NonNullString), new("privileged_snapshot", RecipeValueKind.NonNullString),
    ];

    /// <summary>Never: PEFT always writes <c>peft_type</c> for X-LoRA.</summary>
    public bool ClaimsUntyped(JsonObject config) => false;

    public object ParseConfig(JsonObject config, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson) =>
        dialect == AdapterConfigDialect.Recipe ? XLoraConfig.ParseRecipe(config, source) : XLoraConfig.Parse(config, source, XLoraLayout.Peft);

    public object LoadConfig(string directory) => XLoraAdapters.LoadConfig(directory).Config;

    public object Load(LlamaForCausalLM model, string directory, string adapterName = "default") =>
        XLoraAdapters.Load(model, directory, adapterName);

    /// <summary>Writes PEFT's layout; <paramref name="config"/> must be the attached adapter's.</summary>
    public void Save(LlamaForCausalLM model, object config, string directory, string adapterName = "default") =>
        XLoraAdapters.Save(model, directory, adapterName);

    public void Remove(LlamaForCausalLM model, string adapterName) => XLoraAdapters.Remove(model, adapterName);
}
