namespace LoraMix.Adapters;

/// <summary>The kinds of adapter directory LoraMix loads (one per registered method, named as its
/// <see cref="IAdapterMethod.Name"/>). New code uses <see cref="AdapterMethods"/>; this enum remains for callers that
/// compare kinds.</summary>
public enum AdapterKind
{
    /// <summary>A Hugging Face PEFT LoRA adapter (<see cref="AdapterMethods.Lora"/>).</summary>
    Lora,

    /// <summary>A MoE-PEFT MixLoRA adapter (<see cref="AdapterMethods.MixLora"/>).</summary>
    MixLora,

    /// <summary>An X-LoRA adapter, PEFT's layout or the xlora package's (<see cref="AdapterMethods.XLora"/>).</summary>
    XLora,
}

/// <summary>Tells adapter directories apart by their <c>adapter_config.json</c>: a thin wrapper over
/// <see cref="AdapterMethods.Detect(string)"/>, which new code should call.</summary>
public static class AdapterDirectory
{
    /// <summary>The kind of adapter in <paramref name="directory"/> (<see cref="AdapterMethods.Detect(string)"/>); throws
    /// naming the file when it is missing, not JSON, or of a type no method is registered for.</summary>
    public static AdapterKind Detect(string directory) => KindOf(AdapterMethods.Detect(directory));

    /// <summary>The <see cref="AdapterKind"/> named like <paramref name="method"/>.</summary>
    public static AdapterKind KindOf(IAdapterMethod method) =>
        Enum.TryParse<AdapterKind>(method.Name, ignoreCase: true, out var kind) ? kind
            : throw new LoraMixException($"adapter method '{method.Name}' has no {nameof(AdapterKind)}; use {nameof(AdapterMethods)}");
}
