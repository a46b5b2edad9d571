using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.MixLora;

namespace LoraMix.Adapters.XLora;

/// <summary>Which files an X-LoRA directory is written in.</summary>
public enum XLoraLayout
{
    /// <summary>Hugging Face PEFT: <c>adapter_config.json</c> (<c>"peft_type": "XLORA"</c>) and
    /// <c>adapter_model.safetensors</c> with <c>base_model.internal_xlora_classifier.layers.{k}.weight|bias</c>.</summary>
    Peft,

    /// <summary>The original <c>xlora</c> package (and mistral.rs): <c>xlora_config.json</c> and
    /// <c>xlora_classifier.safetensors</c> with <c>inner.{k}.weight|bias</c> and <c>last.weight|bias</c>.</summary>
    Original,
}

/// <summary>
/// An X-LoRA config: PEFT's <c>XLoraConfig</c> fields with PEFT's names and defaults, the original package's
/// <c>enable_relu_and_dropout</c> / <c>use_bias</c>, and LoraMix's explicit <c>module_order</c> (the L axis of the scalings).
/// </summary>
/// <remarks>
/// <para><b>Indices.</b> Adapter index i is the position in <see cref="Adapters"/> (the JSON object's key order); names are
/// labels. Module index l is the position in <see cref="ModuleOrder"/>: PEFT's order of LoRA-wrapped modules, per decoder
/// layer <c>q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj</c>, only those at least one expert targets.
/// A layerwise head's output index is <c>l·N + i</c>.</para>
/// </remarks>
public sealed record XLoraConfig
{
    /// <summary>The <c>peft_type</c> of a PEFT X-LoRA <c>adapter_config.json</c>.</summary>
    public const string PeftType = "XLORA";

    /// <summary>PEFT's config file name.</summary>
    public const string PeftConfigFileName = "adapter_config.json";
    /// <summary>PEFT's weights file name (the head only).</summary>
    public const string PeftWeightsFileName = "adapter_model.safetensors";
    /// <summary>The original package's config file name.</summary>
    public const string OriginalConfigFileName = "xlora_config.json";
    /// <summary>The original package's head file name.</summary>
    public const string OriginalWeightsFileName = "xlora_classifier.safetensors";

    /// <summary>Base model hidden size, the head's input width.</summary>
    public int HiddenSize { get; init; }

    /// <summary>The experts: (name, path of a PEFT LoRA directory), in adapter-index order.</summary>
    public IReadOnlyList<(string Name, string Path)> Adapters { get; init; } = [];

    public bool EnableSoftmax { get; init; } = true;
    public bool EnableSoftmaxTopk { get; init; }
    public double SoftmaxTemperature { get; init; } = 1.0;
    public bool LayerwiseScalings { get; init; }
    public int? TopKLora { get; init; }
    public int XLoraDepth { get; init; } = 1;
    public int XLoraSize { get; init; } = 2048;
    public double XLoraDropoutP { get; init; } = 0.2;
    public bool UseTrainableAdapters { get; init; }
    public double ScalingPassValue { get; init; }
    public double GlobalScalingWeight { get; init; } = 1.0;

    /// <summary>ReLU (and dropout) between the head's linear layers. PEFT always has them; the original package has the
    /// key (default true since 2024-04-11).</summary>
    public bool EnableReluAndDropout { get; init; } = true;

    /// <summary>Bias on the head's linear layers. PEFT always has it; the original package has the key.</summary>
    public bool UseBias { get; init; } = true;

    /// <summary>The L axis of the scalings: the LoRA-wrapped module paths in order, or null when a file did not say (it is
    /// then computed from the experts' targets, and written on save).</summary>
    public IReadOnlyList<string>? ModuleOrder { get; init; }

    /// <summary>LoraMix's <c>router_policy</c> for the scaling head: <c>free</c> (X-LoRA as published: every token's own
    /// scalings) or <c>privileged</c> (scalings frozen from each row's first untrusted token on, from a snapshot of the
    /// privileged tokens before it; the same policy code as MixLoRA's router, <see cref="Routing.PrivilegedRouterPolicy"/>).</summary>
    public string RouterPolicy { get; init; } = MixLoraConfig.FreePolicy;

    /// <summary><c>privileged_snapshot</c>: <c>last</c> (the last privileged token's scalings) or <c>pooled</c> (their mean).</summary>
    public string PrivilegedSnapshot { get; init; } = MixLoraConfig.LastSnapshot;

    /// <summary>The policy object for <see cref="RouterPolicy"/> and <see cref="PrivilegedSnapshot"/>.</summary>
    public Routing.IRouterPolicy CreatePolicy() => RouterPolicy == MixLoraConfig.PrivilegedPolicy
        ? PrivilegedSnapshot == MixLoraConfig.PooledSnapshot ? Routing.PrivilegedRouterPolicy.Pooled : Routing.PrivilegedRouterPolicy.Last
        : Routing.FreeRouterPolicy.Instance;

    public string? BaseModelNameOrPath { get; init; }
    public string TaskType { get; init; } = "CAUSAL_LM";
    public bool InferenceMode { get; init; } = true;

    /// <summary>Number of experts N.</summary>
    public int NumAdapters => Adapters.Count;

    /// <summary>The head's output width for <paramref name="modules"/> wrapped modules.</summary>
    public int OutputSize(int modules) => LayerwiseScalings ? NumAdapters * modules : NumAdapters;

    /// <summary>Largest <c>xlora_depth</c> accepted (64).</summary>
    public const int MaxDepth = 64;
    /// <summary>Largest <c>xlora_size</c> accepted (65,536).</summary>
    public const int MaxSize = 1 << 16;
    /// <summary>Largest <c>hidden_size</c> accepted (65,536).</summary>
    public const int MaxHiddenSize = 1 << 16;
    /// <summary>Most experts (1,024).</summary>
    public const int MaxAdapters = 1024;

    /// <summary>The keys LoraMix reads from a PEFT <c>adapter_config.json</c>.</summary>
    private static readonly string[] PeftKeys =
    [
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
        "hidden_size", "adapters", "enable_softmax", "enable_softmax_topk", "layerwise_scalings", "xlora_depth", "xlora_size",
        "xlora_dropout_p", "use_trainable_adapters", "softmax_temperature", "top_k_lora", "scaling_pass_value",
        "global_scaling_weight", "module_order", "router_policy", "privileged_snapshot",
    ];

    /// <summary>The keys of the original package's <c>xlora_config.json</c>.</summary>
    private static readonly string[] OriginalKeys =
    [
        "base_model_id", "hidden_size", "adapters", "enable_softmax", "enable_softmax_topk", "layerwise_scalings", "xlora_depth",
        "xlora_size", "xlora_dropout_p", "use_trainable_adapters", "softmax_temperature", "top_k_lora", "scaling_pass_value",
        "global_scaling_weight", "enable_relu_and_dropout", "use_bias", "stop_token_id", "use_mean_pool", "module_order",
        "router_policy", "privileged_snapshot",
    ];

    /// <summary>Checks ranges and cross-key rules; throws <see cref="AdapterConfigException"/> naming the key.</summary>
    public void Validate(string source = "X-LoRA config") => Validate(source, allowUnsetHiddenSize: false);

    private void Validate(string source, bool allowUnsetHiddenSize)
    {
        void Fail(string key, string reason) => throw new AdapterConfigException(source, key, reason);
        string F(double v) => v.ToString(CultureInfo.InvariantCulture);
        if (!(allowUnsetHiddenSize && HiddenSize == 0) && (HiddenSize < 1 || HiddenSize > MaxHiddenSize))
            Fail("hidden_size", $"expected an integer in [1, {MaxHiddenSize}], got {HiddenSize}");
        if (Adapters.Count == 0) Fail("adapters", "is empty; give at least one expert: {\"name\": \"path/to/lora\"}");
        if (Adapters.Count > MaxAdapters) Fail("adapters", $"has {Adapters.Count} experts, more than {MaxAdapters}");
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, path) in Adapters)
        {
            if (string.IsNullOrEmpty(name)) Fail("adapters", "an expert name is empty");
            if (!seen.Add(name)) Fail("adapters", $"expert '{name}' appears twice");
            if (string.IsNullOrEmpty(path)) Fail("adapters", $"expert '{name}' has an empty path");
        }
        if (XLoraDepth < 1 || XLoraDepth > MaxDepth) Fail("xlora_depth", $"expected an integer in [1, {MaxDepth}], got {XLoraDepth}");
        if (XLoraSize < 1 || XLoraSize > MaxSize) Fail("xlora_size", $"expected an integer in [1, {MaxSize}], got {XLoraSize}");
        if (!(XLoraDropoutP >= 0 && XLoraDropoutP < 1)) Fail("xlora_dropout_p", $"expected a number in [0, 1), got {F(XLoraDropoutP)}");
        if (!(SoftmaxTemperature > 0) || !double.IsFinite(SoftmaxTemperature))
            Fail("softmax_temperature", $"expected a positive number, got {F(SoftmaxTemperature)}");
        if (TopKLora is int k && (k < 1 || k > Adapters.Count))
            Fail("top_k_lora", $"expected an integer in [1, {Adapters.Count}] (the number of experts) or null, got {k}");
        if (!double.IsFinite(ScalingPassValue)) Fail("scaling_pass_value", $"expected a finite number, got {F(ScalingPassValue)}");
        if (!double.IsFinite(GlobalScalingWeight)) Fail("global_scaling_weight", $"expected a finite number, got {F(GlobalScalingWeight)}");
        var policies = MixLoraConfig.RouterPolicies;
        var snapshots = MixLoraConfig.PrivilegedSnapshots;
        if (!policies.Contains(RouterPolicy)) Fail("router_policy", $"'{RouterPolicy}' is not supported; use one of {string.Join(", ", policies)}");
        if (!snapshots.Contains(PrivilegedSnapshot)) Fail("privileged_snapshot", $"'{PrivilegedSnapshot}' is not supported; use one of {string.Join(", ", snapshots)}");
        if (RouterPolicy != MixLoraConfig.PrivilegedPolicy && PrivilegedSnapshot != MixLoraConfig.LastSnapshot)
            Fail("privileged_snapshot", $"applies to router_policy \"privileged\" only, but router_policy is \"{RouterPolicy}\"");
        if (ModuleOrder is { } order)
        {
            if (order.Count == 0) Fail("module_order", "is empty");
            if (order.Distinct(StringComparer.Ordinal).Count() != order.Count) Fail("module_order", "names a module twice");
        }
    }

    /// <summary>
    /// Parses a config object of either layout. Unknown keys are ignored as PEFT does, except keys that look like a key
    /// LoraMix reads (<c>enable_softmax_top_k</c>, <c>layerwise_scaling</c>, <c>topk_lora</c>...), which are errors:
    /// a misspelt key would silently fall back to its default.
    /// </summary>
    /// <exception cref="AdapterConfigException">A key is missing, mistyped, out of range or unsupported.</exception>
    public static XLoraConfig Parse(JsonObject obj, string source, XLoraLayout layout) => Parse(obj, source, layout, recipe: false);

    /// <summary>A training recipe's <c>adapter:</c> section (no <c>peft_type</c>; <c>hidden_size</c> may be left out: 0, the
    /// model's).</summary>
    public static XLoraConfig ParseRecipe(JsonObject obj, string source) => Parse(obj, source, XLoraLayout.Peft, recipe: true);

    private static XLoraConfig Parse(JsonObject obj, string source, XLoraLayout layout, bool recipe)
    {
        var known = layout == XLoraLayout.Peft ? PeftKeys : OriginalKeys;
        foreach (var (key, _) in obj)
            if (!known.Contains(key) && LooksLike(key, known) is { } meant)
                throw new AdapterConfigException(source, key, $"is not a key LoraMix reads; did you mean \"{meant}\"?");
        if (recipe) { }
        else if (layout == XLoraLayout.Peft)
        {
            string? peftType = Str(obj, "peft_type", source);
            if (peftType != PeftType)
                throw new AdapterConfigException(source, "peft_type", $"is {(peftType is null ? "missing" : $"'{InputFiles.Shorten(peftType)}'")}, expected '{PeftType}' for an X-LoRA adapter");
        }
        else
        {
            if (obj["use_mean_pool"] is JsonNode mp && mp.GetValueKind() == JsonValueKind.True)
                throw new AdapterConfigException(source, "use_mean_pool", "true is the package's early sequence-level design, not supported; LoraMix implements per-token scalings");
            if (obj["stop_token_id"] is JsonNode st && st.GetValueKind() != JsonValueKind.Null)
                throw new AdapterConfigException(source, "stop_token_id", "belongs to the package's early sequence-level design, not supported; remove it");
        }

        int hidden = Int(obj, "hidden_size", source) ?? (recipe ? 0 : throw new AdapterConfigException(source, "hidden_size",
            "is missing; give the base model's hidden size (PEFT would assume 4096)"));
        var cfg = new XLoraConfig
        {
            HiddenSize = hidden,
            Adapters = ReadAdapters(obj, source, layout),
            EnableSoftmax = Bool(obj, "enable_softmax", source) ?? true,
            EnableSoftmaxTopk = Bool(obj, "enable_softmax_topk", source) ?? false,
            SoftmaxTemperature = Num(obj, "softmax_temperature", source) ?? 1.0,
            LayerwiseScalings = Bool(obj, "layerwise_scalings", source) ?? false,
            TopKLora = Int(obj, "top_k_lora", source),
            XLoraDepth = Int(obj, "xlora_depth", source) ?? 1,
            XLoraSize = Int(obj, "xlora_size", source) ?? 2048,
            XLoraDropoutP = Num(obj, "xlora_dropout_p", source) ?? 0.2,
            UseTrainableAdapters = Bool(obj, "use_trainable_adapters", source) ?? false,
            ScalingPassValue = Num(obj, "scaling_pass_value", source) ?? 0.0,
            GlobalScalingWeight = Num(obj, "global_scaling_weight", source) ?? 1.0,
            EnableReluAndDropout = layout == XLoraLayout.Original ? Bool(obj, "enable_relu_and_dropout", source) ?? true : true,
            UseBias = layout == XLoraLayout.Original ? Bool(obj, "use_bias", source) ?? true : true,
            ModuleOrder = StrList(obj, "module_order", source),
            RouterPolicy = NonNullStr(obj, "router_policy", source) ?? MixLoraConfig.FreePolicy,
            PrivilegedSnapshot = NonNullStr(obj, "privileged_snapshot", source) ?? MixLoraConfig.LastSnapshot,
            BaseModelNameOrPath = Str(obj, layout == XLoraLayout.Peft ? "base_model_name_or_path" : "base_model_id", source),
            TaskType = layout == XLoraLayout.Peft ? Str(obj, "task_type", source) ?? "CAUSAL_LM" : "CAUSAL_LM",
            InferenceMode = layout == XLoraLayout.Peft ? Bool(obj, "inference_mode", source) ?? true : true,
        };
        cfg.Validate(source, allowUnsetHiddenSize: recipe);
        return cfg;
    }

    private static IReadOnlyList<(string, string)> ReadAdapters(JsonObject obj, string source, XLoraLayout layout)
    {
        switch (obj["adapters"])
        {
            case JsonObject map:
                return map.Select(kv => (kv.Key, kv.Value is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>()
                    : throw new AdapterConfigException(source, "adapters", $"expert '{kv.Key}': expected a path string, got {InputFiles.Shorten(kv.Value?.ToJsonString() ?? "null")}"))).ToList();
            case JsonArray list when layout == XLoraLayout.Original:
                // the original package saves the names; each expert is the subdirectory of that name
                return list.Select(e => e is JsonValue v && v.GetValueKind() == JsonValueKind.String ? (v.GetValue<string>(), v.GetValue<string>())
                    : throw new AdapterConfigException(source, "adapters", $"entries must be names, got {InputFiles.Shorten(e?.ToJsonString() ?? "null")}")).ToList();
            case null:
                throw new AdapterConfigException(source, "adapters", "is missing; give the experts as {\"name\": \"path/to/lora\"}");
            case var other:
                throw new AdapterConfigException(source, "adapters",
                    $"expected {(layout == XLoraLayout.Peft ? "an object {name: path}" : "a list of names or an object {name: path}")}, got {InputFiles.Shorten(other.ToJsonString())}");
        }
    }

    /// <summary>Writes PEFT's <c>adapter_config.json</c>: sorted keys, two-space indent, PEFT's field set plus
    /// <c>module_order</c>; <paramref name="adapterPaths"/> replaces the paths when given.</summary>
    public string ToPeftJson(IReadOnlyList<string> moduleOrder, IReadOnlyList<string>? adapterPaths = null)
    {
        var adapters = new JsonObject();
        for (int i = 0; i < Adapters.Count; i++) adapters[Adapters[i].Name] = adapterPaths?[i] ?? Adapters[i].Path;
        var fields = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["adapters"] = adapters,
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
            ["enable_softmax"] = EnableSoftmax,
            ["enable_softmax_topk"] = EnableSoftmaxTopk,
            ["global_scaling_weight"] = GlobalScalingWeight,
            ["hidden_size"] = HiddenSize,
            ["inference_mode"] = InferenceMode,
            ["layerwise_scalings"] = LayerwiseScalings,
            ["module_order"] = new JsonArray([.. moduleOrder.Select(m => (JsonNode)JsonValue.Create(m)!)]),
            ["peft_type"] = PeftType,
            ["revision"] = null,
            ["scaling_pass_value"] = ScalingPassValue,
            ["softmax_temperature"] = SoftmaxTemperature,
            ["task_type"] = TaskType,
            ["top_k_lora"] = TopKLora,
            ["use_trainable_adapters"] = UseTrainableAdapters,
            ["xlora_depth"] = XLoraDepth,
            ["xlora_dropout_p"] = XLoraDropoutP,
            ["xlora_size"] = XLoraSize,
        };
        if (RouterPolicy != MixLoraConfig.FreePolicy) fields["router_policy"] = RouterPolicy;
        if (PrivilegedSnapshot != MixLoraConfig.LastSnapshot) fields["privileged_snapshot"] = PrivilegedSnapshot;
        var obj = new JsonObject();
        foreach (var (k, v) in fields) obj[k] = v;
        return obj.ToJsonString(new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
    }

    /// <summary>Writes the original package's <c>xlora_config.json</c> (adapters as a list of names: each expert is the
    /// subdirectory of its name).</summary>
    public string ToOriginalJson(IReadOnlyList<string> moduleOrder)
    {
        var obj = new JsonObject
        {
            ["adapters"] = new JsonArray([.. Adapters.Select(a => (JsonNode)JsonValue.Create(a.Name)!)]),
            ["base_model_id"] = BaseModelNameOrPath,
            ["enable_relu_and_dropout"] = EnableReluAndDropout,
            ["enable_softmax"] = EnableSoftmax,
            ["enable_softmax_topk"] = EnableSoftmaxTopk,
            ["global_scaling_weight"] = GlobalScalingWeight,
            ["hidden_size"] = HiddenSize,
            ["layerwise_scalings"] = LayerwiseScalings,
            ["module_order"] = new JsonArray([.. moduleOrder.Select(m => (JsonNode)JsonValue.Create(m)!)]),
            ["scaling_pass_value"] = ScalingPassValue,
            ["softmax_temperature"] = SoftmaxTemperature,
            ["top_k_lora"] = TopKLora,
            ["use_bias"] = UseBias,
            ["use_trainable_adapters"] = UseTrainableAdapters,
            ["xlora_depth"] = XLoraDepth,
            ["xlora_dropout_p"] = XLoraDropoutP,
            ["xlora_size"] = XLoraSize,
        };
        if (RouterPolicy != MixLoraConfig.FreePolicy) obj["router_policy"] = RouterPolicy;
        if (PrivilegedSnapshot != MixLoraConfig.LastSnapshot) obj["privileged_snapshot"] = PrivilegedSnapshot;
        return obj.ToJsonString(new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
    }

    /// <summary>The known key <paramref name="key"/> looks like (letters and digits, case ignored: equal, or at most two
    /// edits apart), or null.</summary>
    private static string? LooksLike(string key, IEnumerable<string> known)
    {
                string n = ConfigKeyMatch.Normalize(key);
        foreach (var k in known)
        {
            string o = ConfigKeyMatch.Normalize(k);
            if (n == o || (o.Length > 6 && ConfigKeyMatch.Levenshtein(n, o) <= 2)) return k;
        }
        return null;
    }


    private static string? Str(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n.GetValueKind() == JsonValueKind.String ? n.GetValue<string>()
            : throw new AdapterConfigException(source, key, $"expected a string, got {InputFiles.Shorten(n.ToJsonString())}");
    }

    /// <summary>A string, or null when absent; an explicit null is an error (a key whose silent default would weaken the
    /// routing guarantee).</summary>
    private static string? NonNullStr(JsonObject o, string key, string source)
    {
        if (o.TryGetPropertyValue(key, out var n) && n is null)
            throw new AdapterConfigException(source, key, "is null; write a value (or leave the key out for the default)");
        return Str(o, key, source);
    }

    private static bool? Bool(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n.GetValueKind() switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new AdapterConfigException(source, key, $"expected true or false, got {InputFiles.Shorten(n.ToJsonString())}"),
        };
    }

    private static double? Num(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n.GetValueKind() == JsonValueKind.Number ? double.Parse(n.ToJsonString(), CultureInfo.InvariantCulture)
            : throw new AdapterConfigException(source, key, $"expected a number, got {InputFiles.Shorten(n.ToJsonString())}");
    }

    private static int? Int(JsonObject o, string key, string source)
    {
        if (Num(o, key, source) is not double d) return null;
        return d == Math.Floor(d) && d >= int.MinValue && d <= int.MaxValue ? (int)d
            : throw new AdapterConfigException(source, key, $"expected an integer, got {d.ToString(CultureInfo.InvariantCulture)}");
    }

    private static IReadOnlyList<string>? StrList(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n is JsonArray a
            ? a.Select(e => e is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>()
                : throw new AdapterConfigException(source, key, $"entries must be module paths, got {InputFiles.Shorten(e?.ToJsonString() ?? "null")}")).ToList()
            : throw new AdapterConfigException(source, key, $"expected a list of module paths, got {InputFiles.Shorten(n.ToJsonString())}");
    }
}
