using LoraMix.Adapters.Lora;
using LoraMix.Adapters;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>
/// What the trainer trains: the model, its trainable parameters (named, with their weight-decay flag), and how their
/// values are written to and read back from a checkpoint directory. <see cref="Lora"/> and <see cref="FullFineTune"/>
/// cover the two built-in modes; later methods (MixLoRA, X-LoRA, LoRI) build their own.
/// </summary>
/// <param name="Model">The model whose forward pass the objective runs.</param>
/// <param name="Parameters">The trainable parameters, named as in the saved weights.</param>
/// <param name="SaveWeights">Writes the trained weights into a directory (e.g. a PEFT adapter); every file atomically.</param>
/// <param name="LoadWeights">Reads them back into the live parameters (resume).</param>
/// <param name="Description">One line for logs (what is trained, how many parameters).</param>
public sealed record TrainingTarget(
    LlamaForCausalLM Model,
    IReadOnlyList<TrainableParameter> Parameters,
    Action<string> SaveWeights,
    Action<string> LoadWeights,
    string Description)
{
    /// <summary>The adapters the trained model's forward pass runs (the trained adapter; the base model for full
    /// fine-tuning). The trainer sets it on every batch (<see cref="CollatedBatch.Adapters"/>).</summary>
    public AdapterSelection Adapters { get; init; } = AdapterSelection.Base;

    /// <summary>Runs after every optimizer step (e.g. X-LoRA's check that the frozen base and experts stayed frozen); it
    /// throws to stop training.</summary>
    public Action<int>? AfterStep { get; init; }

    /// <summary>
    /// X-LoRA: trains the scaling head of <paramref name="adapter"/> (attached with <see cref="XLoraAdapters.Create"/>), and
    /// its experts too with <c>use_trainable_adapters</c>; everything else is frozen. After every step it asserts that no
    /// frozen parameter has become trainable or received a gradient, and that frozen experts are bit-for-bit unchanged
    /// (PEFT has had bugs that silently unfroze experts). Checkpoints are X-LoRA directories in PEFT layout with the
    /// experts beside the head; parameters are named by their file keys (experts as <c>{expert}/{PEFT key}</c>).
    /// </summary>
    public static TrainingTarget XLora(LlamaForCausalLM model, XLoraAdapter adapter)
    {
        AdapterFiles.FreezeAll(model);
        var parameters = new List<TrainableParameter>();
        foreach (var (key, t) in XLoraAdapters.HeadStateDict(adapter, XLoraLayout.Peft))
        {
            var p = (TorchSharp.Modules.Parameter)t;
            p.requires_grad = true;
            parameters.Add(new TrainableParameter(key, p, Decay: !key.EndsWith(".bias", StringComparison.Ordinal)));
        }
        bool trainExperts = adapter.Config.UseTrainableAdapters;
        var expertTensors = new List<(string Label, string Key, TorchSharp.Modules.Parameter P)>();
        for (int i = 0; i < adapter.Experts.Count; i++)
            foreach (var (key, t) in LoraAdapters.PeftStateDict(model, adapter.Experts[i]))
                expertTensors.Add((adapter.Config.Adapters[i].Name, key, (TorchSharp.Modules.Parameter)t));
        if (trainExperts)
            foreach (var (label, key, p) in expertTensors)
            {
                p.requires_grad = true;
                parameters.Add(new TrainableParameter($"{label}/{key}", p, Decay: true));
            }
        var trainable = new HashSet<TorchSharp.Modules.Parameter>(parameters.Select(p => p.Parameter), ReferenceEqualityComparer.Instance);
        var frozenExperts = trainExperts ? [] : expertTensors.Select(e => (Name: $"{e.Label}/{e.Key}", e.P, Sum: Checksum(e.P))).ToList();

        void AssertFrozen(int step)
        {
            foreach (var (name, p) in model.named_parameters())
            {
                if (trainable.Contains(p)) continue;
                if (p.requires_grad || p.grad is not null)
                    throw new InvalidOperationException($"X-LoRA training, step {step}: the frozen parameter '{name}' became trainable " +
                                                        "or received a gradient; only the scaling head (and experts with use_trainable_adapters) may train");
            }
            foreach (var (name, p, sum) in frozenExperts)
                if (Checksum(p) != sum)
                    throw new InvalidOperationException($"X-LoRA training, step {step}: the frozen expert tensor '{name}' changed");
        }

        string what = trainExperts ? "head and experts" : "head; experts frozen";
        return new TrainingTarget(model, parameters,
            dir => XLoraAdapters.Save(model, dir, adapter.Name),
            dir =>
            {
                LoadByName(Path.Combine(dir, XLoraConfig.PeftWeightsFileName), [.. parameters.Where(p => !p.Name.Contains('/'))]);
                foreach (var group in parameters.Where(p => p.Name.Contains('/')).GroupBy(p => p.Name[..p.Name.IndexOf('/')]))
                    LoadByName(Path.Combine(dir, group.Key, LoraAdapters.WeightsFileName),
                        [.. group.Select(p => p with { Name = p.Name[(p.Name.IndexOf('/') + 1)..] })]);
            },
            $"X-LoRA adapter '{adapter.Name}' ({adapter.Experts.Count} experts over {adapter.NumModules} modules, depth {adapter.Config.XLoraDepth}, " +
            $"{what}: {parameters.Count} tensors, {parameters.Sum(p => p.Parameter.numel()):N0} parameters)")
        { Adapters = AdapterSelection.Of(adapter.Name), AfterStep = AssertFrozen };

        static double Checksum(Tensor t)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var f = t.to(ScalarType.Float64);
            return (f.abs().sum() + (f * arange(f.numel(), dtype: ScalarType.Float64).reshape(f.shape).remainder(7)).sum()).item<double>();
        }
    }

    /// <summary>
    /// LoRA: freezes the base model and trains adapter <paramref name="adapterName"/> (attached beforehand with
    /// <see cref="LoraAdapters.Attach"/>); checkpoints hold the adapter in PEFT layout (adapter_config.json +
    /// adapter_model.safetensors). Parameters are named by their PEFT keys.
    /// </summary>
    public static TrainingTarget Lora(LlamaForCausalLM model, LoraConfig config, string adapterName = "default")
    {
        LoraAdapters.PrepareForTraining(model, adapterName);
        var parameters = LoraAdapters.PeftStateDict(model, adapterName)
            .Select(kv => new TrainableParameter(kv.Key, (TorchSharp.Modules.Parameter)kv.Value, Decay: true)).ToList();
        var saveConfig = config with { InferenceMode = true };
        return new TrainingTarget(model, parameters,
            dir => LoraAdapters.Save(model, saveConfig, dir, adapterName),
            dir => LoadByName(Path.Combine(dir, LoraAdapters.WeightsFileName), parameters),
            $"LoRA adapter '{adapterName}' (r={config.R}, alpha={config.LoraAlpha}, {parameters.Count} tensors, {parameters.Sum(p => p.Parameter.numel()):N0} parameters)")
        { Adapters = AdapterSelection.Of(adapterName) };
    }

    /// <summary>
    /// MixLoRA: freezes the base model and trains adapter <paramref name="adapterName"/> (attached beforehand with
    /// <see cref="MixLoraAdapters.Attach"/>): routers, expert LoRAs and attention LoRAs. Checkpoints hold the adapter in
    /// MoE-PEFT layout (adapter_config.json + adapter_model.bin + adapter_model.safetensors); parameters are named by
    /// MoE-PEFT keys. Pair it with <see cref="MixLoraObjective"/> so the router losses reach the gradient.
    /// </summary>
    public static TrainingTarget MixLora(LlamaForCausalLM model, MixLoraConfig config, string adapterName = "default")
    {
        MixLoraAdapters.PrepareForTraining(model, adapterName);
        var parameters = MixLoraAdapters.StateDict(model, adapterName)
            .Select(kv => new TrainableParameter(kv.Key, (TorchSharp.Modules.Parameter)kv.Value, Decay: true)).ToList();
        return new TrainingTarget(model, parameters,
            dir => MixLoraAdapters.Save(model, config, dir, adapterName),
            dir => LoadByName(Path.Combine(dir, MixLoraAdapters.SafetensorsFileName), parameters),
            $"MixLoRA adapter '{adapterName}' ({config.RoutingStrategy}, {config.NumExperts} experts, r={config.R}, " +
            $"{parameters.Count} tensors, {parameters.Sum(p => p.Parameter.numel()):N0} parameters)")
        { Adapters = AdapterSelection.Of(adapterName) };
    }

    /// <summary>
    /// Full fine-tuning: every model parameter is trainable (biases and norm weights without weight decay, as transformers
    /// does); checkpoints hold a Hugging Face model directory (config.json + model.safetensors).
    /// </summary>
    public static TrainingTarget FullFineTune(LlamaForCausalLM model)
    {
        var parameters = new List<TrainableParameter>();
        foreach (var (name, p) in model.named_parameters())
        {
            p.requires_grad = true;
            bool noDecay = name.EndsWith(".bias", StringComparison.Ordinal) || name.Contains("norm", StringComparison.Ordinal);
            parameters.Add(new TrainableParameter(name, p, !noDecay));
        }
        return new TrainingTarget(model, parameters,
            dir => model.SavePretrained(dir),
            dir => LoadByName(Path.Combine(dir, Safetensors.SingleFileName), parameters),
            $"full fine-tuning ({parameters.Sum(p => p.Parameter.numel()):N0} parameters)");
    }

    /// <summary>Reads each parameter from a safetensors file by its name (shapes must match).</summary>
    public static void LoadByName(string file, IReadOnlyList<TrainableParameter> parameters)
    {
        if (!File.Exists(file)) throw new CheckpointFormatException(file, null, "not found; is this a complete checkpoint directory?");
        using var reader = SafetensorsReader.Open(file);
        var missing = parameters.Where(p => !reader.Contains(p.Name)).Select(p => p.Name).ToList();
        var misshaped = parameters.Where(p => reader.Contains(p.Name) && !reader.GetEntry(p.Name).Shape.SequenceEqual(p.Parameter.shape))
            .Select(p => $"{p.Name}: file {Safetensors.FormatShape(reader.GetEntry(p.Name).Shape)} vs model {Safetensors.FormatShape(p.Parameter.shape)}").ToList();
        if (missing.Count + misshaped.Count > 0) throw new StateDictMismatchException(file, missing, [], misshaped);
        using var noGrad = no_grad();
        foreach (var p in parameters) reader.ReadInto(p.Name, p.Parameter);
    }
}
