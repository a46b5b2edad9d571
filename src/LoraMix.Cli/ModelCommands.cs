using System.CommandLine;
using System.Globalization;
using LoraMix.Checkpoints;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Torch;
using TorchSharp;

namespace LoraMix.Cli;

/// <summary>Verbs that create, inspect and run base models.</summary>
internal static class ModelCommands
{
    internal static Option<string> ModelOption() => new("--model", "-m")
    {
        Description = "Model directory in Hugging Face layout (config.json + model.safetensors or a sharded index).",
        Required = true,
    };

    internal static Option<string> DeviceOption() => new("--device")
    {
        Description = "cpu, cuda or cuda:N (CUDA needs a CUDA libtorch package; see README).",
        DefaultValueFactory = _ => "cpu",
    };

    internal static Option<string> DTypeOption(string defaultValue) => new("--dtype")
    {
        Description = "Compute/storage dtype: f32, bf16 or f16.",
        DefaultValueFactory = _ => defaultValue,
    };

    public static Command Inspect()
    {
        var model = ModelOption();
        var all = new Option<bool>("--all") { Description = "List every tensor (default: the first 12 and a per-dtype summary)." };
        var cmd = new Command("inspect", "Print a model's architecture, parameter count, dtype and tensors.") { model, all };
        cmd.SetAction(p =>
        {
            string dir = p.GetValue(model)!;
            if (!Directory.Exists(dir)) throw new LoraMixException($"model directory '{dir}' does not exist");
            var cfg = LlamaConfig.Load(Path.Combine(dir, "config.json"));
            using var ckpt = SafetensorsCheckpoint.OpenDirectory(dir);
            var o = p.InvocationConfiguration.Output;
            o.WriteLine($"model:        {Path.GetFullPath(dir)}");
            o.WriteLine($"architecture: {cfg.ModelType} (hidden {cfg.HiddenSize}, intermediate {cfg.IntermediateSize}, layers {cfg.NumHiddenLayers}, " +
                        $"heads {cfg.NumAttentionHeads}, kv heads {cfg.NumKeyValueHeads}, head_dim {cfg.HeadDim}, vocab {cfg.VocabSize})");
            string rope = cfg.RopeScaling is { } s ? $"{s.Type} x{s.Factor.ToString(CultureInfo.InvariantCulture)}" : "none";
            o.WriteLine($"attention:    rope_theta {cfg.RopeTheta.ToString(CultureInfo.InvariantCulture)}, rope_scaling {rope}, " +
                        $"max positions {cfg.MaxPositionEmbeddings}, sliding window {(cfg.SlidingWindow?.ToString(CultureInfo.InvariantCulture) ?? "none")}, " +
                        $"bias {(cfg.AttentionBias ? "q/k/v/o" : cfg.QkvBias ? "q/k/v" : "none")}");
            o.WriteLine($"embeddings:   {(cfg.TieWordEmbeddings ? "tied" : "untied")} lm_head; bos {cfg.BosTokenId?.ToString(CultureInfo.InvariantCulture) ?? "-"}, eos [{string.Join(", ", cfg.EosTokenIds)}]");
            var entries = ckpt.TensorNames.Select(ckpt.GetEntry).ToList();
            long parameters = entries.Sum(e => e.Shape.Aggregate(1L, (a, b) => a * b));
            o.WriteLine($"parameters:   {parameters:N0} ({Human(parameters)}) in {entries.Count} tensors; config implies {cfg.ParameterCount():N0}");
            foreach (var g in entries.GroupBy(e => e.DType).OrderBy(g => g.Key.ToString()))
                o.WriteLine($"dtype:        {g.Key}: {g.Count()} tensors, {HumanBytes(g.Sum(e => e.ByteLength))}");
            o.WriteLine($"config dtype: {cfg.TorchDtype ?? "(unspecified)"}");
            var shown = p.GetValue(all) ? entries : entries.Take(12).ToList();
            foreach (var e in shown) o.WriteLine($"  {e.Name,-52} {e.DType,-5} [{string.Join(", ", e.Shape)}]");
            if (shown.Count < entries.Count) o.WriteLine($"  ... {entries.Count - shown.Count} more (use --all)");
            return 0;
        });
        return cmd;
    }

    public static Command InitModel()
    {
        var preset = new Option<string>("--preset") { Description = $"One of: {string.Join(", ", ModelPresets.Names)}.", Required = true };
        var output = new Option<string>("--out", "-o") { Description = "Output directory.", Required = true };
        var seed = new Option<long>("--seed") { Description = "Random seed.", DefaultValueFactory = _ => 0 };
        var dtype = DTypeOption("f32");
        var shard = new Option<long>("--max-shard-gb") { Description = "Largest shard in GiB (bigger models are split with an index).", DefaultValueFactory = _ => 5 };
        var cmd = new Command("init-model", "Write a randomly initialised model in Hugging Face layout (streamed tensor by tensor).")
        {
            preset, output, seed, dtype, shard,
        };
        cmd.SetAction(p =>
        {
            var cfg = ModelPresets.Get(p.GetValue(preset)!);
            var dt = TorchRuntime.ParseDType(p.GetValue(dtype)!);
            string dir = p.GetValue(output)!;
            long s = p.GetValue(seed);
            TorchRuntime.EnsureLoaded();
            var layout = ModelPresets.Layout(cfg).Select(e => new SafetensorsTensorSpec(e.Name, SafetensorsDTypes.FromScalarType(dt), e.Shape)).ToList();
            Directory.CreateDirectory(dir);
            var err = p.InvocationConfiguration.Error;
            int done = 0;
            SafetensorsCheckpoint.WriteDirectory(dir, layout, spec =>
            {
                if (++done % 25 == 0 || done == layout.Count) err.WriteLine($"  {done}/{layout.Count} tensors");
                return ModelPresets.RandomTensor(cfg, spec.Name, spec.Shape, s, dt);
            }, maxShardBytes: p.GetValue(shard) << 30, metadata: new Dictionary<string, string> { ["format"] = "pt" });
            (cfg with { TorchDtype = TorchRuntime.HfName(dt) }).Save(Path.Combine(dir, "config.json"));
            p.InvocationConfiguration.Output.WriteLine($"wrote {p.GetValue(preset)} ({cfg.ParameterCount():N0} parameters, {TorchRuntime.HfName(dt)}) to {Path.GetFullPath(dir)}");
            return 0;
        });
        return cmd;
    }

    public static Command ImportLlama2c()
    {
        var file = new Argument<string>("file") { Description = "A llama2.c legacy (version 0) checkpoint, e.g. stories260K.bin." };
        var output = new Option<string>("--out", "-o") { Description = "Output directory (Hugging Face layout).", Required = true };
        var cmd = new Command("import-llama2c", "Convert a llama2.c checkpoint into a Hugging Face model directory.") { file, output };
        cmd.SetAction(p =>
        {
            TorchRuntime.EnsureLoaded();
            var cfg = Llama2cImporter.Convert(p.GetValue(file)!, p.GetValue(output)!);
            p.InvocationConfiguration.Output.WriteLine(
                $"wrote {Path.GetFullPath(p.GetValue(output)!)} (llama, {cfg.ParameterCount():N0} parameters, {cfg.NumHiddenLayers} layers, vocab {cfg.VocabSize})");
            return 0;
        });
        return cmd;
    }

    internal static int[] ParseIds(string text, string option)
    {
        var parts = text.Split([',', ' ', '\t'], StringSplitOptions.RemoveEmptyEntries);
        if (parts.Length == 0) throw new ArgumentException($"{option}: expected at least one token id");
        return parts.Select(s => int.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) && v >= 0 ? v
            : throw new ArgumentException($"{option}: '{s}' is not a non-negative integer token id")).ToArray();
    }

    private static string Human(long n) => n >= 1_000_000_000 ? $"{n / 1e9:F2}B" : n >= 1_000_000 ? $"{n / 1e6:F2}M" : $"{n / 1e3:F1}K";

    private static string HumanBytes(long b) => b >= 1L << 30 ? $"{b / (double)(1L << 30):F2} GiB" : b >= 1 << 20 ? $"{b / (double)(1 << 20):F1} MiB" : $"{b / 1024.0:F1} KiB";
}
