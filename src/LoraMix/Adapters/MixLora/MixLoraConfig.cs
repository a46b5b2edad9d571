using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Routing;

namespace LoraMix.Adapters.MixLora;

/// <summary>LoRA settings that override the top-level ones for the experts only (MoE-PEFT's <c>expert_lora</c>).</summary>
public sealed record ExpertLoraConfig
{
    public int R { get; init; } = 16;
    public int LoraAlpha { get; init; } = 32;
    public double LoraDropout { get; init; } = 0.05;
    public bool UseRsLora { get; init; }
}

/// <summary>
/// A MoE-PEFT MixLoRA adapter config (<c>adapter_config.json</c> with <c>peft_type: "MIXLORA"</c>), with MoE-PEFT's
/// field names and defaults (research/mixlora.md §1). Experts are LoRAs on the targeted MLP projections of one frozen
/// feed-forward block, chosen per token by a router; targeted attention projections get one plain LoRA.
/// </summary>
/// <remarks>
/// C# defaults for the keys MoE-PEFT requires (<c>r</c>, <c>lora_alpha</c>, <c>lora_dropout</c>, <c>target_modules</c>,
/// <c>routing_strategy</c>, <c>num_experts</c>) are those of MoE-PEFT's <c>templates/mixlora.json</c>; parsing a file
/// requires them as MoE-PEFT does. Strategy-dependent defaults (<c>router_init_range</c>, <c>jitter_noise</c>,
/// <c>router_z_loss_coef</c>) are null here and resolved by the <c>Effective*</c> properties.
/// </remarks>
public sealed record MixLoraConfig
{
    public const string PeftType = "MIXLORA";
    public const string TopKStrategy = "mixlora";
    public const string TopPStrategy = "mixlora-dynamic";
    public const string SwitchStrategy = "mixlora-switch";

    public const string FreePolicy = "free";
    public const string PrivilegedPolicy = "privileged";
    public const string LastSnapshot = "last";
    public const string PooledSnapshot = "pooled";

    /// <summary>LoraMix's router policies (<c>router_policy</c>).</summary>
    public static readonly IReadOnlyList<string> RouterPolicies = [FreePolicy, PrivilegedPolicy];

    /// <summary>Snapshots of the privileged policy (<c>privileged_snapshot</c>).</summary>
    public static readonly IReadOnlyList<string> PrivilegedSnapshots = [LastSnapshot, PooledSnapshot];

    /// <summary>The routing strategies MoE-PEFT's MixLoRA offers.</summary>
    public static readonly IReadOnlyList<string> RoutingStrategies = [TopKStrategy, TopPStrategy, SwitchStrategy];

    /// <summary>Targetable Llama projections in MoE-PEFT's order (the order <c>target_modules</c> is written in).</summary>
    public static readonly IReadOnlyList<string> LlamaTargetOrder = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"];

    /// <summary>MLP projections in MoE-PEFT's state-dict order (gate, down, up): the order expert keys are written in.</summary>
    public static readonly IReadOnlyList<string> ExpertProjectionOrder = ["gate_proj", "down_proj", "up_proj"];

    /// <summary>Activation functions the experts support.</summary>
    public static readonly IReadOnlyList<string> ActivationFunctions = ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu"];

    // MoE-PEFT target names that exist for other architectures only.
    private static readonly string[] OtherArchitectureTargets = ["dense", "fc1", "fc2", "qkv_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h"];
    private static readonly Dictionary<string, string> LegacyProjectionNames = new()
    {
        ["w1_proj"] = "gate_proj", ["w2_proj"] = "down_proj", ["w3_proj"] = "up_proj",
    };

    // --- LoRA (attention, and experts unless ExpertLora is set) ---
    public int R { get; init; } = 16;
    public int LoraAlpha { get; init; } = 32;
    public double LoraDropout { get; init; } = 0.05;
    public IReadOnlyList<string> TargetModules { get; init; } = LlamaTargetOrder;
    public bool UseRsLora { get; init; }
    /// <summary><c>original</c> (A kaiming-uniform, B zero) or <c>gaussian</c> (A ~ N(0, 1/r), B zero).</summary>
    public string LoraInit { get; init; } = "original";
    /// <summary>Optional LoRA settings for the experts only.</summary>
    public ExpertLoraConfig? ExpertLora { get; init; }

    // --- router ---
    public string RoutingStrategy { get; init; } = TopKStrategy;
    public int NumExperts { get; init; } = 8;
    public int TopK { get; init; } = 2;
    public double TopP { get; init; } = 0.8;
    public double Temperature { get; init; }
    public double RouterAuxLossCoef { get; init; } = 0.001;
    public bool RouterLoss { get; init; } = true;
    /// <summary>z-loss coefficient; null = 0.001 for switch and no z-loss otherwise (MoE-PEFT reads it for switch only;
    /// an explicit value enables it for the other strategies too).</summary>
    public double? RouterZLossCoef { get; init; }
    /// <summary>σ of the router's N(0, σ) init; null = 0.02 (switch: 1.0).</summary>
    public double? RouterInitRange { get; init; }
    /// <summary>Multiplicative U(1−ε, 1+ε) jitter on the block input, training only; null = 0 (switch: 0.01).</summary>
    public double? JitterNoise { get; init; }
    /// <summary>Expert activation; null = the base model's <c>hidden_act</c>.</summary>
    public string? ActFn { get; init; }
    public int ExpertCapacity { get; init; } = 32;
    public double FfnDropout { get; init; }
    /// <summary>Parsed and written for switch, unused (as in MoE-PEFT).</summary>
    public int? SparseStep { get; init; }

    // --- LoraMix's hardened routing (written to adapter_config.json only when not the default) ---
    /// <summary><c>router_policy</c>: <c>free</c> (MixLoRA as published) or <c>privileged</c> (routing frozen from the
    /// first untrusted token, see <see cref="PrivilegedRouterPolicy"/>).</summary>
    public string RouterPolicy { get; init; } = FreePolicy;
    /// <summary><c>privileged_snapshot</c> (privileged policy only): <c>last</c> (the last privileged token's decision) or
    /// <c>pooled</c> (the strategy on the mean distribution of the privileged tokens).</summary>
    public string PrivilegedSnapshot { get; init; } = LastSnapshot;
    /// <summary><c>privilege_embedding</c>: also learn an ISE-style <see cref="Modeling.PrivilegeEmbedding"/> (one vector per
    /// privilege level added to the token embeddings), saved with the adapter as <c>mixlora.privilege_embedding.weight</c>
    /// <c>[4, hidden]</c>. Needs privilege labels on every forward step. Independent of <see cref="RouterPolicy"/>.</summary>
    public bool PrivilegeEmbedding { get; init; }

    public string? BaseModelNameOrPath { get; init; }
    public string TaskType { get; init; } = "CAUSAL_LM";

    public double EffectiveRouterInitRange => RouterInitRange ?? (RoutingStrategy == SwitchStrategy ? 1.0 : 0.02);
    public double EffectiveJitterNoise => JitterNoise ?? (RoutingStrategy == SwitchStrategy ? 0.01 : 0.0);
    public double EffectiveRouterZLossCoef => RouterZLossCoef ?? (RoutingStrategy == SwitchStrategy ? 0.001 : 0.0);
    public string EffectiveActFn => ActFn ?? "silu";

    public int ExpertR => ExpertLora?.R ?? R;
    public int ExpertAlpha => ExpertLora?.LoraAlpha ?? LoraAlpha;
    public double ExpertDropout => ExpertLora?.LoraDropout ?? LoraDropout;
    public bool ExpertUseRsLora => ExpertLora?.UseRsLora ?? UseRsLora;

    /// <summary>Targeted attention projections (q, k, v, o order): one plain LoRA each.</summary>
    public IReadOnlyList<string> AttentionTargets => LlamaTargetOrder.Take(4).Where(TargetModules.Contains).ToList();

    /// <summary>Targeted MLP projections (gate, down, up order): one LoRA per expert each.</summary>
    public IReadOnlyList<string> ExpertTargets => ExpertProjectionOrder.Where(TargetModules.Contains).ToList();

    /// <summary>The routing strategy object for <see cref="RoutingStrategy"/>.</summary>
    public IRoutingStrategy CreateStrategy() => RoutingStrategy switch
    {
        TopKStrategy => new TopKRouting(NumExperts, TopK),
        TopPStrategy => new TopPRouting(NumExperts, TopP, Temperature),
        _ => new SwitchRouting(NumExperts, ExpertCapacity),
    };

    /// <summary>The router policy object for <see cref="RouterPolicy"/> and <see cref="PrivilegedSnapshot"/>.</summary>
    public IRouterPolicy CreatePolicy() => RouterPolicy == PrivilegedPolicy
        ? PrivilegedSnapshot == PooledSnapshot ? PrivilegedRouterPolicy.Pooled : PrivilegedRouterPolicy.Last
        : FreeRouterPolicy.Instance;

    /// <summary>The plain-LoRA config of the attention projections, or null when none is targeted.</summary>
    public LoraConfig? AttentionLoraConfig() => AttentionTargets.Count == 0 ? null : new LoraConfig
    {
        R = R, LoraAlpha = LoraAlpha, LoraDropout = LoraDropout, UseRsLora = UseRsLora, TargetModules = AttentionTargets,
        BaseModelNameOrPath = BaseModelNameOrPath, TaskType = TaskType,
    };

    /// <summary>Largest <c>num_experts</c> accepted: 1,024 (MoE-PEFT's MixLoRA uses 8 to 64; the largest released MoE
    /// models have 256 routed experts).</summary>
    public const int MaxExperts = 1024;

    /// <summary>Checks every field and combination, including the bounds (<see cref="LoraConfig.MaxRank"/> for <c>r</c>,
    /// <see cref="LoraConfig.MaxLoraAlpha"/> for <c>lora_alpha</c>, <see cref="MaxExperts"/>, finite coefficients); throws
    /// <see cref="AdapterConfigException"/> naming the key, what is accepted and what was found.</summary>
    public void Validate(string source = "adapter config")
    {
        void Fail(string key, string reason) => throw new AdapterConfigException(source, key, reason);
        static bool Prob(double p) => p >= 0 && p < 1;
        static bool NonNegative(double v) => v >= 0 && double.IsFinite(v);
        const int maxAlpha = (int)LoraConfig.MaxLoraAlpha;

        if (R < 1 || R > LoraConfig.MaxRank) Fail("r", $"expected an integer in [1, {LoraConfig.MaxRank}], got {R}");
        if (LoraAlpha < 1 || LoraAlpha > maxAlpha) Fail("lora_alpha", $"expected an integer in [1, {maxAlpha}], got {LoraAlpha}");
        if (!Prob(LoraDropout)) Fail("lora_dropout", $"must be in [0, 1), got {LoraDropout}");
        if (TargetModules is null || TargetModules.Count == 0)
            Fail("target_modules", $"is empty; give some of {string.Join(", ", LlamaTargetOrder)}");
        foreach (var t in TargetModules!)
            if (!LlamaTargetOrder.Contains(t))
                Fail("target_modules", OtherArchitectureTargets.Contains(t)
                    ? $"'{t}' is a projection of another architecture, not of a Llama-family model; use {string.Join(", ", LlamaTargetOrder)}"
                    : $"unknown module '{t}'; use {string.Join(", ", LlamaTargetOrder)}");
        if (TargetModules!.Distinct().Count() != TargetModules!.Count) Fail("target_modules", "lists a module twice");
        if (LoraInit is not ("original" or "gaussian")) Fail("lora_init", $"'{LoraInit}' is not supported; use \"original\" or \"gaussian\"");
        if (ExpertLora is { } x)
        {
            if (x.R < 1 || x.R > LoraConfig.MaxRank) Fail("expert_lora.r", $"expected an integer in [1, {LoraConfig.MaxRank}], got {x.R}");
            if (x.LoraAlpha < 1 || x.LoraAlpha > maxAlpha) Fail("expert_lora.lora_alpha", $"expected an integer in [1, {maxAlpha}], got {x.LoraAlpha}");
            if (!Prob(x.LoraDropout)) Fail("expert_lora.lora_dropout", $"must be in [0, 1), got {x.LoraDropout}");
            if (ExpertTargets.Count == 0)
                Fail("expert_lora", "is set but target_modules names no MLP projection (gate_proj, down_proj, up_proj), so there is no expert LoRA to configure");
        }
        if (!RoutingStrategies.Contains(RoutingStrategy))
            Fail("routing_strategy", $"'{RoutingStrategy}' is not supported; use one of {string.Join(", ", RoutingStrategies)}");
        if (NumExperts < 1 || NumExperts > MaxExperts) Fail("num_experts", $"expected an integer in [1, {MaxExperts}], got {NumExperts}");
        if (RoutingStrategy == TopKStrategy && (TopK < 1 || TopK > NumExperts))
            Fail("top_k", $"must be in [1, num_experts = {NumExperts}], got {TopK}");
        if (RoutingStrategy == TopPStrategy && !(TopP > 0 && TopP <= 1)) Fail("top_p", $"must be in (0, 1], got {TopP}");
        if (!NonNegative(Temperature)) Fail("temperature", $"must be a finite number >= 0, got {Temperature}");
        if (!NonNegative(RouterAuxLossCoef)) Fail("router_aux_loss_coef", $"must be a finite number >= 0, got {RouterAuxLossCoef}");
        if (RouterZLossCoef is { } z && !NonNegative(z)) Fail("router_z_loss_coef", $"must be a finite number >= 0, got {z}");
        if (RouterInitRange is { } ir && !NonNegative(ir)) Fail("router_init_range", $"must be a finite number >= 0, got {ir}");
        if (JitterNoise is { } j && !Prob(j)) Fail("jitter_noise", $"must be in [0, 1), got {j}");
        if (ActFn is not null && !ActivationFunctions.Contains(ActFn))
            Fail("act_fn", $"'{ActFn}' is not supported; use one of {string.Join(", ", ActivationFunctions)}");
        if (ExpertCapacity < 1) Fail("expert_capacity", $"must be a positive integer, got {ExpertCapacity}");
        if (!Prob(FfnDropout)) Fail("ffn_dropout", $"must be in [0, 1), got {FfnDropout}");
        if (SparseStep is { } s && s < 1) Fail("sparse_step", $"must be null or a positive integer, got {s}");
        if (!RouterPolicies.Contains(RouterPolicy))
            Fail("router_policy", $"'{RouterPolicy}' is not supported; use one of {string.Join(", ", RouterPolicies)}");
        if (!PrivilegedSnapshots.Contains(PrivilegedSnapshot))
            Fail("privileged_snapshot", $"'{PrivilegedSnapshot}' is not supported; use one of {string.Join(", ", PrivilegedSnapshots)}");
        if (RouterPolicy != PrivilegedPolicy && PrivilegedSnapshot != LastSnapshot)
            Fail("privileged_snapshot", $"applies to router_policy \"{PrivilegedPolicy}\" only, but router_policy is \"{RouterPolicy}\"");
        if (string.IsNullOrEmpty(TaskType)) Fail("task_type", "must not be empty");
    }

    // ------------------------------------------------------------------ JSON

    /// <summary>
    /// <c>adapter_config.json</c> exactly as MoE-PEFT writes it (<c>MixLoraConfig.export()</c> plus
    /// <c>base_model_name_or_path</c> and <c>task_type</c>, <c>json.dump(indent=4)</c>): only the keys MoE-PEFT exports,
    /// in its order, floats written as Python does (<c>0.0</c>, <c>1e-05</c>). LoraMix's own keys (<c>router_policy</c>,
    /// <c>privileged_snapshot</c>, <c>privilege_embedding</c>) follow the routing keys only when they differ from the default (MoE-PEFT ignores them).
    /// </summary>
    public string ToJson()
    {
        Validate();
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true, IndentSize = 4 }))
        {
            w.WriteStartObject();
            WriteLora(w, R, LoraAlpha, LoraDropout, UseRsLora, withTargets: true);
            if (ExpertLora is { } x)
            {
                w.WritePropertyName("expert_lora");
                w.WriteStartObject();
                WriteLora(w, x.R, x.LoraAlpha, x.LoraDropout, x.UseRsLora, withTargets: false);
                w.WriteEndObject();
            }
            w.WriteString("routing_strategy", RoutingStrategy);
            w.WriteNumber("num_experts", NumExperts);
            w.WriteString("act_fn", EffectiveActFn);
            switch (RoutingStrategy)
            {
                case TopKStrategy:
                    w.WriteNumber("top_k", TopK);
                    break;
                case TopPStrategy:
                    w.WritePropertyName("top_p");
                    w.WriteRawValue(PythonFloat(TopP));
                    w.WritePropertyName("temperature");
                    w.WriteRawValue(PythonFloat(Temperature));
                    break;
                default:
                    w.WriteNumber("expert_capacity", ExpertCapacity);
                    if (SparseStep is { } s) w.WriteNumber("sparse_step", s);
                    else w.WriteNull("sparse_step");
                    break;
            }
            if (RouterPolicy != FreePolicy) w.WriteString("router_policy", RouterPolicy);
            if (PrivilegedSnapshot != LastSnapshot) w.WriteString("privileged_snapshot", PrivilegedSnapshot);
            if (PrivilegeEmbedding) w.WriteBoolean("privilege_embedding", true);
            if (BaseModelNameOrPath is null) w.WriteNull("base_model_name_or_path");
            else w.WriteString("base_model_name_or_path", BaseModelNameOrPath);
            w.WriteString("task_type", TaskType);
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(buffer.ToArray());

        void WriteLora(Utf8JsonWriter w, int r, int alpha, double dropout, bool rs, bool withTargets)
        {
            // MoE-PEFT's LoraConfig.export(): use_dora/use_rslora first and only when true; the expert block drops
            // peft_type and target_modules.
            if (rs) w.WriteBoolean("use_rslora", true);
            w.WriteString("bias", "none");
            if (withTargets) w.WriteString("peft_type", PeftType);
            w.WriteNumber("r", r);
            w.WriteNumber("lora_alpha", alpha);
            w.WritePropertyName("lora_dropout");
            w.WriteRawValue(PythonFloat(dropout));
            if (withTargets)
            {
                w.WriteStartArray("target_modules");
                foreach (var t in LlamaTargetOrder.Where(TargetModules.Contains)) w.WriteStringValue(t);
                w.WriteEndArray();
            }
        }
    }

    /// <summary>A double as Python's <c>repr(float)</c> writes it (shortest round trip, <c>.0</c> for integers).</summary>
    internal static string PythonFloat(double v)
    {
        if (double.IsNaN(v) || double.IsInfinity(v)) throw new ArgumentOutOfRangeException(nameof(v), v, "not representable in JSON");
        string s = v.ToString("R", CultureInfo.InvariantCulture);
        int e = s.IndexOf('E');
        if (e >= 0)
        {
            string mant = s[..e], exp = s[(e + 1)..];
            string sign = exp.StartsWith('-') ? "-" : "+";
            exp = exp.TrimStart('+', '-').PadLeft(2, '0');
            return $"{mant}e{sign}{exp}";
        }
        // Python switches to exponent notation from 1e16 and below 1e-4; .NET "R" already does below 1e-4 (E-05).
        return s.Contains('.') ? s : s + ".0";
    }

    /// <summary>Reads a MixLoRA <c>adapter_config.json</c>.</summary>
    public static MixLoraConfig Load(string path)
    {
        var obj = AdapterFiles.ReadConfigObject(path, "MixLoRA");
        return Parse(obj, path);
    }

    /// <summary>
    /// The one MixLoRA config parser: MoE-PEFT's adapter keys (an <c>adapter_config.json</c> or an adapter entry of a
    /// MoE-PEFT training config), or a training recipe's <c>adapter:</c> section read into an object
    /// (<paramref name="dialect"/> <see cref="AdapterConfigDialect.Recipe"/>). Keys MoE-PEFT ignores are ignored (a
    /// recipe never passes them: it rejects unknown keys itself).
    /// </summary>
    /// <remarks>
    /// The two sources differ where they always have. A file must give the keys MoE-PEFT requires (<c>r</c>,
    /// <c>lora_alpha</c>, <c>lora_dropout</c>, <c>target_modules</c>, <c>routing_strategy</c>, <c>num_experts</c>), may use
    /// the legacy m-LoRA names (<c>mixtral</c>/<c>switch</c>, <c>w1_proj</c>/<c>w2_proj</c>/<c>w3_proj</c>) and the
    /// <c>{name: bool}</c> form of <c>target_modules</c>, fills missing <c>expert_lora</c> keys from the top level (as
    /// MoE-PEFT does), and may not give a strategy-specific key for another strategy. A recipe takes the C# defaults for
    /// missing keys (<c>expert_lora</c>'s from <see cref="ExpertLoraConfig"/>), takes <c>"all-linear"</c> (or <c>"all"</c>)
    /// as every projection, and does not check strategy-specific keys against the strategy.
    /// </remarks>
    public static MixLoraConfig Parse(JsonObject obj, string source = "adapter config", AdapterConfigDialect dialect = AdapterConfigDialect.AdapterConfigJson)
    {
        void Fail(string key, string reason) => throw new AdapterConfigException(source, key, reason);
        bool recipe = dialect == AdapterConfigDialect.Recipe;
        var defaults = new MixLoraConfig();
        // a key MoE-PEFT requires: a recipe takes the C# default
        int TopInt(string key, int recipeDefault) => recipe ? Int(obj, key, source) ?? recipeDefault : RequiredInt(obj, key, source);

        if (obj["peft_type"] is JsonNode pt && pt.GetValueKind() == JsonValueKind.String && pt.GetValue<string>() != PeftType)
            Fail("peft_type", $"is '{pt.GetValue<string>()}', expected '{PeftType}' for a MixLoRA adapter");

        string strategy = Str(obj, "routing_strategy", source)
            ?? (recipe ? defaults.RoutingStrategy : throw new AdapterConfigException(source, "routing_strategy", $"is missing; use one of {string.Join(", ", RoutingStrategies)}"));
        if (!recipe) strategy = strategy switch { "mixtral" => TopKStrategy, "switch" => SwitchStrategy, _ => strategy };

        if (obj["use_dora"] is JsonNode dora && Bool(dora, "use_dora", source))
            Fail("use_dora", "DoRA (MixDoRA) is not implemented; supported: false");
        if (Str(obj, "bias", source) is { } bias && bias != "none") Fail("bias", $"'{bias}' is not supported; supported: \"none\"");

        var targets = new List<string>();
        switch (obj["target_modules"])
        {
            case JsonArray a:
                foreach (var n in a) targets.Add(n is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : throw new AdapterConfigException(source, "target_modules", $"entries must be strings, got {n?.ToJsonString() ?? "null"}"));
                break;
            case JsonObject d when !recipe:
                foreach (var (k, v) in d) if (v is not null && Bool(v, $"target_modules.{k}", source)) targets.Add(k);
                break;
            case JsonValue v when recipe:
                string t = v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : v.ToJsonString();
                if (t is not ("all-linear" or "all")) Fail("target_modules", $"expected a list of projections or \"all-linear\", got '{t}'");
                targets.AddRange(LlamaTargetOrder);
                break;
            case null when recipe:
                targets.AddRange(defaults.TargetModules);
                break;
            case null:
                Fail("target_modules", "is missing");
                break;
            default:
                Fail("target_modules", "must be a list of module names or an object name → bool");
                break;
        }
        if (!recipe) targets = targets.Select(t => LegacyProjectionNames.GetValueOrDefault(t, t)).ToList();

        // strategy-specific keys given for another strategy are a mistake, not something to ignore silently
        void OnlyFor(string key, string forStrategy)
        {
            if (!recipe && obj.ContainsKey(key) && strategy != forStrategy && RoutingStrategies.Contains(strategy))
                Fail(key, $"applies to routing_strategy \"{forStrategy}\" only, but routing_strategy is \"{strategy}\"");
        }
        OnlyFor("top_k", TopKStrategy);
        OnlyFor("top_p", TopPStrategy);
        OnlyFor("temperature", TopPStrategy);
        OnlyFor("expert_capacity", SwitchStrategy);
        OnlyFor("ffn_dropout", SwitchStrategy);
        if (obj["sparse_step"] is not null) OnlyFor("sparse_step", SwitchStrategy);
        CheckOwnKeys(obj, source);
        string policy = Str(obj, "router_policy", source) ?? FreePolicy;

        ExpertLoraConfig? expert = null;
        if (obj["expert_lora"] is JsonNode en)
        {
            if (en is not JsonObject eo) throw new AdapterConfigException(source, "expert_lora", "must be an object {r, lora_alpha, lora_dropout}");
            if (eo["use_dora"] is JsonNode ed && Bool(ed, "expert_lora.use_dora", source))
                Fail("expert_lora.use_dora", "DoRA (MixDoRA) is not implemented; supported: false");
            if (Str(eo, "bias", source) is { } eb && eb != "none") Fail("expert_lora.bias", $"'{eb}' is not supported; supported: \"none\"");
            // MoE-PEFT: a copy of the top-level config updated with the block; a recipe: ExpertLoraConfig's defaults
            var xd = new ExpertLoraConfig();
            expert = recipe ? new ExpertLoraConfig
            {
                R = Int(eo, "r", source, "expert_lora.") ?? xd.R,
                LoraAlpha = Int(eo, "lora_alpha", source, "expert_lora.") ?? xd.LoraAlpha,
                LoraDropout = Num(eo, "lora_dropout", source, "expert_lora.") ?? xd.LoraDropout,
                UseRsLora = eo["use_rslora"] is JsonNode xrs ? Bool(xrs, "expert_lora.use_rslora", source) : xd.UseRsLora,
            } : new ExpertLoraConfig
            {
                R = Int(eo, "r", source, "expert_lora.") ?? RequiredInt(obj, "r", source),
                LoraAlpha = Int(eo, "lora_alpha", source, "expert_lora.") ?? RequiredInt(obj, "lora_alpha", source),
                LoraDropout = Num(eo, "lora_dropout", source, "expert_lora.") ?? Num(obj, "lora_dropout", source) ?? throw new AdapterConfigException(source, "lora_dropout", "is missing"),
                UseRsLora = eo["use_rslora"] is JsonNode ers ? Bool(ers, "expert_lora.use_rslora", source) : obj["use_rslora"] is JsonNode trs && Bool(trs, "use_rslora", source),
            };
        }

        var cfg = new MixLoraConfig
        {
            R = TopInt("r", defaults.R),
            LoraAlpha = TopInt("lora_alpha", defaults.LoraAlpha),
            LoraDropout = Num(obj, "lora_dropout", source) ?? (recipe ? defaults.LoraDropout : throw new AdapterConfigException(source, "lora_dropout", "is missing")),
            TargetModules = targets,
            UseRsLora = obj["use_rslora"] is JsonNode rs && Bool(rs, "use_rslora", source),
            LoraInit = Str(obj, "lora_init", source) ?? "original",
            ExpertLora = expert,
            RoutingStrategy = strategy,
            NumExperts = TopInt("num_experts", defaults.NumExperts),
            TopK = Int(obj, "top_k", source) ?? 2,
            TopP = Num(obj, "top_p", source) ?? 0.8,
            Temperature = Num(obj, "temperature", source) ?? 0.0,
            RouterAuxLossCoef = Num(obj, "router_aux_loss_coef", source) ?? 0.001,
            RouterLoss = obj["router_loss"] is not JsonNode rl || Bool(rl, "router_loss", source),
            RouterZLossCoef = Num(obj, "router_z_loss_coef", source),
            RouterInitRange = Num(obj, "router_init_range", source),
            JitterNoise = Num(obj, "jitter_noise", source),
            ActFn = Str(obj, "act_fn", source),
            ExpertCapacity = Int(obj, "expert_capacity", source) ?? 32,
            FfnDropout = Num(obj, "ffn_dropout", source) ?? 0.0,
            SparseStep = Int(obj, "sparse_step", source),
            RouterPolicy = policy,
            PrivilegedSnapshot = Str(obj, "privileged_snapshot", source) ?? LastSnapshot,
            PrivilegeEmbedding = obj["privilege_embedding"] is JsonNode pe && Bool(pe, "privilege_embedding", source),
            BaseModelNameOrPath = Str(obj, "base_model_name_or_path", source),
            TaskType = Str(obj, "task_type", source) ?? "CAUSAL_LM",
        };
        cfg.Validate(source);
        return cfg;
    }

    /// <summary>LoraMix's own keys (MoE-PEFT has none of them). The routing guarantee depends on them, so they are
    /// never read loosely: an explicit <c>null</c> is an error (it would otherwise load as the default, <c>free</c>), and
    /// so is any other key that looks like one of them (<c>router-policy</c>, <c>routerPolicy</c>, <c>router_polcy</c>,
    /// <c>Router_Policy</c>), which would otherwise be ignored as an unknown key.</summary>
    public static IReadOnlyList<string> OwnKeys { get; } = ["router_policy", "privileged_snapshot", "privilege_embedding"];

    private static void CheckOwnKeys(JsonObject obj, string source)
    {
        foreach (var (key, value) in obj)
        {
            if (OwnKeys.Contains(key))
            {
                if (value is null)
                    throw new AdapterConfigException(source, key, key == "privilege_embedding"
                        ? "is null; write true or false (or leave the key out for false)"
                        : $"is null; write one of {string.Join(", ", key == "router_policy" ? RouterPolicies : PrivilegedSnapshots)} (or leave the key out for the default)");
                continue;
            }
            if (LooksLikeOwnKey(key) is { } meant)
                throw new AdapterConfigException(source, key, $"is not a key LoraMix reads; did you mean \"{meant}\"? (a misspelt router key would silently route freely)");
        }
    }

    /// <summary>The own key that <paramref name="key"/> looks like (comparing letters and digits only, ignoring case: equal,
    /// at most two edits apart, or containing all of it but its last two letters), or null.</summary>
    internal static string? LooksLikeOwnKey(string key)
    {
                string n = ConfigKeyMatch.Normalize(key);
        foreach (var own in OwnKeys)
        {
            string o = ConfigKeyMatch.Normalize(own);
            if (n == o || ConfigKeyMatch.Levenshtein(n, o) <= 2 || n.Contains(o[..^2], StringComparison.Ordinal)) return own;
        }
        return null;
    }


    private static string? Str(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        return n.GetValueKind() == JsonValueKind.String ? n.GetValue<string>()
            : throw new AdapterConfigException(source, key, $"must be a string, got {n.ToJsonString()}");
    }

    private static bool Bool(JsonNode n, string key, string source) => n.GetValueKind() switch
    {
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        _ => throw new AdapterConfigException(source, key, $"must be true or false, got {n.ToJsonString()}"),
    };

    private static double? Num(JsonObject o, string key, string source, string prefix = "")
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        if (n.GetValueKind() != JsonValueKind.Number) throw new AdapterConfigException(source, prefix + key, $"must be a number, got {n.ToJsonString()}");
        return double.Parse(n.ToJsonString(), CultureInfo.InvariantCulture);
    }

    private static int? Int(JsonObject o, string key, string source, string prefix = "")
    {
        var v = Num(o, key, source, prefix);
        if (v is null) return null;
        if (v != Math.Floor(v.Value) || Math.Abs(v.Value) > int.MaxValue)
            throw new AdapterConfigException(source, prefix + key, $"must be an integer (MoE-PEFT requires one), got {v}");
        return (int)v.Value;
    }

    private static int RequiredInt(JsonObject o, string key, string source) =>
        Int(o, key, source) ?? throw new AdapterConfigException(source, key, "is missing (MoE-PEFT requires it)");
}
