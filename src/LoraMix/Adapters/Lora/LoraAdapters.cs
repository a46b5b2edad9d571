using LoraMix.Checkpoints;
using LoraMix.Modeling;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Adapters.Lora;

/// <summary>
/// Attaches, saves, loads, activates and merges PEFT-compatible LoRA adapters on a <see cref="LlamaForCausalLM"/>.
/// Several named adapters can live on one model; the file format is PEFT's (<c>adapter_config.json</c> +
/// <c>adapter_model.safetensors</c>, keys <c>base_model.model.&lt;module&gt;.lora_A.weight</c> [r, in] and
/// <c>.lora_B.weight</c> [out, r]).
/// </summary>
public static class LoraAdapters
{
    public const string ConfigFileName = "adapter_config.json";
    public const string WeightsFileName = "adapter_model.safetensors";
    private const string PeftPrefix = "base_model.model.";

    /// <summary>The linear slots of the decoder with their Hugging Face module paths (the MLP's also when a mixture of
    /// experts wraps it: its projections are shared).</summary>
    public static IEnumerable<(string Path, Func<LinearSlot> Get, Action<LinearSlot> Set)> LinearSlots(LlamaForCausalLM model)
    {
        var layers = model.Model.Layers;
        for (int i = 0; i < layers.Count; i++)
        {
            var attn = layers[i].SelfAttention;
            foreach (var name in LlamaAttention.ProjectionNames)
                yield return ($"model.layers.{i}.self_attn.{name}", () => attn.GetProjection(name), m => attn.SetProjection(name, m));
            switch (layers[i].FeedForward)
            {
                case LlamaMlp mlp:
                    foreach (var name in LlamaMlp.ProjectionNames)
                        yield return ($"model.layers.{i}.mlp.{name}", () => mlp.GetProjection(name), m => mlp.SetProjection(name, m));
                    break;
                case MixLora.MixLoraFeedForward moe:
                    foreach (var name in LlamaMlp.ProjectionNames)
                        yield return ($"model.layers.{i}.mlp.{name}", () => moe.Dense.GetProjection(name), m => moe.SetProjection(name, m));
                    break;
            }
        }
    }

    /// <summary>The adapted layers (those with at least one adapter) by module path.</summary>
    public static IReadOnlyList<(string Path, AdaptedLinear Layer)> AdaptedLayers(LlamaForCausalLM model) =>
        LinearSlots(model).Select(s => (s.Path, Layer: s.Get() as AdaptedLinear)).Where(s => s.Layer is not null)
            .Select(s => (s.Path, s.Layer!)).ToList();

    /// <summary>The linear layers <paramref name="config"/> targets on <paramref name="model"/>, with their sizes
    /// (nothing is allocated).</summary>
    /// <exception cref="LoraMixException">It targets no linear layer, or a slot that is not a linear layer.</exception>
    public static IReadOnlyList<(string Path, long In, long Out)> TargetedLayers(LlamaForCausalLM model, LoraConfig config)
    {
        var list = new List<(string, long, long)>();
        foreach (var (path, get, _) in LinearSlots(model))
        {
            if (!config.Targets(path)) continue;
            var slot = get();
            list.Add((path, slot.InFeatures, slot.OutFeatures));
        }
        if (list.Count == 0)
            throw new LoraMixException($"target_modules matched no linear layer; available: {string.Join(", ", LoraConfig.LlamaLinearNames)} (or \"all-linear\")");
        return list;
    }

    /// <summary>The PEFT state-dict layout (keys and shapes) an adapter of <paramref name="config"/> has on
    /// <paramref name="model"/>, computed without attaching it: what <see cref="PeftStateDict"/> returns once attached.</summary>
    public static IReadOnlyList<(string Name, long[] Shape)> ExpectedLayout(LlamaForCausalLM model, LoraConfig config) =>
        TargetedLayers(model, config).SelectMany(l => new (string, long[])[]
        {
            ($"{PeftPrefix}{l.Path}.lora_A.weight", [config.R, l.In]),
            ($"{PeftPrefix}{l.Path}.lora_B.weight", [l.Out, config.R]),
        }).ToList();

    /// <summary>Adds a new LoRA adapter on every targeted linear layer. Select it per forward call
    /// (<c>adapters: AdapterSelection.Of(name)</c>).</summary>
    /// <exception cref="AdapterConfigException">The config is invalid, or r exceeds min(in, out) of a targeted layer.</exception>
    public static void Attach(LlamaForCausalLM model, LoraConfig config, string adapterName = "default", long seed = 0)
    {
        config.Validate();
        config.ValidateFor(TargetedLayers(model, config));
        AdapterChoice.CheckName(adapterName);
        if (model.Adapters.TryGetValue(adapterName, out var existing) && existing != MethodName)
            throw new ArgumentException($"an adapter named '{adapterName}' is already attached ({existing})");
        using var gen = new TorchSharp.torch.Generator((ulong)seed, CPU);
        int count = 0;
        foreach (var (path, get, set) in LinearSlots(model))
        {
            if (!config.Targets(path)) continue;
            var slot = get();
            var adapted = slot as AdaptedLinear;
            if (adapted is null)
            {
                if (slot is not LinearLayer dense)
                    throw new LoraMixException($"cannot attach LoRA to '{path}': the slot holds a {slot.GetType().Name}, not a linear layer");
                adapted = new AdaptedLinear(dense);
                set(adapted);
            }
            adapted.AddAdapter(adapterName, config.R, config.LoraAlpha, config.LoraDropout, config.UseRsLora, gen);
            count++;
        }
        if (count == 0)
            throw new LoraMixException($"target_modules matched no linear layer; available: {string.Join(", ", LoraConfig.LlamaLinearNames)} (or \"all-linear\")");
        if (!model.Adapters.ContainsKey(adapterName)) model.RegisterAdapter(adapterName, MethodName);
    }

    /// <summary>The method name models record for LoRA adapters (<see cref="LlamaForCausalLM.Adapters"/>).</summary>
    public const string MethodName = "lora";

    /// <summary>Names of all attached adapters.</summary>
    public static IReadOnlyList<string> AdapterNames(LlamaForCausalLM model) =>
        AdaptedLayers(model).SelectMany(l => l.Layer.AdapterNames).Distinct().ToList();

    /// <summary>Freezes every base parameter and returns the trainable LoRA parameters of <paramref name="adapterName"/>.</summary>
    public static IReadOnlyList<TorchSharp.Modules.Parameter> PrepareForTraining(LlamaForCausalLM model, string adapterName = "default")
    {
        AdapterFiles.FreezeAll(model);
        var trainable = new List<TorchSharp.Modules.Parameter>();
        foreach (var (_, layer) in AdaptedLayers(model))
        {
            if (!layer.HasAdapter(adapterName)) continue;
            var d = layer.GetAdapter(adapterName);
            d.A.requires_grad = true;
            d.B.requires_grad = true;
            trainable.Add(d.A);
            trainable.Add(d.B);
        }
        return trainable;
    }

    /// <summary>The adapter's tensors under PEFT key names, in module order.</summary>
    public static IReadOnlyList<KeyValuePair<string, Tensor>> PeftStateDict(LlamaForCausalLM model, string adapterName = "default")
    {
        var list = new List<KeyValuePair<string, Tensor>>();
        foreach (var (path, layer) in AdaptedLayers(model))
        {
            if (!layer.HasAdapter(adapterName)) continue;
            var d = layer.GetAdapter(adapterName);
            list.Add(new($"{PeftPrefix}{path}.lora_A.weight", d.A));
            list.Add(new($"{PeftPrefix}{path}.lora_B.weight", d.B));
        }
        if (list.Count == 0) throw new ArgumentException($"no adapter named '{adapterName}' is attached");
        return list;
    }

    /// <summary>Writes the adapter in PEFT layout (fp32 weights, <c>{"format": "pt"}</c> metadata), atomically per file.</summary>
    public static void Save(LlamaForCausalLM model, LoraConfig config, string directory, string adapterName = "default")
    {
        AdapterFiles.WriteWeights(directory, PeftStateDict(model, adapterName), AdapterFileFormats.Safetensors, WeightsFileName, "adapter_model.bin");
        AtomicFile.WriteAllText(Path.Combine(directory, ConfigFileName), config.ToPeftJson());
    }

    /// <summary>
    /// Loads a PEFT LoRA adapter directory onto the model under <paramref name="adapterName"/>. The key set
    /// must match what the config targets on this model exactly (missing, unexpected and mis-shaped keys are listed).
    /// </summary>
    public static LoraConfig Load(LlamaForCausalLM model, string directory, string adapterName = "default")
    {
        string configPath = Path.Combine(directory, ConfigFileName);
        var config = LoraConfig.Load(configPath);
        config.ValidateFor(TargetedLayers(model, config), configPath);
        using var weights = AdapterWeights.Open(directory, WeightsFileName);
        weights.CheckLayout(ExpectedLayout(model, config));   // before anything is allocated
        Attach(model, config, adapterName);
        try
        {
            weights.ReadStrict(PeftStateDict(model, adapterName));
        }
        catch
        {
            Remove(model, adapterName);
            throw;
        }
        return config;
    }

    /// <summary>Removes an adapter from every layer and frees its tensors (a layer left without adapters runs its base
    /// weight alone; it keeps the same weight and bias tensors).</summary>
    public static void Remove(LlamaForCausalLM model, string adapterName)
    {
        foreach (var (_, layer) in AdaptedLayers(model))
            if (layer.HasAdapter(adapterName)) layer.RemoveAdapter(adapterName);
        if (model.Adapters.TryGetValue(adapterName, out var method) && method == MethodName) model.UnregisterAdapter(adapterName);
    }

    /// <summary>Folds the adapter into the base weights (see <see cref="AdaptedLinear.Merge"/>).</summary>
    public static void Merge(LlamaForCausalLM model, string adapterName = "default")
    {
        foreach (var (_, layer) in AdaptedLayers(model))
            if (layer.HasAdapter(adapterName)) layer.Merge(adapterName);
    }

    /// <summary>Undoes <see cref="Merge"/>.</summary>
    public static void Unmerge(LlamaForCausalLM model, string adapterName = "default")
    {
        foreach (var (_, layer) in AdaptedLayers(model))
            if (layer.HasAdapter(adapterName)) layer.Unmerge(adapterName);
    }

    /// <summary>
    /// Writes a merged Hugging Face checkpoint (base weights + the adapter's update) to <paramref name="directory"/>,
    /// tensor by tensor, without modifying the in-memory model: the weights first, config.json last, each file atomically.
    /// <c>loramix merge</c> calls it inside <see cref="AtomicDirectory.Write"/>, so its output directory is complete or absent.
    /// </summary>
    public static void ExportMerged(LlamaForCausalLM model, string directory, string adapterName = "default", ScalarType? dtype = null)
    {
        var deltas = AdaptedLayers(model).Where(l => l.Layer.HasAdapter(adapterName) && !l.Layer.IsMerged(adapterName))
            .ToDictionary(l => l.Path + ".weight", l => l.Layer.GetAdapter(adapterName));
        if (deltas.Count == 0 && !AdaptedLayers(model).Any(l => l.Layer.HasAdapter(adapterName)))
            throw new ArgumentException($"no adapter named '{adapterName}' is attached");
        ScalarType dt = dtype ?? model.DType;
        var baseKeys = ModelPresets.Layout(model.Config).Select(e => e.Name).ToHashSet();
        var sd = model.state_dict().Where(kv => baseKeys.Contains(kv.Key)).ToDictionary(kv => kv.Key, kv => kv.Value);
        Directory.CreateDirectory(directory);
        var layout = ModelPresets.Layout(model.Config)
            .Select(e => new SafetensorsTensorSpec(e.Name, SafetensorsDTypes.FromScalarType(dt), e.Shape)).ToList();
        SafetensorsCheckpoint.WriteDirectory(directory, layout, spec =>
        {
            using var noGrad = no_grad();
            var w = sd[spec.Name].detach();
            return deltas.TryGetValue(spec.Name, out var d) ? (w.to(ScalarType.Float32) + d.DeltaWeight().to(ScalarType.Float32)).to(dt) : w.to(dt);
        }, metadata: new Dictionary<string, string> { ["format"] = "pt" });
        (model.Config with { TorchDtype = Torch.TorchRuntime.HfName(dt) }).Save(Path.Combine(directory, "config.json"));
    }
}
