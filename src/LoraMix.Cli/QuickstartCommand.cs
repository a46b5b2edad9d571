using System.CommandLine;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Data;
using LoraMix.Modeling;
using LoraMix.Training;

namespace LoraMix.Cli;

/// <summary><c>loramix quickstart</c>: fine-tune an adapter on the embedded model for a task family it never saw and show
/// exact match before and after (a thin wrapper over <see cref="Quickstart"/>).</summary>
internal static class QuickstartCommand
{
    private static readonly JsonSerializerOptions Json = new() { WriteIndented = false, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static Command Create()
    {
        var method = new Option<string>("--method") { Description = $"Adapter method: {string.Join(", ", QuickstartOptions.Methods)}.", DefaultValueFactory = _ => "lora" };
        method.AcceptOnlyFromAmong([.. QuickstartOptions.Methods]);
        var json = new Option<bool>("--json") { Description = "Print the summary as one JSON object on stdout (progress goes to stderr)." };
        var model = new Option<string?>("--model", "-m") { Description = $"Base model directory (default: the embedded models/{EmbeddedModel.Name})." };
        var output = new Option<string?>("--out", "-o") { Description = "Output directory for the adapter, metrics and loss curve (default: out/quickstart-METHOD; replaced)." };
        var family = new Option<string>("--family") { Description = $"Task family to learn (default: {TaskWorld.HeldOutFamilies[0]}, held out of the base model's pre-training).", DefaultValueFactory = _ => TaskWorld.HeldOutFamilies[0] };
        family.AcceptOnlyFromAmong([.. TaskWorld.Families]);
        var steps = new Option<int>("--steps") { Description = "Training steps (default 150).", DefaultValueFactory = _ => 150 };
        var batch = new Option<int>("--batch-size") { Description = "Sequences per step (default 16).", DefaultValueFactory = _ => 16 };
        var evalCount = new Option<int>("--eval-examples") { Description = "Test-split examples scored before and after (default 64).", DefaultValueFactory = _ => 64 };
        var seed = new Option<long>("--seed") { Description = "Training seed (default 42).", DefaultValueFactory = _ => 42 };
        var device = ModelCommands.DeviceOption();
        var cmd = new Command("quickstart",
            $"Fine-tune a LoRA adapter on the embedded {EmbeddedModel.Name} for a task family it never saw; print exact match before and after, " +
            "an example and where the adapter, metrics and loss curve are.")
        {
            method, json, model, output, family, steps, batch, evalCount, seed, device,
        };
        cmd.SetAction(p =>
        {
            var o = p.InvocationConfiguration.Output;
            bool asJson = p.GetValue(json);
            string m = p.GetValue(method)!;
            var options = new QuickstartOptions
            {
                ModelDir = p.GetValue(model) ?? EmbeddedModel.Locate(),
                OutputDir = p.GetValue(output) ?? Path.Combine("out", $"quickstart-{m}"),
                Method = m,
                Family = p.GetValue(family)!,
                Steps = p.GetValue(steps),
                BatchSize = p.GetValue(batch),
                EvalExamples = p.GetValue(evalCount),
                Seed = p.GetValue(seed),
                Device = p.GetValue(device)!,
            };
            // with --json stdout carries only the summary; progress goes to stderr as plain lines
            var progress = asJson ? new PlainProgress(p.InvocationConfiguration.Error) : TrainCommands.Progress(o);
            if (!asJson)
                o.WriteLine($"LoraMix quickstart: teach {Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(options.ModelDir)))} " +
                            $"the '{options.Family}' task with a {m.ToUpperInvariant()} adapter (r={options.Rank}, every linear layer), " +
                            $"{options.Steps} steps x {options.BatchSize} sequences");
            var r = Quickstart.Run(options, progress);
            if (asJson)
            {
                o.WriteLine(r.ToJson().ToJsonString(Json));
                return 0;
            }
            var inv = CultureInfo.InvariantCulture;
            o.WriteLine();
            o.WriteLine(string.Create(inv, $"exact match on {r.After.Total} held-out '{r.Family}' examples (test split):"));
            o.WriteLine(string.Create(inv, $"  base model     {r.Before.Accuracy,7:P1}  ({r.Before.Correct}/{r.Before.Total})"));
            o.WriteLine(string.Create(inv, $"  with adapter   {r.After.Accuracy,7:P1}  ({r.After.Correct}/{r.After.Total})"));
            o.WriteLine();
            o.WriteLine("example (never seen in training):");
            foreach (var msg in r.Example.Record.PromptMessages)
                o.WriteLine($"  {msg.Role.ToString().ToLowerInvariant(),-9} {Quote(msg.Content)}");
            o.WriteLine($"  expected  {Quote(r.Example.Record.ExpectedAnswer!)}");
            o.WriteLine($"  base      {Quote(r.ExampleBefore)}");
            o.WriteLine($"  adapter   {Quote(r.Example.Output)}");
            o.WriteLine();
            o.WriteLine($"adapter:     {r.AdapterDir} (PEFT LoRA: adapter_config.json + adapter_model.safetensors)");
            o.WriteLine($"metrics:     {r.MetricsPath}");
            o.WriteLine($"loss curve:  {r.LossPlotPath}");
            o.WriteLine(string.Create(inv, $"done in {r.Seconds:F0} s (training {r.TrainSeconds:F0} s)."));
            o.WriteLine($"next:        ./loramix chat --model {r.ModelDir} --adapter {r.AdapterDir}");
            return 0;
        });
        return cmd;
    }

    private static string Quote(string s) => JsonSerializer.Serialize(s, Json);
}
