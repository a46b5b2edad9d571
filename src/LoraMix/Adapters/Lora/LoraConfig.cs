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

    /// <summary>How long one <see cref="TargetRegex"/> match may run before it is abandoned (a pattern with catastrophic
    /// backtracking cannot hang loading or training).</summary>
    public static readonly TimeSpan RegexMatchTimeout = TimeSpan.FromSeconds(1);

    /// <summary>The largest rank accepted (<c>r</c>).</summary>
    public const int MaxRank = 65_536;

    /// <summary>Whether the module at <paramref name="modulePath"/> (e.g. <c>model.layers.3.mlp.up_proj</c>) is targeted.</summary>
    /// <exception cref="AdapterConfigException"><see cref="TargetRegex"/> is not a valid regex, or its match ran past
    /// <see cref="RegexMatchTimeout"/>.</exception>
    public bool Targets(string modulePath)
    {
        if (AllLinear) return modulePath != "lm_head";
        if (TargetRegex is not null)
        {
            try
            {
                // The static method caches the parsed pattern, so matching every module name parses it once.
                return Regex.IsMatch(modulePath, FullMatchPattern, RegexOptions.CultureInvariant, RegexMatchTimeout);
            }
            catch (RegexMatchTimeoutException)
            {
                throw new AdapterConfigException("adapter config", "target_modules",
                    $"the regex '{TargetRegex}' took longer than {RegexMatchTimeout.TotalSeconds:0.#} s to match '{modulePath}' (catastrophic backtracking); simplify it or list the module names");
            }
            catch (ArgumentException e)
            {
                throw InvalidRegex("adapter config", e);
            }
        }
        return TargetModules!.Any(t => modulePath == t || modulePath.EndsWith("." + t, StringComparison.Ordinal));
    }

    /// <summary><see cref="TargetRegex"/> as a full match (PEFT's <c>re.fullmatch</c>).</summary>
    private string FullMatchPattern => $"^(?:{TargetRegex})$";

    private AdapterConfigException InvalidRegex(string source, ArgumentException e) =>
        new(source, "target_modules",
            $"'{TargetRegex}' is not a valid regular expression ({e.Message}); give a regex matched against the full module name, a list of module names, or \"all-linear\"");

    /// <summary>Checks ranges; throws <see cref="AdapterConfigException"/> naming the key.</summary>
    public void Validate(string source = "adapter config")
    {
        void Fail(string key, string reason) => throw new AdapterConfigException(source, key, reason);
        if (R <= 0 || R > MaxRank) Fail("r", $"must be an integer in [1, {MaxRank}], got {R}");
        if (!(LoraAlpha > 0 && double.IsFinite(LoraAlpha))) Fail("lora_alpha", $"must be a finite positive number, got {LoraAlpha}");
        if (!(LoraDropout >= 0 && LoraDropout < 1)) Fail("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        if (!AllLinear && TargetRegex is null && (TargetModules is null || TargetModules.Count == 0))
            Fail("target_modules", "is empty; give module names (e.g. [\"q_proj\", \"v_proj\"]), a regex, or \"all-linear\"");
        if (!AllLinear && TargetRegex is not null)
        {
            try { _ = new Regex(FullMatchPattern, RegexOptions.CultureInvariant, RegexMatchTimeout); }
            catch (ArgumentException e) { throw InvalidRegex(source, e); }
        }
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
        static bool IsString(JsonNode? n) => n is JsonValue v && v.GetValueKind() == JsonValueKind.String;
        cfg = obj["target_modules"] switch
        {
            JsonValue v when IsString(v) && v.GetValue<string>() == "all-linear" => cfg with { AllLinear = true, TargetModules = null },
            JsonValue v when IsString(v) => cfg with { TargetRegex = v.GetValue<string>(), TargetModules = null },
            JsonArray a when a.All(IsString) => cfg with { TargetModules = a.Select(e => e!.GetValue<string>()).ToList() },
            null => throw new LoraMixException($"{source}: 'target_modules' is missing"),
            var other => throw new LoraMixException($"{source}: 'target_modules' must be a list, a regex string or \"all-linear\", got {other.ToJsonString()}"),
        };
        cfg.Validate(source);
        return cfg;
    }
}
