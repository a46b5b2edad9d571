using System.Text.RegularExpressions;
using LoraMix.Adapters.Lora;
using LoraMix.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraMix.Adapters.MixLora;

/// <summary>
/// Attaches, activates, trains, saves and loads MoE-PEFT-compatible MixLoRA adapters on a <see cref="LlamaForCausalLM"/>,
/// parallel to <see cref="LoraAdapters"/> (whose machinery carries the attention LoRAs). Files: <c>adapter_config.json</c>
/// as MoE-PEFT writes it, and the same fp32 tensors as <c>adapter_model.bin</c> (torch zip pickle) and/or
/// <c>adapter_model.safetensors</c>, with MoE-PEFT's keys (research/mixlora.md §2):
/// <c>mixlora.layers.{L}.mlp.moe_gate.weight</c> [E, hidden],
/// <c>mixlora.layers.{L}.self_attn.{proj}.lora_A|lora_B.weight</c>,
/// <c>mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_A|lora_B.weight</c>.
/// </summary>
public static class MixLoraAdapters
{
    public const string ConfigFileName = "adapter_config.json";
    public const string SafetensorsFileName = "adapter_model.safetensors";
    public const string BinFileName = "adapter_model.bin";
    private const string Prefix = "mixlora.layers.";

    /// <summary>The key of the learned privilege embedding <c>[4, hidden]</c> (LoraMix's; present only with
    /// <c>privilege_embedding: true</c>; written after every layer's tensors).</summary>
    public const string PrivilegeEmbeddingKey = "mixlora.privilege_embedding.weight";

    /// <summary>The MixLoRA feed-forward blocks, by layer (empty before the first <see cref="Attach"/>).</summary>
    public static IReadOnlyList<MixLoraFeedForward> Blocks(LlamaForCausalLM model) =>
        model.Model.Layers.Select(l => l.FeedForward).OfType<MixLoraFeedForward>().ToList();

    /// <summary>Names of the attached MixLoRA adapters.</summary>
    public static IReadOnlyList<string> AdapterNames(LlamaForCausalLM model) =>
        Blocks(model).SelectMany(b => b.AdapterNames).Distinct().ToList();

    /// <summary>
    /// Adds a MixLoRA adapter: a router and <c>num_experts</c> expert LoRAs in every layer's feed-forward block, plain LoRA
    /// on the targeted attention projections, all under <paramref name="adapterName"/>. Select it per forward call
    /// (<c>adapters: AdapterSelection.Of(name)</c>).
    /// Returns the config with <c>act_fn</c> resolved to the base model's activation when it was unset.
    /// </summary>
    /// <exception cref="AdapterConfigException">The config is invalid, or a rank exceeds min(in, out) of a targeted projection.</exception>
    public static MixLoraConfig Attach(LlamaForCausalLM model, MixLoraConfig config, string adapterName = "default", long seed = 0)
    {
        config.Validate();
        ValidateFor(model, config);
        AdapterChoice.CheckName(adapterName);
        if (model.Adapters.ContainsKey(adapterName) || AdapterNames(model).Contains(adapterName) || LoraAdapters.AdapterNames(model).Contains(adapterName))
            throw new ArgumentException($"an adapter named '{adapterName}' is already attached");
        config = config with { ActFn = config.ActFn ?? "silu" };   // LlamaConfig accepts hidden_act = silu only
        if (config.AttentionLoraConfig() is { } attention) LoraAdapters.Attach(model, attention, adapterName, seed);
        try
        {
            using var gen = new Generator((ulong)seed ^ 0x6D69786C6F7261UL, CPU);
            var layers = model.Model.Layers;
            for (int i = 0; i < layers.Count; i++)
            {
                var block = layers[i].FeedForward switch
                {
                    MixLoraFeedForward existing => existing,
                    LlamaMlp dense => new MixLoraFeedForward(dense, model.Config, i),
                    var other => throw new LoraMixException($"cannot attach MixLoRA to layer {i}: its feed-forward slot holds a {other.GetType().Name}"),
                };
                if (!ReferenceEquals(block, layers[i].FeedForward)) layers[i].SetFeedForward(block);
                block.AddAdapter(adapterName, config, gen);
            }
            if (config.PrivilegeEmbedding) model.Model.EmbedTokens.AddPrivilegeEmbedding(adapterName);
        }
        catch
        {
            Remove(model, adapterName);
            throw;
        }
        model.RegisterAdapter(adapterName, MethodName);
        return config;
    }

    /// <summary>
    /// Checks the ranks against the projections they adapt on <paramref name="model"/> (nothing is allocated): <c>r</c>
    /// at most min(in, out) of every targeted attention projection, and the experts' rank (<c>expert_lora.r</c>, else
    /// <c>r</c>) at most min(hidden_size, intermediate_size).
    /// </summary>
    /// <exception cref="AdapterConfigException">A rank is too large for this model.</exception>
    public static void ValidateFor(LlamaForCausalLM model, MixLoraConfig config, string source = "adapter config")
    {
        if (config.AttentionLoraConfig() is { } attention)
            attention.ValidateFor(LoraAdapters.TargetedLayers(model, attention), source);
        var c = model.Config;
        if (config.ExpertTargets.Count > 0)
        {
            long max = Math.Min(c.HiddenSize, c.IntermediateSize);
            if (config.ExpertR > max)
                throw new AdapterConfigException(source, config.ExpertLora is not null ? "expert_lora.r" : "r",
                    $"expected the experts' rank <= {max} = min(hidden_size {c.HiddenSize}, intermediate_size {c.IntermediateSize}) of the " +
                    $"MLP projections it adapts, got {config.ExpertR}; a rank above that adds parameters without adding rank");
        }
    }

    /// <summary>The state-dict layout (MoE-PEFT keys and shapes, in <see cref="StateDict"/> order) an adapter of
    /// <paramref name="config"/> has on <paramref name="model"/>, computed without attaching it.</summary>
    public static IReadOnlyList<(string Name, long[] Shape)> ExpectedLayout(LlamaForCausalLM model, MixLoraConfig config)
    {
        var c = model.Config;
        var attention = config.AttentionLoraConfig();
        var attentionLayers = attention is null ? [] : LoraAdapters.TargetedLayers(model, attention)
            .ToDictionary(l => l.Path, l => (l.In, l.Out), StringComparer.Ordinal);
        var list = new List<(string, long[])>();
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"{Prefix}{i}.";
            list.Add((p + "mlp.moe_gate.weight", [config.NumExperts, c.HiddenSize]));
            foreach (var name in LlamaAttention.ProjectionNames)
                if (attentionLayers.TryGetValue($"model.layers.{i}.self_attn.{name}", out var io))
                {
                    list.Add(($"{p}self_attn.{name}.lora_A.weight", [config.R, io.In]));
                    list.Add(($"{p}self_attn.{name}.lora_B.weight", [io.Out, config.R]));
                }
            foreach (var proj in MixLoraConfig.ExpertProjectionOrder)
            {
                if (!config.ExpertTargets.Contains(proj)) continue;
                long inF = proj == "down_proj" ? c.IntermediateSize : c.HiddenSize;
                long outF = proj == "down_proj" ? c.HiddenSize : c.IntermediateSize;
                for (int e = 0; e < config.NumExperts; e++)
                {
                    list.Add(($"{p}mlp.{proj}.experts.{e}.lora_A.weight", [config.ExpertR, inF]));
                    list.Add(($"{p}mlp.{proj}.experts.{e}.lora_B.weight", [outF, config.ExpertR]));
                }
            }
        }
        if (config.PrivilegeEmbedding) list.Add((PrivilegeEmbeddingKey, [PrivilegeEmbedding.Levels, c.HiddenSize]));
        return list;
    }

    /// <summary>The method name models record for MixLoRA adapters (<see cref="LlamaForCausalLM.Adapters"/>).</summary>
    public const string MethodName = "mixlora";

    /// <summary>Sets how every MixLoRA block of the model dispatches tokens to experts (<see cref="MixLoraDispatch.Sparse"/>
    /// by default; <see cref="MixLoraDispatch.Dense"/> for comparison). Not saved with the adapter; blocks created by a
    /// later <see cref="Attach"/> start sparse.</summary>
    public static void SetDispatch(LlamaForCausalLM model, MixLoraDispatch dispatch)
    {
        var blocks = Blocks(model);
        if (blocks.Count == 0) throw new ArgumentException("no MixLoRA adapter is attached");
        foreach (var b in blocks) b.Dispatch = dispatch;
    }

    /// <summary>Freezes every parameter, then unfreezes and returns the adapter's: routers, expert A/B, attention A/B.</summary>
    public static IReadOnlyList<Parameter> PrepareForTraining(LlamaForCausalLM model, string adapterName = "default")
    {
        var trainable = AdapterParameters(model, adapterName);
        AdapterFiles.FreezeAll(model);
        foreach (var p in trainable) p.requires_grad = true;
        return trainable;
    }

    /// <summary>The adapter's parameters in file order (see <see cref="StateDict"/>).</summary>
    public static IReadOnlyList<Parameter> AdapterParameters(LlamaForCausalLM model, string adapterName = "default") =>
        Entries(model, adapterName).Select(e => e.Tensor).ToList();

    /// <summary>Number of trainable scalars of the adapter.</summary>
    public static long ParameterCount(LlamaForCausalLM model, string adapterName = "default") =>
        AdapterParameters(model, adapterName).Sum(p => p.numel());

    /// <summary>The adapter's tensors under MoE-PEFT's key names, in MoE-PEFT's order: per layer the router gate, the
    /// attention projections (q, k, v, o; A then B), then gate_proj, down_proj, up_proj over experts 0..E−1 (A then B).</summary>
    public static IReadOnlyList<KeyValuePair<string, Tensor>> StateDict(LlamaForCausalLM model, string adapterName = "default") =>
        Entries(model, adapterName).Select(e => new KeyValuePair<string, Tensor>(e.Key, e.Tensor)).ToList();

    private static List<(string Key, Parameter Tensor)> Entries(LlamaForCausalLM model, string adapterName)
    {
        var list = new List<(string, Parameter)>();
        var layers = model.Model.Layers;
        for (int i = 0; i < layers.Count; i++)
        {
            if (layers[i].FeedForward is not MixLoraFeedForward block || !block.HasAdapter(adapterName)) continue;
            var mixture = block.GetAdapter(adapterName);
            string p = $"{Prefix}{i}.";
            list.Add((p + "mlp.moe_gate.weight", mixture.RouterWeight));
            var attn = layers[i].SelfAttention;
            foreach (var name in LlamaAttention.ProjectionNames)
                if (attn.GetProjection(name) is AdaptedLinear a && a.HasAdapter(adapterName))
                {
                    var d = a.GetAdapter(adapterName);
                    list.Add(($"{p}self_attn.{name}.lora_A.weight", d.A));
                    list.Add(($"{p}self_attn.{name}.lora_B.weight", d.B));
                }
            foreach (var proj in MixLoraConfig.ExpertProjectionOrder)
                for (int e = 0; e < mixture.Experts.Count; e++)
                    if (mixture.Experts[e].Get(proj) is { } d)
                    {
                        list.Add(($"{p}mlp.{proj}.experts.{e}.lora_A.weight", d.A));
                        list.Add(($"{p}mlp.{proj}.experts.{e}.lora_B.weight", d.B));
                    }
        }
        if (list.Count == 0) throw new ArgumentException($"no MixLoRA adapter named '{adapterName}' is attached");
        if (model.Model.EmbedTokens.GetPrivilegeEmbedding(adapterName) is { } ise) list.Add((PrivilegeEmbeddingKey, ise.Weight));
        return list;
    }

    /// <summary>
    /// Writes <c>adapter_config.json</c> (MoE-PEFT's export) and the weights (fp32; by default both
    /// <c>adapter_model.bin</c> for MoE-PEFT and <c>adapter_model.safetensors</c>), each file atomically.
    /// </summary>
    public static void Save(LlamaForCausalLM model, MixLoraConfig config, string directory, string adapterName = "default",
        AdapterFileFormats formats = AdapterFileFormats.Both)
    {
        string json = config.ToJson();
        AdapterFiles.WriteWeights(directory, StateDict(model, adapterName), formats, SafetensorsFileName, BinFileName);
        AtomicFile.WriteAllText(Path.Combine(directory, ConfigFileName), json);
    }

    /// <summary>
    /// Loads a MixLoRA adapter directory (LoraMix's or MoE-PEFT's, current or legacy key scheme; safetensors preferred,
    /// else <c>adapter_model.bin</c>) under <paramref name="adapterName"/>. The key set must be exactly
    /// what the config implies for this model; otherwise nothing is attached and every mismatch is reported.
    /// </summary>
    public static MixLoraConfig Load(LlamaForCausalLM model, string directory, string adapterName = "default")
    {
        string configPath = Path.Combine(directory, ConfigFileName);
        var config = MixLoraConfig.Load(configPath);
        config.Validate(configPath);
        ValidateFor(model, config, configPath);
        using var weights = AdapterWeights.Open(directory, SafetensorsFileName, BinFileName);
        weights.CheckLayout(ExpectedLayout(model, config), CanonicalKey);   // before anything is allocated
        config = Attach(model, config, adapterName);
        try
        {
            weights.ReadStrict(StateDict(model, adapterName), CanonicalKey);
        }
        catch
        {
            Remove(model, adapterName);
            throw;
        }
        return config;
    }

    private static readonly Regex LegacyGate = new(@"^mixlora\.layers\.(\d+)\.gate\.weight$", RegexOptions.CultureInvariant);
    private static readonly Regex LegacyExpert = new(@"^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_[AB])\.weight$", RegexOptions.CultureInvariant);

    /// <summary>Maps a legacy (pre-August-2024 m-LoRA) key to the current scheme; other keys are returned unchanged.
    /// Legacy: <c>mixlora.layers.{L}.gate.weight</c> and <c>mixlora.layers.{L}.experts.{e}.{w1_proj|w2_proj|w3_proj|gate_proj|down_proj|up_proj}.lora_X.weight</c>.</summary>
    public static string CanonicalKey(string key)
    {
        if (LegacyGate.Match(key) is { Success: true } g) return $"{Prefix}{g.Groups[1].Value}.mlp.moe_gate.weight";
        if (LegacyExpert.Match(key) is { Success: true } m)
        {
            string proj = m.Groups[3].Value switch { "w1_proj" => "gate_proj", "w2_proj" => "down_proj", "w3_proj" => "up_proj", var x => x };
            return $"{Prefix}{m.Groups[1].Value}.mlp.{proj}.experts.{m.Groups[2].Value}.{m.Groups[4].Value}.weight";
        }
        return key;
    }

    /// <summary>Removes the adapter (mixtures and attention LoRA); a block left without adapters becomes the dense MLP again.</summary>
    public static void Remove(LlamaForCausalLM model, string adapterName)
    {
        foreach (var layer in model.Model.Layers)
        {
            if (layer.FeedForward is not MixLoraFeedForward block) continue;
            if (block.HasAdapter(adapterName)) block.RemoveAdapter(adapterName);
            if (block.AdapterNames.Count == 0) layer.SetFeedForward(block.Dense);
        }
        LoraAdapters.Remove(model, adapterName);
        model.Model.EmbedTokens.RemovePrivilegeEmbedding(adapterName);
        if (model.Adapters.TryGetValue(adapterName, out var method) && method == MethodName) model.UnregisterAdapter(adapterName);
    }
}
