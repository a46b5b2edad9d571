using System.CommandLine;
using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Configuration;
using LoraMix.Evaluation;
using LoraMix.Modeling;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Cli;

/// <summary><c>loramix security-eval --config FILE</c>: the prompt-injection benchmark (a thin wrapper over <see cref="SecurityEval"/>).</summary>
internal static class SecurityEvalCommand
{
    private static readonly JsonSerializerOptions Json = new() { WriteIndented = false, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static Command Create()
    {
        var config = new Option<string>("--config", "-c") { Description = "The benchmark config: a YAML or JSON file (see examples/security-eval.yaml).", Required = true };
        var set = new Option<string[]>("--set") { Description = "Override a key: --set steps=5 (repeatable; the value is YAML).", AllowMultipleArgumentsPerToken = false };
        var json = new Option<bool>("--json") { Description = "Print results.json on stdout (progress goes to stderr)." };
        var cmd = new Command("security-eval",
            "Prompt-injection benchmark on the task world: train MixLoRA adapters for {free, privileged} router policy x {plain, hierarchy} " +
            "training, measure utility, attack success and neither with 95% intervals; write results.json, results.md and routing heatmaps.")
        {
            config, set, json,
        };
        cmd.SetAction(p =>
        {
            var o = p.InvocationConfiguration.Output;
            bool asJson = p.GetValue(json);
            var doc = ConfigDocument.Load(p.GetValue(config)!, p.GetValue(set) ?? []);
            var options = SecurityEvalOptions.Parse(doc, EmbeddedModel.Locate());
            var progress = asJson ? new PlainProgress(p.InvocationConfiguration.Error) : TrainCommands.Progress(o);
            var r = SecurityEval.Run(options, progress);
            if (asJson)
            {
                o.WriteLine(r.ToJson().ToJsonString(Json));
                return 0;
            }
            o.WriteLine();
            o.Write(r.ToMarkdown());
            o.WriteLine();
            o.WriteLine($"results:  {r.ResultsJsonPath}");
            o.WriteLine($"table:    {r.ResultsMarkdownPath}");
            if (r.HeatmapFreePath is not null) o.WriteLine($"heatmaps: {r.HeatmapFreePath}, {r.HeatmapPrivilegedPath}");
            o.WriteLine($"done in {r.Seconds:F0} s.");
            return 0;
        });
        return cmd;
    }
}
