using LoraMix.Adapters.Lora;
using LoraMix.Modeling;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraMix.Adapters.XLora;

/// <summary>
/// An X-LoRA adapter attached to a model: the scaling head (PEFT's <c>XLoraClassifier</c>: <c>xlora_depth</c> linear layers,
/// ReLU and dropout between them, output <c>N</c> or <c>L·N</c> logits per token) over frozen LoRA experts that are attached
/// to the model as ordinary LoRA adapters named <c>{name}#{i}</c>. The model runs it through
/// <see cref="IScalingPassAdapter"/>: scaling pass, head, scaled pass (<see cref="LlamaForCausalLM"/>).
/// </summary>
/// <remarks>The head's parameters are this module's (<c>linears.{j}.weight|bias</c>); they are not part of the model's
/// state dict. The adapter holds no per-call state: scalings travel in the forward context.</remarks>
public sealed class XLoraAdapter : nn.Module, IScalingPassAdapter
{
    private readonly ModuleList<Linear> _linears;
    private readonly Dictionary<LinearSlot, int> _moduleIndex = new(ReferenceEqualityComparer.Instance);

    internal XLoraAdapter(string name, XLoraConfig config, IReadOnlyList<string> experts, IReadOnlyList<LoraConfig> expertConfigs,
        IReadOnlyList<(string Path, LinearSlot Slot)> modules, Device device, ScalarType dtype, Generator? generator = null)
        : base(nameof(XLoraAdapter))
    {
        Name = name;
        Config = config;
        Experts = experts;
        ExpertConfigs = expertConfigs;
        ModuleOrder = modules.Select(m => m.Path).ToList();
        for (int l = 0; l < modules.Count; l++) _moduleIndex[modules[l].Slot] = l;
        int outSize = config.OutputSize(modules.Count);
        var linears = new List<Linear>();
        for (int j = 0; j < config.XLoraDepth; j++)
        {
            long inF = j == 0 ? config.HiddenSize : config.XLoraSize;
            long outF = j == config.XLoraDepth - 1 ? outSize : config.XLoraSize;
            var lin = nn.Linear(inF, outF, hasBias: config.UseBias, device: device, dtype: dtype);
            if (generator is not null)
                using (no_grad())
                {
                    // PyTorch's nn.Linear init (kaiming-uniform a=√5: bound 1/√in for weight and bias), from the given generator
                    double bound = 1.0 / Math.Sqrt(inF);
                    lin.weight!.uniform_(-bound, bound, generator);
                    lin.bias?.uniform_(-bound, bound, generator);
                }
            linears.Add(lin);
        }
        _linears = nn.ModuleList(linears.ToArray());
        register_module("linears", _linears);
        ScalingPassChoice = config.ScalingPassValue == 0 ? AdapterChoice.Base
            : AdapterChoice.Compose(experts.Select(e => new AdapterTerm(e, config.ScalingPassValue * config.GlobalScalingWeight)).ToArray());
    }

    public string Name { get; }

    /// <summary>The config (its <see cref="XLoraConfig.ModuleOrder"/> may be null; <see cref="ModuleOrder"/> is the one in use).</summary>
    public XLoraConfig Config { get; }

    /// <summary>The experts' adapter names on the model, in adapter-index order.</summary>
    public IReadOnlyList<string> Experts { get; }

    /// <summary>The experts' LoRA configs, in adapter-index order.</summary>
    public IReadOnlyList<LoraConfig> ExpertConfigs { get; }

    /// <summary>The wrapped modules' paths: the scalings' L axis.</summary>
    public IReadOnlyList<string> ModuleOrder { get; }

    public int NumModules => ModuleOrder.Count;
    public double GlobalScalingWeight => Config.GlobalScalingWeight;
    public AdapterChoice ScalingPassChoice { get; }

    /// <summary>The scalings' router policy (<see cref="XLoraConfig.RouterPolicy"/>).</summary>
    public Routing.IRouterPolicy Policy => Config.CreatePolicy();

    /// <summary>The head's linear layers, first to last.</summary>
    public IReadOnlyList<Linear> Linears => [.. _linears];

    public int ModuleIndex(LinearSlot slot) => _moduleIndex.TryGetValue(slot, out int l) ? l : -1;

    /// <summary>The head's logits <c>[R, T, OUT]</c>: linear, then (ReLU, dropout) between linears.</summary>
    public Tensor Logits(Tensor hidden)
    {
        using var scope = NewDisposeScope();
        var h = hidden.to(_linears[0].weight!.dtype);
        for (int j = 0; j < _linears.Count; j++)
        {
            h = _linears[j].call(h);
            if (j == _linears.Count - 1 || !Config.EnableReluAndDropout) continue;
            h = nn.functional.relu(h);
            if (Config.XLoraDropoutP > 0 && training) h = nn.functional.dropout(h, Config.XLoraDropoutP, true);
        }
        return h.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Scalings <c>[R, T, L, N]</c> as PEFT computes them: the head's logits, expanded over L unless layerwise (a layerwise
    /// head's index is <c>l·N + i</c>), softmax over the adapters with temperature when <c>enable_softmax</c>; then per
    /// module the top-k mask (<c>top_k_lora</c>, kept entries unnormalised) and, with <c>enable_softmax_topk</c>, a softmax
    /// over the kept entries of each token.
    /// </summary>
    public Tensor Scalings(Tensor hidden)
    {
        using var scope = NewDisposeScope();
        long r = hidden.shape[0], t = hidden.shape[1];
        int n = Experts.Count, l = NumModules;
        var logits = Logits(hidden);
        var s = Config.LayerwiseScalings ? logits.reshape(r, t, l, n) : logits.unsqueeze(2).expand(r, t, l, n);
        if (Config.EnableSoftmax) s = nn.functional.softmax(s / Config.SoftmaxTemperature, -1);
        if (Config.TopKLora is int k)
        {
            var idx = s.topk(k, -1).indexes;
            var keep = zeros_like(s, dtype: ScalarType.Bool).scatter(-1, idx, ones_like(idx, dtype: ScalarType.Bool));
            s = s * keep.to(s.dtype);
        }
        if (Config.EnableSoftmaxTopk)
        {
            // PEFT applies it whenever the flag is set (with only a warning when top_k_lora is null)
            var nz = s != 0;
            s = nn.functional.softmax(s.masked_fill(nz.logical_not(), double.NegativeInfinity), -1).masked_fill(nz.logical_not(), 0.0);
        }
        return s.contiguous().MoveToOuterDisposeScope();
    }
}
