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
    /// <summary>The <c>peft_type</c> of a LoRA <c>adapter_config.json</c> (registered in <see cref="AdapterMethods"/>).</summary>
    public const string PeftType = "LORA";

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

    /// <summary>Largest <c>r</c> accepted when a config is read (65,536 = 2^16); when the adapter is attached, r must
    /// also be at most min(in, out) of every targeted layer (a larger rank adds parameters without adding rank).</summary>
    public const int MaxRank = 1 << 16;

    /// <summary>Largest <c>lora_alpha</c> accepted (1,048,576 = 2^20: alpha = 16 × r at the largest rank).</summary>
    public const double MaxLoraAlpha = 1 << 20;

    /// <summary>Longest <c>target_modules</c> regex (4,096 characters); it is matched with a 1-second timeout.</summary>
    public const int MaxTargetRegexLength = 4096;

    private static readonly TimeSpan RegexTimeout = TimeSpan.FromSeconds(1);

    /// <summary>Whether the module at <paramref name="modulePath"/> (e.g. <c>model.layers.3.mlp.up_proj</c>) is targeted.</summary>
    /// <exception cref="AdapterConfigException">The target regex is invalid or takes too long to match.</exception>
    public bool Targets(string modulePath)
    {
        if (AllLinear) return modulePath != "lm_head";
        if (TargetRegex is not null)
        {
            try
            {
                return Regex.IsMatch(modulePath, $"^(?:{TargetRegex})$", RegexOptions.CultureInvariant, RegexTimeout);
            }
            catch (RegexMatchTimeoutException)
            {
                throw new AdapterConfigException("adapter config", "target_modules",
                    $"the regex took more than {RegexTimeout.TotalSeconds:0} s to match '{modulePath}' (catastrophic backtracking?); simplify it or list the module names");
            }
            catch (ArgumentException e)
            {
                throw new AdapterConfigException("adapter config", "target_modules", InvalidRegex(e));
            }
        }
        return TargetModules!.Any(t => modulePath == t || modulePath.EndsWith("." + t, StringComparison.Ordinal));
    }

    /// <summary>Checks ranges and bounds (<see cref="MaxRank"/>, <see cref="MaxLoraAlpha"/>, <see cref="MaxTargetRegexLength"/>);
    /// throws <see cref="AdapterConfigException"/> naming the key, what is accepted and what was found.</summary>
    public void Validate(string source = "adapter config")
    {
        void Fail(string key, string reason) => throw new AdapterConfigException(source, key, reason);
        string F(double v) => v.ToString(System.Globalization.CultureInfo.InvariantCulture);
        if (R < 1 || R > MaxRank) Fail("r", $"expected an integer in [1, {MaxRank}], got {R}");
        if (!(LoraAlpha > 0 && LoraAlpha <= MaxLoraAlpha)) Fail("lora_alpha", $"expected a number in (0, {F(MaxLoraAlpha)}], got {F(LoraAlpha)}");
        if (!(LoraDropout >= 0 && LoraDropout < 1)) Fail("lora_dropout", $"expected a number in [0, 1), got {F(LoraDropout)}");
        if (!AllLinear && TargetRegex is null && (TargetModules is null || TargetModules.Count == 0))
            Fail("target_modules", "is empty; give module names (e.g. [\"q_proj\", \"v_proj\"]), a regex, or \"all-linear\"");
        if (TargetModules is not null && TargetModules.Any(string.IsNullOrEmpty))
            Fail("target_modules", "has an empty module name");
        if (TargetRegex is not null)
        {
            if (TargetRegex.Length > MaxTargetRegexLength)
                Fail("target_modules", $"the regex is {TargetRegex.Length} characters, more than the {MaxTargetRegexLength}-character limit");
            try { _ = new Regex($"^(?:{TargetRegex})$", RegexOptions.CultureInvariant, RegexTimeout); }
            catch (ArgumentException e) { Fail("target_modules", InvalidRegex(e)); }
        }
    }

    private string InvalidRegex(ArgumentException e) =>
        $"'{TargetRegex}' is not a valid regular expression ({e.Message}); give a regex matched against the full module name, " +
        "a list of module names, or \"all-linear\"";

    /// <summary>
    /// Checks the rank against the layers it targets on a model (<see cref="LoraAdapters.TargetedLayers"/>): r must not
    /// exceed min(in, out) of any targeted linear layer. Nothing is allocated.
    /// </summary>
    /// <exception cref="AdapterConfigException">r is larger than a targeted layer allows.</exception>
    public void ValidateFor(IEnumerable<(string Path, long In, long Out)> targetedLayers, string source = "adapter config", string key = "r")
    {
        foreach (var (path, inF, outF) in targetedLayers)
        {
            long max = Math.Min(inF, outF);
            if (R > max)
                throw new AdapterConfigException(source, key,
                    $"expected r <= {max} = min(in, out) of the targeted layer '{path}' ({inF} → {outF}), got {R}; a rank above " +
                    "that adds parameters without adding rank: lower r or target other modules");
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
            ["peft_type"] = PeftType,
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

    /// <summary>
    /// The one LoRA config parser: a PEFT adapter config object, or a training recipe's <c>adapter:</c> section read into
    /// one (<paramref name="dialect"/> <see cref="AdapterConfigDialect.Recipe"/>); <paramref name="source"/> names it in
    /// errors. The recipe differs in two things only, as it always has: <c>target_modules</c> may be left out
    /// (<c>[q_proj, v_proj]</c>), and <c>"all"</c> is a synonym of <c>"all-linear"</c>. (The PEFT-only keys such as
    /// <c>peft_type</c>, <c>use_dora</c> or <c>task_type</c> are not recipe keys, so a recipe never sets them.)
    /// </summary>
    /// <exception cref="AdapterConfigException">A key is mistyped, out of range or names an unsupported option.</exception>
    public static LoraConfig Parse(JsonObject obj, string source, AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson)
    {
        bool recipe = dialect == AdapterConfigDialect.Recipe;
        string peftType = Str(obj, "peft_type", source) ?? PeftType;
        if (peftType != PeftType)
            throw new AdapterConfigException(source, "peft_type", $"is '{InputFiles.Shorten(peftType)}', expected '{PeftType}' for a LoRA adapter");

        void RejectUnless(string key, Func<JsonNode?, bool> isDefault, string what)
        {
            if (obj.TryGetPropertyValue(key, out var n) && !isDefault(n))
                throw new AdapterConfigException(source, key, $"{InputFiles.Shorten(n?.ToJsonString() ?? "null")} is not supported ({what})");
        }
        static bool IsFalse(JsonNode? n) => n is null || (n is JsonValue v && v.TryGetValue(out bool b) && !b);
        static bool IsEmpty(JsonNode? n) => n is null || (n is JsonObject o && o.Count == 0) || (n is JsonArray a && a.Count == 0);
        RejectUnless("use_dora", IsFalse, "DoRA is not implemented; supported: false");
        RejectUnless("fan_in_fan_out", IsFalse, "Llama weights are [out, in]; supported: false");
        RejectUnless("lora_bias", IsFalse, "supported: false");
        RejectUnless("bias", n => n is null || (n is JsonValue v && v.TryGetValue(out string? b) && b == "none"), "supported: \"none\"");
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
                : throw new AdapterConfigException(source, key, $"expected a number, got {InputFiles.Shorten(n.ToJsonString())}");
        }
        bool Flag(string key, bool dflt)
        {
            if (!obj.TryGetPropertyValue(key, out var n) || n is null) return dflt;
            return n is JsonValue v && v.TryGetValue(out bool b) ? b
                : throw new AdapterConfigException(source, key, $"expected true or false, got {InputFiles.Shorten(n.ToJsonString())}");
        }

        double r = Num("r", 8);
        if (r != Math.Floor(r) || r < 1 || r > MaxRank)
            throw new AdapterConfigException(source, "r", $"expected an integer in [1, {MaxRank}], got {n2s(r)}");
        var cfg = new LoraConfig
        {
            R = (int)r,
            LoraAlpha = Num("lora_alpha", 8),
            LoraDropout = Num("lora_dropout", 0),
            UseRsLora = Flag("use_rslora", false),
            BaseModelNameOrPath = Str(obj, "base_model_name_or_path", source),
            TaskType = Str(obj, "task_type", source) ?? "CAUSAL_LM",
            InferenceMode = Flag("inference_mode", true),
        };
        cfg = obj["target_modules"] switch
        {
            JsonValue v when v.TryGetValue(out string? all) && (all == "all-linear" || (recipe && all == "all")) => cfg with { AllLinear = true, TargetModules = null },
            JsonValue v when v.TryGetValue(out string? regex) => cfg with { TargetRegex = regex, TargetModules = null },
            JsonArray a => cfg with
            {
                TargetModules = a.Select(e => e is JsonValue ev && ev.TryGetValue(out string? name) ? name
                    : throw new AdapterConfigException(source, "target_modules", $"entries must be strings, got {InputFiles.Shorten(e?.ToJsonString() ?? "null")}")).ToList(),
            },
            null when recipe => cfg,
            null => throw new AdapterConfigException(source, "target_modules", "is missing; give module names (e.g. [\"q_proj\", \"v_proj\"]), a regex, or \"all-linear\""),
            var other => throw new AdapterConfigException(source, "target_modules",
                $"must be a list, a regex string or \"all-linear\", got {InputFiles.Shorten(other.ToJsonString())}"),
        };
        cfg.Validate(source);
        return cfg;

        static string n2s(double v) => v.ToString(System.Globalization.CultureInfo.InvariantCulture);
    }

    private static string? Str(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n is JsonValue v && v.TryGetValue(out string? s) ? s
            : throw new AdapterConfigException(source, key, $"expected a string, got {InputFiles.Shorten(n.ToJsonString())}");
    }
}
