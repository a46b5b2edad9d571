using System.Text.Json.Nodes;
using LoraMix.Modeling;

namespace LoraMix.Adapters.XLora;

/// <summary>X-LoRA (PEFT <c>XLORA</c>) as an <see cref="IAdapterMethod"/> (registered in <see cref="AdapterMethods"/>).</summary>
/// <remarks>Training an X-LoRA head from a recipe (<c>adapter.type: xlora</c>) is not implemented yet: a recipe naming it
/// is refused with a message saying so.</remarks>
public sealed class XLoraMethod : IAdapterMethod
{
    public string Name => XLoraAdapters.MethodName;
    public string PeftType => XLoraConfig.PeftType;
    public string DisplayName => "X-LoRA";
    public string OutputDescription => "PEFT X-LoRA: adapter_config.json + adapter_model.safetensors (the head) + one PEFT LoRA directory per expert";
    public Type ConfigType => typeof(XLoraConfig);
    public IReadOnlyList<RecipeKey> RecipeKeys { get; } = [];

    /// <summary>Never: PEFT always writes <c>peft_type</c> for X-LoRA.</summary>
    public bool ClaimsUntyped(JsonObject config) => false;

    public object ParseConfig(JsonObject config, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson) =>
        dialect == AdapterConfigDialect.Recipe
            ? throw new AdapterConfigException(source, "type", "xlora: training an X-LoRA head from a recipe is not implemented yet; load a trained X-LoRA directory with --adapter")
            : XLoraConfig.Parse(config, source, XLoraLayout.Peft);

    public object LoadConfig(string directory) => XLoraAdapters.LoadConfig(directory).Config;

    public object Load(LlamaForCausalLM model, string directory, string adapterName = "default") =>
        XLoraAdapters.Load(model, directory, adapterName);

    /// <summary>Writes PEFT's layout; <paramref name="config"/> must be the attached adapter's.</summary>
    public void Save(LlamaForCausalLM model, object config, string directory, string adapterName = "default") =>
        XLoraAdapters.Save(model, directory, adapterName);

    public void Remove(LlamaForCausalLM model, string adapterName) => XLoraAdapters.Remove(model, adapterName);
}
