using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Modeling;

namespace LoraMix.Adapters;

/// <summary>Where an adapter config object comes from. Each config has one parser; this tells it the few places where
/// the two sources have always differed (defaults for keys a file must give, recipe-only aliases, file-only legacy
/// names and cross-key checks). Everything else (types, bounds, validation) is the same for both.</summary>
public enum AdapterConfigDialect
{
    /// <summary>An <c>adapter_config.json</c> (PEFT / MoE-PEFT keys, as those libraries write them).</summary>
    AdapterConfigJson,

    /// <summary>The <c>adapter:</c> section of a training recipe, already read with the recipe's typed accessors into a
    /// JSON object of the keys in <see cref="IAdapterMethod.RecipeKeys"/> (plus <c>base_model_name_or_path</c>).</summary>
    Recipe,
}

/// <summary>How a recipe reads one of a method's <c>adapter.*</c> keys (the recipe's typed accessors, with their leniency
/// and messages: a number may be written as a numeric string, a list as one string).</summary>
public enum RecipeValueKind
{
    Int,
    Number,
    Bool,
    String,
    /// <summary>A string; an explicit null is an error (keys whose silent default would weaken a guarantee).</summary>
    NonNullString,
    /// <summary>A bool; an explicit null is an error.</summary>
    NonNullBool,
    /// <summary>A list of strings, or one string (e.g. <c>all-linear</c> or a regex).</summary>
    StringListOrString,
    /// <summary>A mapping of names to strings, kept in order (X-LoRA's <c>adapters: {name: path}</c>).</summary>
    StringMap,
}

/// <summary>One key a method accepts under a recipe's <c>adapter:</c> (dotted for nesting: <c>expert_lora.r</c>).</summary>
public sealed record RecipeKey(string Key, RecipeValueKind Kind);

/// <summary>
/// An adapter method (LoRA, MixLoRA, ...): its names, its config parser and its directory I/O. One implementation per
/// method lives in the method's folder (<c>Adapters/Lora/LoraMethod.cs</c>, ...) and is registered once in
/// <see cref="AdapterMethods"/>.
/// </summary>
public interface IAdapterMethod
{
    /// <summary>The recipe's <c>adapter.type</c> (<c>lora</c>, <c>mixlora</c>).</summary>
    string Name { get; }

    /// <summary>The <c>peft_type</c> of its <c>adapter_config.json</c> (<c>LORA</c>, <c>MIXLORA</c>).</summary>
    string PeftType { get; }

    /// <summary>A human name for messages (<c>LoRA</c>, <c>MixLoRA</c>).</summary>
    string DisplayName { get; }

    /// <summary>What a trained adapter directory holds, for messages (<c>PEFT LoRA: adapter_config.json + ...</c>).</summary>
    string OutputDescription { get; }

    /// <summary>The config record type (<see cref="LoraConfig"/>, <see cref="MixLoraConfig"/>).</summary>
    Type ConfigType { get; }

    /// <summary>The keys the method accepts under a recipe's <c>adapter:</c> (without the <c>adapter.</c> prefix).</summary>
    IReadOnlyList<RecipeKey> RecipeKeys { get; }

    /// <summary>Whether a config object without <c>peft_type</c> is of this method (MixLoRA: it has <c>routing_strategy</c>).</summary>
    bool ClaimsUntyped(JsonObject config);

    /// <summary>Parses a config object with the config's one parser; <paramref name="source"/> names it in errors.</summary>
    /// <exception cref="AdapterConfigException">A key is missing, mistyped, out of range or unsupported.</exception>
    object ParseConfig(JsonObject config, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson);

    /// <summary>Reads <c>adapter_config.json</c> of an adapter directory.</summary>
    object LoadConfig(string directory);

    /// <summary>Loads the adapter directory onto <paramref name="model"/> under <paramref name="adapterName"/> (forward calls
    /// then select it by name, <see cref="AdapterSelection"/>); returns its config.</summary>
    object Load(LlamaForCausalLM model, string directory, string adapterName = "default");

    /// <summary>Writes the adapter <paramref name="adapterName"/> with <paramref name="config"/> to <paramref name="directory"/>.</summary>
    void Save(LlamaForCausalLM model, object config, string directory, string adapterName = "default");

    /// <summary>Removes the adapter <paramref name="adapterName"/> from the model.</summary>
    void Remove(LlamaForCausalLM model, string adapterName);
}

/// <summary>
/// The registry of adapter methods: the one place mapping <c>peft_type</c> strings and recipe <c>adapter.type</c> names
/// to code. Adding a method = its folder (config record + <see cref="IAdapterMethod"/> implementation) + one line in
/// <see cref="All"/>.
/// </summary>
public static class AdapterMethods
{
    /// <summary>LoRA (<c>LORA</c>, recipe <c>lora</c>); also what a config without <c>peft_type</c> that no other method
    /// claims is (PEFT's default).</summary>
    public static IAdapterMethod Lora { get; } = new LoraMethod();

    /// <summary>MixLoRA (<c>MIXLORA</c>, recipe <c>mixlora</c>).</summary>
    public static IAdapterMethod MixLora { get; } = new MixLoraMethod();

    /// <summary>X-LoRA (<c>XLORA</c>, recipe <c>xlora</c>).</summary>
    public static IAdapterMethod XLora { get; } = new XLoraMethod();

    /// <summary>Every registered method, in registration order (the order recipe keys and messages list them in).</summary>
    public static IReadOnlyList<IAdapterMethod> All { get; } = [Lora, MixLora, XLora];

    /// <summary>The method of a config object without <c>peft_type</c> that no method claims.</summary>
    public static IAdapterMethod Untyped => Lora;

    /// <summary>The registered <c>peft_type</c>s.</summary>
    public static IReadOnlyList<string> PeftTypes => [.. All.Select(m => m.PeftType)];

    /// <summary>The registered recipe names (<c>adapter.type</c>).</summary>
    public static IReadOnlyList<string> Names => [.. All.Select(m => m.Name)];

    /// <summary>The method with this <c>peft_type</c> (exact, as PEFT compares it), or null.</summary>
    public static IAdapterMethod? ByPeftType(string peftType) => All.FirstOrDefault(m => m.PeftType == peftType);

    /// <summary>The method with this recipe name (case-insensitive, as <c>adapter.type</c> always was), or null.</summary>
    public static IAdapterMethod? ByName(string name) => All.FirstOrDefault(m => m.Name.Equals(name, StringComparison.OrdinalIgnoreCase));

    /// <summary>The method of a config object: by <c>peft_type</c>, else the first method claiming it, else <see cref="Untyped"/>.</summary>
    /// <exception cref="AdapterConfigException"><c>peft_type</c> is a string no method is registered for.</exception>
    public static IAdapterMethod Detect(JsonObject config, string source)
    {
        string? type = config["peft_type"] is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : null;
        if (type is null) return All.FirstOrDefault(m => m.ClaimsUntyped(config)) ?? Untyped;
        return ByPeftType(type) ?? throw new AdapterConfigException(source, "peft_type",
            $"is '{InputFiles.Shorten(type)}'; LoraMix loads {JoinAnd(PeftTypes)} adapters");
    }

    /// <summary>The method of the adapter in <paramref name="directory"/>; throws naming the file when it is missing, not
    /// JSON, or of a <c>peft_type</c> no method is registered for (the message lists the registered ones).</summary>
    public static IAdapterMethod Detect(string directory)
    {
        string path = Path.Combine(directory, LoraAdapters.ConfigFileName);
        if (!Directory.Exists(directory)) throw new LoraMixException($"adapter directory '{directory}' does not exist");
        if (!Path.Exists(path) && File.Exists(Path.Combine(directory, XLoraConfig.OriginalConfigFileName))) return XLora;   // the xlora package's layout
        var obj = AdapterFiles.ReadConfigObject(path, string.Join(" or ", All.Select(m => m.DisplayName)));
        return Detect(obj, path);
    }

    /// <summary>"A", "A and B", "A, B and C".</summary>
    internal static string JoinAnd(IReadOnlyList<string> items) =>
        items.Count <= 1 ? string.Join("", items) : string.Join(", ", items.Take(items.Count - 1)) + " and " + items[^1];
}
