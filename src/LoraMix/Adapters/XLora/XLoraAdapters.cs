using LoraMix.Adapters.Lora;
using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Adapters.XLora;

/// <summary>
/// Creates, loads, saves and removes X-LoRA adapters. Both directory layouts are read: PEFT's (<c>adapter_config.json</c>
/// with <c>"peft_type": "XLORA"</c> + <c>adapter_model.safetensors</c> holding
/// <c>base_model.internal_xlora_classifier.layers.{k}.weight|bias</c>, k counting PEFT's ReLU/Dropout slots) and the
/// original package's (<c>xlora_config.json</c> + <c>xlora_classifier.safetensors</c> with <c>inner.{k}</c> and
/// <c>last</c>). The experts are ordinary PEFT LoRA directories, loaded through the LoRA method under the names
/// <c>{name}#{i}</c>; a relative expert path is resolved against the X-LoRA directory first, then the working directory.
/// </summary>
public static class XLoraAdapters
{
    /// <summary>The method name models record for X-LoRA adapters.</summary>
    public const string MethodName = "xlora";

    private const string PeftHeadPrefix = "base_model.internal_xlora_classifier.layers.";

    /// <summary>The model name of expert <paramref name="index"/> of X-LoRA adapter <paramref name="name"/>.</summary>
    public static string ExpertName(string name, int index) => $"{name}#{index}";

    /// <summary>The layout of the X-LoRA directory <paramref name="directory"/>, or null when it is not one.</summary>
    public static XLoraLayout? DetectLayout(string directory)
    {
        if (File.Exists(Path.Combine(directory, XLoraConfig.PeftConfigFileName))) return XLoraLayout.Peft;
        if (File.Exists(Path.Combine(directory, XLoraConfig.OriginalConfigFileName))) return XLoraLayout.Original;
        return null;
    }

    /// <summary>Reads the config of an X-LoRA directory of either layout.</summary>
    public static (XLoraConfig Config, XLoraLayout Layout) LoadConfig(string directory)
    {
        var layout = DetectLayout(directory) ?? throw new LoraMixException(
            $"'{directory}' is not an X-LoRA directory: it has neither {XLoraConfig.PeftConfigFileName} nor {XLoraConfig.OriginalConfigFileName}");
        string path = Path.Combine(directory, layout == XLoraLayout.Peft ? XLoraConfig.PeftConfigFileName : XLoraConfig.OriginalConfigFileName);
        return (XLoraConfig.Parse(AdapterFiles.ReadConfigObject(path, "X-LoRA"), path, layout), layout);
    }

    /// <summary>
    /// The L axis for experts with <paramref name="expertConfigs"/> on <paramref name="model"/>: the linear slots in PEFT's
    /// module order (per decoder layer q, k, v, o, gate, up, down) that at least one expert targets.
    /// </summary>
    public static IReadOnlyList<string> ModuleOrder(LlamaForCausalLM model, IEnumerable<LoraConfig> expertConfigs)
    {
        var configs = expertConfigs.ToList();
        return LoraAdapters.LinearSlots(model).Select(s => s.Path).Where(p => configs.Any(c => c.Targets(p))).ToList();
    }

    /// <summary>
    /// Attaches an X-LoRA adapter: loads every expert listed in <paramref name="config"/> (paths resolved against
    /// <paramref name="baseDirectory"/> first), checks the module order, and creates the head with PyTorch's default
    /// init from <paramref name="seed"/> (what training starts from).
    /// </summary>
    public static XLoraAdapter Create(LlamaForCausalLM model, XLoraConfig config, string name = "default", string? baseDirectory = null,
        long seed = 0, string source = "X-LoRA config")
    {
        config.Validate(source);
        AdapterChoice.CheckName(name);
        if (model.Adapters.ContainsKey(name)) throw new ArgumentException($"an adapter named '{name}' is already attached ({model.Adapters[name]})");
        if (config.HiddenSize != model.Config.HiddenSize)
            throw new AdapterConfigException(source, "hidden_size", $"is {config.HiddenSize} but the base model's hidden size is {model.Config.HiddenSize}");
        var experts = new List<string>();
        var expertConfigs = new List<LoraConfig>();
        try
        {
            for (int i = 0; i < config.Adapters.Count; i++)
            {
                var (label, path) = config.Adapters[i];
                string dir = ResolveExpert(path, baseDirectory, source, label);
                string expert = ExpertName(name, i);
                if (model.Adapters.ContainsKey(expert)) throw new ArgumentException($"an adapter named '{expert}' is already attached");
                expertConfigs.Add(LoraAdapters.Load(model, dir, expert));
                experts.Add(expert);
            }
            var order = ModuleOrder(model, expertConfigs);
            if (config.ModuleOrder is { } saved && !saved.SequenceEqual(order, StringComparer.Ordinal))
            {
                int at = Enumerable.Range(0, Math.Min(saved.Count, order.Count)).FirstOrDefault(j => saved[j] != order[j], Math.Min(saved.Count, order.Count));
                throw new AdapterConfigException(source, "module_order",
                    $"does not match the modules the experts wrap on this model: {saved.Count} saved vs {order.Count} here, first difference at index {at} " +
                    $"({(at < saved.Count ? saved[at] : "(end)")} saved vs {(at < order.Count ? order[at] : "(end)")} here); the head's scalings " +
                    "would be applied to the wrong modules");
            }
            var slots = LoraAdapters.LinearSlots(model).ToDictionary(s => s.Path, s => s.Get());
            var modules = order.Select(p => (p, slots[p])).ToList();
            using var gen = new TorchSharp.torch.Generator((ulong)seed, CPU);
            var adapter = new XLoraAdapter(name, config, experts, expertConfigs, modules, model.Device, model.DType, gen);
            model.RegisterScalingAdapter(adapter, MethodName);
            return adapter;
        }
        catch
        {
            foreach (var e in experts) LoraAdapters.Remove(model, e);
            throw;
        }
    }

    private static string ResolveExpert(string path, string? baseDirectory, string source, string label)
    {
        var tried = new List<string>();
        if (!Path.IsPathRooted(path) && baseDirectory is not null)
        {
            string inBase = Path.Combine(baseDirectory, path);
            if (Directory.Exists(inBase)) return inBase;
            tried.Add(inBase);
        }
        if (Directory.Exists(path)) return path;
        tried.Add(Path.GetFullPath(path));
        // the xlora package saves every expert as the subdirectory of its name, whatever path the config recorded
        if (baseDirectory is not null && label.IndexOfAny(Path.GetInvalidFileNameChars()) < 0 && label is not ("." or ".."))
        {
            string byName = Path.Combine(baseDirectory, label);
            if (Directory.Exists(byName)) return byName;
            tried.Add(byName);
        }
        throw new AdapterConfigException(source, "adapters",
            $"expert '{label}': no LoRA directory at '{path}' (tried {string.Join(" and ", tried)}); a relative path is resolved against the X-LoRA directory first");
    }

    /// <summary>Loads an X-LoRA directory (either layout) onto <paramref name="model"/> under <paramref name="name"/>.</summary>
    public static XLoraConfig Load(LlamaForCausalLM model, string directory, string name = "default")
    {
        var (config, layout) = LoadConfig(directory);
        string configPath = Path.Combine(directory, layout == XLoraLayout.Peft ? XLoraConfig.PeftConfigFileName : XLoraConfig.OriginalConfigFileName);
        string weightsName = layout == XLoraLayout.Peft ? XLoraConfig.PeftWeightsFileName : XLoraConfig.OriginalWeightsFileName;
        using var weights = AdapterWeights.Open(directory, weightsName, layout == XLoraLayout.Peft ? "adapter_model.bin" : "xlora_classifier.bin");
        var adapter = Create(model, config, name, directory, source: configPath);
        try
        {
            var tensors = HeadStateDict(adapter, layout);
            weights.CheckLayout(tensors.Select(kv => (kv.Key, kv.Value.shape)));
            weights.ReadStrict(tensors);
        }
        catch
        {
            Remove(model, name);
            throw;
        }
        return config;
    }

    /// <summary>The head's tensors under the file keys of <paramref name="layout"/>.</summary>
    public static IReadOnlyList<KeyValuePair<string, Tensor>> HeadStateDict(XLoraAdapter adapter, XLoraLayout layout)
    {
        var c = adapter.Config;
        int depth = adapter.Linears.Count;
        var list = new List<KeyValuePair<string, Tensor>>();
        for (int j = 0; j < depth; j++)
        {
            string prefix;
            if (layout == XLoraLayout.Peft)
            {
                // PEFT's Sequential: Linear, ReLU, [Dropout if p > 0], ..., Linear
                int stride = 2 + (c.XLoraDropoutP > 0 ? 1 : 0);
                prefix = $"{PeftHeadPrefix}{j * stride}.";
            }
            else
            {
                // the package's ModuleList inner: Linear, [ReLU, Dropout when enable_relu_and_dropout], ...; then last
                int stride = c.EnableReluAndDropout ? 3 : 1;
                prefix = j == depth - 1 ? "last." : $"inner.{j * stride}.";
            }
            var lin = adapter.Linears[j];
            list.Add(new(prefix + "weight", lin.weight!));
            if (lin.bias is { } b) list.Add(new(prefix + "bias", b));
        }
        return list;
    }

    /// <summary>
    /// Writes the adapter to <paramref name="directory"/> in <paramref name="layout"/>: the config (with the explicit
    /// <c>module_order</c>), the head, and every expert as a PEFT LoRA directory in a subdirectory named after it, which the
    /// config then points to (relative). PEFT saves the head only and keeps the experts' original paths; LoraMix writes a
    /// self-contained directory, so trained experts (<c>use_trainable_adapters</c>) are kept. Each file is written atomically.
    /// </summary>
    public static void Save(LlamaForCausalLM model, string directory, string name = "default", XLoraLayout layout = XLoraLayout.Peft)
    {
        var adapter = Get(model, name);
        var config = adapter.Config;
        Directory.CreateDirectory(directory);
        var paths = new List<string>();
        for (int i = 0; i < adapter.Experts.Count; i++)
        {
            string label = config.Adapters[i].Name;
            if (label is "." or ".." || label.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 || label.Contains('/') || label.Contains('\\'))
                throw new ArgumentException($"expert name '{label}' cannot name a subdirectory; rename the expert");
            LoraAdapters.Save(model, adapter.ExpertConfigs[i], Path.Combine(directory, label), adapter.Experts[i]);
            paths.Add(label);
        }
        var head = HeadStateDict(adapter, layout);
        if (layout == XLoraLayout.Peft)
        {
            AdapterFiles.WriteWeights(directory, head, AdapterFileFormats.Safetensors, XLoraConfig.PeftWeightsFileName, "adapter_model.bin");
            AtomicFile.WriteAllText(Path.Combine(directory, XLoraConfig.PeftConfigFileName), config.ToPeftJson(adapter.ModuleOrder, paths));
        }
        else
        {
            AdapterFiles.WriteWeights(directory, head, AdapterFileFormats.Safetensors, XLoraConfig.OriginalWeightsFileName, "xlora_classifier.bin");
            AtomicFile.WriteAllText(Path.Combine(directory, XLoraConfig.OriginalConfigFileName), config.ToOriginalJson(adapter.ModuleOrder));
        }
    }

    /// <summary>The X-LoRA adapter attached as <paramref name="name"/>.</summary>
    public static XLoraAdapter Get(LlamaForCausalLM model, string name = "default") =>
        model.ScalingAdapter(name) as XLoraAdapter ?? throw new ArgumentException($"no X-LoRA adapter named '{name}' is attached");

    /// <summary>Removes the adapter, its experts and its head.</summary>
    public static void Remove(LlamaForCausalLM model, string name)
    {
        if (model.ScalingAdapter(name) is not XLoraAdapter adapter) return;
        model.UnregisterScalingAdapter(name);
        foreach (var e in adapter.Experts) LoraAdapters.Remove(model, e);
        adapter.Dispose();
    }
}
