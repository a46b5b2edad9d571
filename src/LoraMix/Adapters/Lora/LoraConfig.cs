using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace LoraMix.Adapters.Lora;

/// <summary>
/// A Hugging Face PEFT <c>LoraConfig</c> (<c>adapter_config.json</c> with <c>peft_type: "LORA"</c>), with PEFT's names and
/// defaults. Options LoraMix does not implement (DoRA, fan_in_fan_out, biases, modules_to_save, rank/alpha patterns,
/// layer selection) are rejected when set to anything but their default.
/// </summary>
public sealed record LoraConfig
{
    public int R { get; init; } = 8;
    public double LoraAlpha { get; init; } = 8;
    public double LoraDropout { get; init; }
    /// <summary>Module names matched as suffixes (<c>q_proj</c> matches <c>model.layers.0.self_attn.q_proj</c>), or null with
    /// <see cref="TargetRegex"/> / <see cref="AllLinear"/>.</summary>
    public IReadOnlyList<string>? TargetModules { get; init; } = ["q_proj", "v_proj"];
    /// <summary>A regex matched against the full module name (PEFT's string form of target_modules).</summary>
    public string? TargetRegex { get; init; }
    /// <summary>PEFT's <c>"all-linear"</c>: every linear layer except the output head.</summary>
    public bool AllLinear { get; init; }
    public bool UseRsLora { get; init; }
    public string? BaseModelNameOrPath { get; init; }
    public string TaskType { get; init; } = "CAUSAL_LM";
    public bool InferenceMode { get; init; } = true;

    /// <summary>The linear layers of a Llama decoder layer, by Hugging Face name.</summary>
    public static readonly IReadOnlyList<string> LlamaLinearNames = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>Whether the module at <paramref name="modulePath"/> (e.g. <c>model.layers.3.mlp.up_proj</c>) is targeted.</summary>
    public bool Targets(string modulePath)
    {
        if (AllLinear) return modulePath != "lm_head";
        if (TargetRegex is not null) return Regex.IsMatch(modulePath, $"^(?:{TargetRegex})$");
        return TargetModules!.Any(t => modulePath == t || modulePath.EndsWith("." + t, StringComparison.Ordinal));
    }

    /// <summary>Checks ranges; throws <see cref="LoraMixException"/> naming the key.</summary>
    public void Validate(string source = "adapter config")
    {
        if (R <= 0) throw new LoraMixException($"{source}: 'r' must be a positive integer, got {R}");
        if (!(LoraAlpha > 0)) throw new LoraMixException($"{source}: 'lora_alpha' must be positive, got {LoraAlpha}");
        if (LoraDropout is < 0 or >= 1) throw new LoraMixException($"{source}: 'lora_dropout' must be in [0, 1), got {LoraDropout}");
        if (!AllLinear && TargetRegex is null && (TargetModules is null || TargetModules.Count == 0))
            throw new LoraMixException($"{source}: 'target_modules' is empty; give module names (e.g. [\"q_proj\", \"v_proj\"]), a regex, or \"all-linear\"");
    }

    /// <summary>Writes <c>adapter_config.json</c> as PEFT does: sorted keys, two-space indent, PEFT's full field set.</summary>
    public string ToPeftJson()
    {
        JsonNode? targets = AllLinear ? JsonValue.Create("all-linear")
            : TargetRegex is not null ? JsonValue.Create(TargetRegex)
            : new JsonArray(TargetModules!.Select(t => (JsonNode)JsonValue.Create(t)!).ToArray());
        var fields = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["alpha_pattern"] = new JsonObject(),
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
            ["bias"] = "none",
            ["eva_config"] = null,
            ["exclude_modules"] = null,
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = InferenceMode,
            ["init_lora_weights"] = true,
            ["layer_replication"] = null,
            ["layers_pattern"] = null,
            ["layers_to_transform"] = null,
            ["loftq_config"] = new JsonObject(),
            ["lora_alpha"] = LoraAlpha == Math.Floor(LoraAlpha) ? JsonValue.Create((long)LoraAlpha) : JsonValue.Create(LoraAlpha),
            ["lora_bias"] = false,
            ["lora_dropout"] = LoraDropout,
            ["megatron_config"] = null,
            ["megatron_core"] = "megatron.core",
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = R,
            ["rank_pattern"] = new JsonObject(),
            ["revision"] = null,
            ["target_modules"] = targets,
            ["task_type"] = TaskType,
            ["use_dora"] = false,
            ["use_rslora"] = UseRsLora,
        };
        var obj = new JsonObject();
        foreach (var (k, v) in fields) obj[k] = v;
        return obj.ToJsonString(new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
    }

    /// <summary>Reads a PEFT <c>adapter_config.json</c> for a LoRA adapter.</summary>
    public static LoraConfig Load(string path)
    {
        var obj = AdapterFiles.ReadConfigObject(path, "LoRA");
        return Parse(obj, path);
    }

    public static LoraConfig Parse(JsonObject obj, string source)
    {
        string peftType = obj["peft_type"]?.GetValue<string>() ?? "LORA";
        if (peftType != "LORA")
            throw new LoraMixException($"{source}: 'peft_type' is '{peftType}', expected 'LORA' for a LoRA adapter");

        void RejectUnless(string key, Func<JsonNode?, bool> isDefault, string what)
        {
            if (obj.TryGetPropertyValue(key, out var n) && !isDefault(n))
                throw new LoraMixException($"{source}: '{key}' = {n?.ToJsonString() ?? "null"} is not supported ({what})");
        }
        static bool IsFalse(JsonNode? n) => n is null || (n is JsonValue v && v.TryGetValue(out bool b) && !b);
        static bool IsEmpty(JsonNode? n) => n is null || (n is JsonObject o && o.Count == 0) || (n is JsonArray a && a.Count == 0);
        RejectUnless("use_dora", IsFalse, "DoRA is not implemented; supported: false");
        RejectUnless("fan_in_fan_out", IsFalse, "Llama weights are [out, in]; supported: false");
        RejectUnless("lora_bias", IsFalse, "supported: false");
        RejectUnless("bias", n => n is null || n.GetValue<string>() == "none", "supported: \"none\"");
        RejectUnless("modules_to_save", IsEmpty, "supported: null");
        RejectUnless("rank_pattern", IsEmpty, "per-module ranks are not supported; supported: {}");
        RejectUnless("alpha_pattern", IsEmpty, "per-module alphas are not supported; supported: {}");
        RejectUnless("layers_to_transform", IsEmpty, "supported: null (all layers)");
        RejectUnless("layer_replication", IsEmpty, "supported: null");
        RejectUnless("exclude_modules", IsEmpty, "supported: null");

        double Num(string key, double dflt)
        {
            if (!obj.TryGetPropertyValue(key, out var n) || n is null) return dflt;
            return n is JsonValue && n.GetValueKind() == JsonValueKind.Number
                ? double.Parse(n.ToJsonString(), System.Globalization.CultureInfo.InvariantCulture)
                : throw new LoraMixException($"{source}: '{key}' must be a number, got {n.ToJsonString()}");
        }

        double r = Num("r", 8);
        if (r != Math.Floor(r)) throw new LoraMixException($"{source}: 'r' must be an integer, got {r}");
        var cfg = new LoraConfig
        {
            R = (int)r,
            LoraAlpha = Num("lora_alpha", 8),
            LoraDropout = Num("lora_dropout", 0),
            UseRsLora = obj["use_rslora"] is JsonValue rs && rs.GetValue<bool>(),
            BaseModelNameOrPath = obj["base_model_name_or_path"] is JsonValue bm ? bm.GetValue<string>() : null,
            TaskType = obj["task_type"] is JsonValue tt ? tt.GetValue<string>() : "CAUSAL_LM",
            InferenceMode = obj["inference_mode"] is not JsonValue im || im.GetValue<bool>(),
        };
        cfg = obj["target_modules"] switch
        {
            JsonValue v when v.GetValue<string>() == "all-linear" => cfg with { AllLinear = true, TargetModules = null },
            JsonValue v => cfg with { TargetRegex = v.GetValue<string>(), TargetModules = null },
            JsonArray a => cfg with { TargetModules = a.Select(e => e!.GetValue<string>()).ToList() },
            null => throw new LoraMixException($"{source}: 'target_modules' is missing"),
            var other => throw new LoraMixException($"{source}: 'target_modules' must be a list, a regex string or \"all-linear\", got {other.ToJsonString()}"),
        };
        cfg.Validate(source);
        return cfg;
    }
}
