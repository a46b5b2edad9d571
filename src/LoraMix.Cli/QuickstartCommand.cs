using System.CommandLine;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Modeling;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Cli;

/// <summary><c>loramix quickstart</c>: fine-tune an adapter on the embedded model for a task family it never saw and show
/// exact match before and after (a thin wrapper over <see cref="Quickstart"/>).</summary>
internal static class QuickstartCommand
{
    private static readonly JsonSerializerOptions Json = new() { WriteIndented = false, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static Command Create()
    {
        var method = new Option<string>("--method")
        {
            Description = $"Adapter method: {string.Join(", ", QuickstartOptions.Methods)} (default {QuickstartOptions.DefaultMethod}), xlora (one LoRA per family, " +
                          "then an X-LoRA head mixing them), or hardened (free vs privileged MixLoRA routing under prompt injection: utility and " +
                          "attack success side by side).",
            DefaultValueFactory = _ => QuickstartOptions.DefaultMethod,
        };
        method.AcceptOnlyFromAmong([.. QuickstartOptions.Methods, XLoraMethod, HardenedMethod]);
        var json = new Option<bool>("--json") { Description = "Print the summary as one JSON object on stdout (progress goes to stderr)." };
        var model = new Option<string?>("--model", "-m") { Description = $"Base model directory (default: the embedded models/{EmbeddedModel.Name})." };
        var output = new Option<string?>("--out", "-o") { Description = "Output directory for the adapter, metrics and loss curve (default: out/quickstart-METHOD; replaced)." };
        var family = new Option<string[]>("--family")
        {
            Description = $"Task family to learn (repeatable; default: mixlora {string.Join(" + ", TaskWorld.ShortAnswerHeldOutFamilies)}, lora {TaskWorld.HeldOutFamilies[0]}: families held out of the base model's pre-training).",
            AllowMultipleArgumentsPerToken = false,
        };
        family.AcceptOnlyFromAmong([.. TaskWorld.Families]);
        var steps = new Option<int?>("--steps") { Description = $"Training steps (default: mixlora {QuickstartOptions.DefaultMixLoraSteps}, lora {QuickstartOptions.DefaultLoraSteps}; xlora: the head's, {new XLoraQuickstartOptions { ModelDir = "" }.HeadSteps})." };
        var expertSteps = new Option<int?>("--expert-steps") { Description = $"xlora: training steps of each LoRA expert (default {new XLoraQuickstartOptions { ModelDir = "" }.ExpertSteps}; experts trained with the same settings by an earlier run are reused)." };
        var batch = new Option<int>("--batch-size") { Description = "Sequences per step (default 16).", DefaultValueFactory = _ => 16 };
        var evalCount = new Option<int>("--eval-examples") { Description = "Test-split examples per family scored before and after (default 64).", DefaultValueFactory = _ => 64 };
        var seed = new Option<long>("--seed") { Description = "Training seed (default 42).", DefaultValueFactory = _ => 42 };
        var device = ModelCommands.DeviceOption();
        var cmd = new Command("quickstart",
            $"Fine-tune a MixLoRA (default) or LoRA adapter on the embedded {EmbeddedModel.Name} for task families it never saw; print exact " +
            "match before and after per family, whether experts specialise by family, an example and where the adapter, metrics and plots are.")
        {
            method, json, model, output, family, steps, expertSteps, batch, evalCount, seed, device,
        };
        cmd.SetAction(p =>
        {
            var o = p.InvocationConfiguration.Output;
            bool asJson = p.GetValue(json);
            string m = p.GetValue(method)!;
            if (m == XLoraMethod)
                return RunXLora(p, o, asJson, new XLoraQuickstartOptions
                {
                    ModelDir = p.GetValue(model) ?? EmbeddedModel.Locate(),
                    OutputDir = p.GetValue(output),
                    Families = p.GetValue(family) is { Length: > 0 } fams ? fams : null,
                    HeadSteps = p.GetValue(steps) ?? new XLoraQuickstartOptions { ModelDir = "" }.HeadSteps,
                    ExpertSteps = p.GetValue(expertSteps) ?? new XLoraQuickstartOptions { ModelDir = "" }.ExpertSteps,
                    BatchSize = p.GetValue(batch),
                    EvalExamples = p.GetValue(evalCount),
                    Seed = p.GetValue(seed),
                    Device = p.GetValue(device)!,
                });
            if (p.GetValue(expertSteps) is not null) throw new LoraMixException("--expert-steps applies to --method xlora only");
            if (m == HardenedMethod)
                return RunHardened(p, o, asJson, p.GetValue(model) ?? EmbeddedModel.Locate(), p.GetValue(output), p.GetValue(steps),
                    p.GetValue(batch), p.GetValue(seed), p.GetValue(device)!);
            var options = new QuickstartOptions
            {
                ModelDir = p.GetValue(model) ?? EmbeddedModel.Locate(),
                OutputDir = p.GetValue(output),
                Method = m,
                Families = p.GetValue(family) is { Length: > 0 } chosen ? chosen : null,
                Steps = p.GetValue(steps),
                BatchSize = p.GetValue(batch),
                EvalExamples = p.GetValue(evalCount),
                Seed = p.GetValue(seed),
                Device = p.GetValue(device)!,
            };
            // with --json stdout carries only the summary; progress goes to stderr as plain lines
            var progress = asJson ? new PlainProgress(p.InvocationConfiguration.Error) : TrainCommands.Progress(o);
            if (!asJson)
            {
                string what = m == "mixlora"
                    ? $"a MixLoRA adapter ({options.NumExperts} experts, top-2, r={options.Rank}, all seven projections)"
                    : $"a LoRA adapter (r={options.Rank}, every linear layer)";
                o.WriteLine($"LoraMix quickstart: teach {Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(options.ModelDir)))} " +
                            $"{string.Join(", ", options.EffectiveFamilies.Select(f => $"'{f}'"))} with {what}, " +
                            $"{options.EffectiveSteps} steps x {options.BatchSize} sequences");
            }
            var r = Quickstart.Run(options, progress);
            if (asJson)
            {
                o.WriteLine(r.ToJson().ToJsonString(Json));
                return 0;
            }
            var inv = CultureInfo.InvariantCulture;
            o.WriteLine();
            o.WriteLine(string.Create(inv, $"exact match on {r.After.Total} held-out examples (test split, {options.EvalExamples} per family):"));
            o.WriteLine(string.Create(inv, $"  {"family",-14} {"base model",15} {"with adapter",15}"));
            foreach (var f in r.Families)
            {
                var (bc, bt) = r.Before.ByFamily.GetValueOrDefault(f);
                var (ac, at) = r.After.ByFamily.GetValueOrDefault(f);
                o.WriteLine(string.Create(inv, $"  {f,-14} {Pct(bc, bt),15} {Pct(ac, at),15}"));
            }
            if (r.Families.Count > 1)
                o.WriteLine(string.Create(inv, $"  {"all",-14} {Pct(r.Before.Correct, r.Before.Total),15} {Pct(r.After.Correct, r.After.Total),15}"));
            if (r.Specialisation is { } spec)
            {
                o.WriteLine();
                o.WriteLine("do experts specialise by task? I(family; top expert) on answer tokens, per layer:");
                foreach (var s in spec)
                    o.WriteLine(string.Create(inv, $"  layer {s.Layer}: {s.MutualInformationBits:F2} of at most {s.MaxBits:F2} bits; ") +
                        string.Join("; ", s.LoadByFamily.Select(kv => $"{kv.Key} -> expert {Array.IndexOf(kv.Value, kv.Value.Max())} ({kv.Value.Max().ToString("P0", inv)})")));
            }
            o.WriteLine();
            o.WriteLine("example (never seen in training):");
            foreach (var msg in r.Example.Record.PromptMessages)
                o.WriteLine($"  {msg.Role.ToString().ToLowerInvariant(),-9} {Quote(msg.Content)}");
            o.WriteLine($"  expected  {Quote(r.Example.Record.ExpectedAnswer!)}");
            o.WriteLine($"  base      {Quote(r.ExampleBefore)}");
            o.WriteLine($"  adapter   {Quote(r.Example.Output)}");
            o.WriteLine();
            o.WriteLine($"adapter:     {r.AdapterDir} " + (m == "mixlora"
                ? "(MoE-PEFT MixLoRA: adapter_config.json + adapter_model.bin + adapter_model.safetensors)"
                : "(PEFT LoRA: adapter_config.json + adapter_model.safetensors)"));
            o.WriteLine($"metrics:     {r.MetricsPath}");
            o.WriteLine($"loss curve:  {r.LossPlotPath}");
            if (r.ExpertLoadPlotPath is not null) o.WriteLine($"expert load: {r.ExpertLoadPlotPath}");
            o.WriteLine(string.Create(inv, $"done in {r.Seconds:F0} s (training {r.TrainSeconds:F0} s)."));
            o.WriteLine($"next:        {CliApp.Invocation} chat --model {r.ModelDir} --adapter {r.AdapterDir}");
            return 0;
        });
        return cmd;
    }

    private const string HardenedMethod = "hardened";
    private const string XLoraMethod = "xlora";

    /// <summary><c>--method xlora</c>: a LoRA per family, an X-LoRA head over them, every variant scored.</summary>
    private static int RunXLora(ParseResult p, TextWriter o, bool asJson, XLoraQuickstartOptions options)
    {
        var progress = asJson ? new PlainProgress(p.InvocationConfiguration.Error) : TrainCommands.Progress(o);
        if (!asJson)
            o.WriteLine($"LoraMix quickstart (X-LoRA): one LoRA per family ({string.Join(", ", options.EffectiveFamilies.Select(f => $"'{f}'"))}; r={options.Rank}, " +
                        $"{options.ExpertSteps} steps each), then an X-LoRA head over the frozen LoRAs, {options.HeadSteps} steps x {options.BatchSize} on the families mixed");
        var r = XLoraQuickstart.Run(options, progress);
        if (asJson)
        {
            o.WriteLine(r.ToJson().ToJsonString(Json));
            return 0;
        }
        var inv = CultureInfo.InvariantCulture;
        o.WriteLine();
        o.WriteLine(string.Create(inv, $"exact match on {r.XLora.Total} held-out examples (test split, {options.EvalExamples} per family):"));
        o.WriteLine($"  {"variant",-22} " + string.Join(" ", r.Families.Select(f => $"{f,12}")) + $" {"mixture",9}");
        foreach (var v in r.Scores)
        {
            string row = string.Join(" ", r.Families.Select(f => $"{Pct(v.Report.ByFamily.GetValueOrDefault(f).Correct, v.Report.ByFamily.GetValueOrDefault(f).Total),12}"));
            o.WriteLine($"  {v.Name,-22} {row} {Pct(v.Report.Correct, v.Report.Total),9}");
        }
        o.WriteLine(string.Create(inv, $"X-LoRA {r.XLora.Accuracy:P1} on the mixture vs the best single LoRA ({r.BestSingle.Name}) {r.BestSingle.Report.Accuracy:P1}"));
        o.WriteLine();
        o.WriteLine($"x-lora:      {r.XLoraDir} (PEFT X-LoRA: adapter_config.json + adapter_model.safetensors + one LoRA directory per expert)");
        o.WriteLine($"experts:     {string.Join(", ", r.ExpertDirs.Select((d, i) => d + (r.ExpertsReused[i] ? " (reused)" : "")))}");
        foreach (var png in r.ScalingPlots) o.WriteLine($"scalings:    {png}");
        o.WriteLine($"metrics:     {r.MetricsPath}");
        o.WriteLine($"loss curve:  {r.LossPlotPath}");
        o.WriteLine(string.Create(inv, $"done in {r.Seconds:F0} s (experts {r.ExpertSeconds:F0} s, head {r.HeadSeconds:F0} s)."));
        o.WriteLine($"next:        {CliApp.Invocation} inspect-scalings --model {r.ModelDir} --adapter {r.XLoraDir} --prompt \"...\" --out out/scalings");
        return 0;
    }

    /// <summary><c>--method hardened</c>: the security benchmark's hierarchy-trained conditions under the free and the
    /// privileged router policy (<see cref="SecurityEval"/> with <c>trainings: [hierarchy]</c>), side by side.</summary>
    private static int RunHardened(ParseResult p, TextWriter o, bool asJson, string modelDir, string? outDir, int? steps, int batch, long seed, string device)
    {
        var options = new SecurityEvalOptions
        {
            ModelDir = modelDir,
            OutputDir = outDir ?? Path.Combine("out", "quickstart-hardened"),
            Trainings = ["hierarchy"],
            Steps = steps ?? 250,
            BatchSize = batch,
            Seed = seed,
            Device = device,
            TestClean = 64,
            TestInjectedPerCase = 12,
        };
        var progress = asJson ? new PlainProgress(p.InvocationConfiguration.Error) : TrainCommands.Progress(o);
        if (!asJson)
            o.WriteLine($"LoraMix quickstart (hardened): train MixLoRA adapters ({options.NumExperts} experts, top-{options.TopK}, r={options.Rank}) " +
                        $"on {string.Join(", ", options.Families)} with context-ignorance examples, once with router_policy free and once " +
                        $"privileged ({options.Steps} steps x {options.BatchSize} each), then attack both with injected data messages");
        var r = SecurityEval.Run(options, progress);
        var byPolicy = r.Conditions.ToDictionary(c => c.RouterPolicy);
        if (asJson)
        {
            var summary = new System.Text.Json.Nodes.JsonObject();
            foreach (var c in r.Conditions)
                summary[c.RouterPolicy] = new System.Text.Json.Nodes.JsonObject
                {
                    ["utility"] = Math.Round(c.Clean.Correct.Rate, 4),
                    ["attack_success"] = Math.Round(c.Injected.FollowedInjection.Rate, 4),
                    ["neither"] = Math.Round(c.Injected.Neither.Rate, 4),
                    ["utility_ci95"] = new System.Text.Json.Nodes.JsonArray(Math.Round(c.Clean.Correct.Low, 4), Math.Round(c.Clean.Correct.High, 4)),
                    ["attack_success_ci95"] = new System.Text.Json.Nodes.JsonArray(
                        Math.Round(c.Injected.FollowedInjection.Low, 4), Math.Round(c.Injected.FollowedInjection.High, 4)),
                    ["adapter_dir"] = c.AdapterDir,
                };
            summary["clean_cases"] = r.Conditions[0].Clean.Correct.Total;
            summary["injected_cases"] = r.Conditions[0].Injected.FollowedInjection.Total;
            summary["seconds"] = Math.Round(r.Seconds, 1);
            summary["results"] = r.ResultsJsonPath;
            summary["heatmap_free"] = r.HeatmapFreePath;
            summary["heatmap_privileged"] = r.HeatmapPrivilegedPath;
            o.WriteLine(summary.ToJsonString(Json));
            return 0;
        }
        o.WriteLine();
        o.WriteLine($"{"router policy",-14} {"utility (clean)",-28} {"attack success (injected)",-28} neither");
        foreach (var policy in SecurityEval.Policies)
        {
            var c = byPolicy[policy];
            o.WriteLine($"{policy,-14} {c.Clean.Correct.ToMarkdown(),-28} {c.Injected.FollowedInjection.ToMarkdown(),-28} {c.Injected.Neither.ToMarkdown()}");
        }
        o.WriteLine();
        o.WriteLine("The privileged router freezes expert choice from the first untrusted token (exact, tested); the injected text still");
        o.WriteLine("reaches the output through attention, so attack success measures the whole model, not the router (docs/SECURITY.md).");
        o.WriteLine($"results:     {r.ResultsJsonPath} and {r.ResultsMarkdownPath}");
        if (r.HeatmapFreePath is not null) o.WriteLine($"heatmaps:    {r.HeatmapFreePath}, {r.HeatmapPrivilegedPath}");
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"done in {r.Seconds:F0} s."));
        return 0;
    }

    private static string Pct(int correct, int total) =>
        total == 0 ? "-" : string.Create(CultureInfo.InvariantCulture, $"{(double)correct / total:P0} ({correct}/{total})");

    private static string Quote(string s) => JsonSerializer.Serialize(s, Json);
}
