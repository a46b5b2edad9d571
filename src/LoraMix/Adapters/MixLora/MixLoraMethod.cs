using System.Text.Json.Nodes;
using LoraMix.Modeling;

namespace LoraMix.Adapters.MixLora;

/// <summary>MoE-PEFT MixLoRA as an <see cref="IAdapterMethod"/> (registered in <see cref="AdapterMethods"/>).</summary>
public sealed class MixLoraMethod : IAdapterMethod
{
    public string Name => MixLoraAdapters.MethodName;
    public string PeftType => MixLoraConfig.PeftType;
    public string DisplayName => "MixLoRA";
    public string OutputDescription => "MoE-PEFT MixLoRA: adapter_config.json + adapter_model.bin + adapter_model.safetensors";
    public Type ConfigType => typeof(MixLoraConfig);

    /// <summary>The recipe's <c>adapter.*</c> keys for MixLoRA (the LoRA ones, the router's, LoraMix's own routing keys and
    /// <c>expert_lora</c>).</summary>
    public IReadOnlyList<RecipeKey> RecipeKeys { get; } =
    [
        new("r", RecipeValueKind.Int), new("lora_alpha", RecipeValueKind.Int), new("lora_dropout", RecipeValueKind.Number),
        new("target_modules", RecipeValueKind.StringListOrString), new("use_rslora", RecipeValueKind.Bool),
        new("routing_strategy", RecipeValueKind.String), new("num_experts", RecipeValueKind.Int), new("top_k", RecipeValueKind.Int),
        new("top_p", RecipeValueKind.Number), new("temperature", RecipeValueKind.Number), new("router_aux_loss_coef", RecipeValueKind.Number),
        new("router_loss", RecipeValueKind.Bool), new("router_z_loss_coef", RecipeValueKind.Number), new("router_init_range", RecipeValueKind.Number),
        new("jitter_noise", RecipeValueKind.Number), new("act_fn", RecipeValueKind.String), new("expert_capacity", RecipeValueKind.Int),
        new("ffn_dropout", RecipeValueKind.Number), new("sparse_step", RecipeValueKind.Int), new("lora_init", RecipeValueKind.String),
        new("router_policy", RecipeValueKind.NonNullString), new("privileged_snapshot", RecipeValueKind.NonNullString),
        new("privilege_embedding", RecipeValueKind.NonNullBool),
        new("expert_lora.r", RecipeValueKind.Int), new("expert_lora.lora_alpha", RecipeValueKind.Int),
        new("expert_lora.lora_dropout", RecipeValueKind.Number), new("expert_lora.use_rslora", RecipeValueKind.Bool),
    ];

    /// <summary>A config without <c>peft_type</c> is MixLoRA when it has <c>routing_strategy</c> (MoE-PEFT's own files).</summary>
    public bool ClaimsUntyped(JsonObject config) => config.ContainsKey("routing_strategy");

    public object ParseConfig(JsonObject config, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson) =>
        MixLoraConfig.Parse(config, source, dialect);

    public object LoadConfig(string directory) => MixLoraConfig.Load(Path.Combine(directory, MixLoraAdapters.ConfigFileName));

    public object Load(LlamaForCausalLM model, string directory, string adapterName = "default") =>
        MixLoraAdapters.Load(model, directory, adapterName);

    public void Save(LlamaForCausalLM model, object config, string directory, string adapterName = "default") =>
        MixLoraAdapters.Save(model, (MixLoraConfig)config, directory, adapterName);

    public void Remove(LlamaForCausalLM model, string adapterName) => MixLoraAdapters.Remove(model, adapterName);
}
