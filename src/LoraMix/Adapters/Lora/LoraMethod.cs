using System.Text.Json.Nodes;
using LoraMix.Modeling;

namespace LoraMix.Adapters.Lora;

/// <summary>Hugging Face PEFT LoRA as an <see cref="IAdapterMethod"/> (registered in <see cref="AdapterMethods"/>).</summary>
public sealed class LoraMethod : IAdapterMethod
{
    public string Name => LoraAdapters.MethodName;
    public string PeftType => LoraConfig.PeftType;
    public string DisplayName => "LoRA";
    public string OutputDescription => "PEFT LoRA: adapter_config.json + adapter_model.safetensors";
    public Type ConfigType => typeof(LoraConfig);

    /// <summary>The recipe's <c>adapter.*</c> keys for LoRA.</summary>
    public IReadOnlyList<RecipeKey> RecipeKeys { get; } =
    [
        new("r", RecipeValueKind.Int), new("lora_alpha", RecipeValueKind.Number), new("lora_dropout", RecipeValueKind.Number),
        new("target_modules", RecipeValueKind.StringListOrString), new("use_rslora", RecipeValueKind.Bool),
    ];

    /// <summary>Never: a config without <c>peft_type</c> is LoRA only when no other method claims it
    /// (<see cref="AdapterMethods.Untyped"/>).</summary>
    public bool ClaimsUntyped(JsonObject config) => false;

    public object ParseConfig(JsonObject config, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson) =>
        LoraConfig.Parse(config, source, dialect);

    public object LoadConfig(string directory) => LoraConfig.Load(Path.Combine(directory, LoraAdapters.ConfigFileName));

    public object Load(LlamaForCausalLM model, string directory, string adapterName = "default") =>
        LoraAdapters.Load(model, directory, adapterName);

    public void Save(LlamaForCausalLM model, object config, string directory, string adapterName = "default") =>
        LoraAdapters.Save(model, (LoraConfig)config, directory, adapterName);

    public void Remove(LlamaForCausalLM model, string adapterName) => LoraAdapters.Remove(model, adapterName);
}
