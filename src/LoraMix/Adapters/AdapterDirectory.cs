using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;

namespace LoraMix.Adapters;

/// <summary>The kinds of adapter directory LoraMix loads.</summary>
public enum AdapterKind
{
    /// <summary>A Hugging Face PEFT LoRA adapter (<c>peft_type: "LORA"</c>).</summary>
    Lora,

    /// <summary>A MoE-PEFT MixLoRA adapter (<c>peft_type: "MIXLORA"</c>, or a <c>routing_strategy</c> key).</summary>
    MixLora,
}

/// <summary>Tells adapter directories apart by their <c>adapter_config.json</c>.</summary>
public static class AdapterDirectory
{
    /// <summary>The kind of adapter in <paramref name="directory"/>; throws naming the file when it is missing, not JSON,
    /// or of a type LoraMix does not load.</summary>
    public static AdapterKind Detect(string directory)
    {
        string path = Path.Combine(directory, LoraAdapters.ConfigFileName);
        if (!Directory.Exists(directory)) throw new LoraMixException($"adapter directory '{directory}' does not exist");
        var obj = AdapterFiles.ReadConfigObject(path, "LoRA or MixLoRA");
        string? type = obj["peft_type"] is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : null;
        return type switch
        {
            "LORA" => AdapterKind.Lora,
            MixLoraConfig.PeftType => AdapterKind.MixLora,
            null when obj.ContainsKey("routing_strategy") => AdapterKind.MixLora,
            null => AdapterKind.Lora,
            _ => throw new AdapterConfigException(path, "peft_type", $"is '{InputFiles.Shorten(type)}'; LoraMix loads LORA and MIXLORA adapters"),
        };
    }
}
