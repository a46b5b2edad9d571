using System.CommandLine;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tokenization;
using LoraMix.Torch;
using LoraMix.Training;
using LoraMix.Workflows;

namespace LoraMix.Cli;

/// <summary>Verbs that train, evaluate and merge: train, pretrain, eval, merge (thin wrappers over
/// <see cref="TrainingRecipe"/>, <see cref="Trainer.Evaluate(LlamaForCausalLM, IReadOnlyList{TrainingExample}, int, int, int, ITrainingObjective?)"/>,
/// <see cref="ExactMatchEvaluator"/> and <see cref="LoraAdapters.ExportMerged"/>).</summary>
internal static class TrainCommands
{
    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private sealed class RecipeOptions
    {
        public Option<string> Config { get; } = new("--config", "-c") { Description = "The recipe: a YAML or JSON file (see README, Fine-tuning).", Required = true };
        public Option<string[]> Set { get; } = new("--set") { Description = "Override a key: --set learning_rate=1e-4 --set adapter.r=16 (repeatable; the value is YAML).", AllowMultipleArgumentsPerToken = false };
        public Option<string?> Resume { get; } = new("--resume")
        {
            Description = "Continue from a checkpoint: a checkpoint directory, or 'latest' (the default when no value is given) for the newest in output_dir.",
            Arity = ArgumentArity.ZeroOrOne,
        };

        public IEnumerable<Option> All => [Config, Set, Resume];

        public TrainingRecipe Load(ParseResult p)
        {
            var overrides = (p.GetValue(Set) ?? []).ToList();
            if (p.GetResult(Resume) is not null)
                overrides.Add("resume_from_checkpoint=" + (p.GetValue(Resume) is { Length: > 0 } dir ? dir : "latest"));
            return TrainingRecipe.Load(p.GetValue(Config)!, overrides);
        }
    }

    internal static ITrainingProgress Progress(TextWriter output) =>
        ReferenceEquals(output, Console.Out) ? TrainingProgress.ForConsole() : new PlainProgress(output);

    public static Command Train()
    {
        var recipe = new RecipeOptions();
        var cmd = new Command("train", "Fine-tune from a recipe: a LoRA, MixLoRA or full fine-tune of a model (or pre-training with model_init).");
        foreach (var o in recipe.All) cmd.Options.Add(o);
        cmd.SetAction(p =>
        {
            var r = recipe.Load(p);
            var output = p.InvocationConfiguration.Output;
            var result = r.Run(Progress(output));
            PrintWritten(output, r, result);
            return 0;
        });
        return cmd;
    }

    public static Command Pretrain()
    {
        var recipe = new RecipeOptions();
        var cmd = new Command("pretrain", "Pre-train a model from scratch (a recipe with model_init) into a complete Hugging Face model directory, " +
                                          "then write pretrain_report.json (exact match per task family on the test split).");
        foreach (var o in recipe.All) cmd.Options.Add(o);
        cmd.SetAction(p =>
        {
            var r = recipe.Load(p);
            if (r.ModelInit is null)
                throw new LoraMixException($"{r.Source}: pretrain needs 'model_init' (an architecture to train from scratch); to fine-tune an existing model use 'loramix train'");
            var output = p.InvocationConfiguration.Output;
            var progress = Progress(output);
            var result = r.Run(progress);
            r.WritePretrainReport(result, progress);
            PrintWritten(output, r, result);
            output.WriteLine($"report:      {Path.Combine(result.ModelDir, PretrainReport.FileName)}");
            return 0;
        });
        return cmd;
    }

    private static void PrintWritten(TextWriter o, TrainingRecipe r, RecipeResult result)
    {
        var method = r.AdapterMethod;
        string what = method is not null ? "adapter:     " : "model:       ";
        o.WriteLine($"{what}{result.OutputDir} ({method?.OutputDescription ?? "Hugging Face model directory"})");
        o.WriteLine($"metrics:     {result.MetricsPath}");
        o.WriteLine($"loss curve:  {result.LossPlotPath}");
        if (result.Training.Checkpoints.Count > 0) o.WriteLine($"checkpoints: {string.Join(", ", result.Training.Checkpoints)}");
        if (result.Skipped.Count > 0) o.WriteLine($"skipped:     {result.Skipped.Count} bad record(s) (skip_bad)");
        if (result.ExactMatch is { } em)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"exact match: {em.Accuracy:P1} ({em.Correct}/{em.Total}) on the evaluation set"));
        string next = result.AdapterDir is not null
            ? $"{CliApp.Invocation} chat --model {result.ModelDir} --adapter {result.AdapterDir}"
            : $"{CliApp.Invocation} chat --model {result.ModelDir}";
        o.WriteLine($"next:        {next}");
    }

    public static Command Eval()
    {
        var model = ModelCommands.ModelOption();
        var adapters = new AdapterOptions();
        var dataset = new Option<string>("--dataset", "-d") { Description = "A dataset file (alpaca, chat, ShareGPT or text; .json, .jsonl or .txt).", Required = true };
        var template = new Option<string?>("--template") { Description = $"Chat template: {string.Join(", ", ChatTemplate.Names)} (default: from tokenizer_config.json)." };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Generation budget for exact match (default 64).", DefaultValueFactory = _ => 64 };
        var cutoff = new Option<int>("--cutoff-len") { Description = "Truncate sequences for the loss to this many tokens (default 1024).", DefaultValueFactory = _ => 1024 };
        var batch = new Option<int>("--batch-size") { Description = "Sequences per batch (default 8).", DefaultValueFactory = _ => 8 };
        var skipBad = new Option<bool>("--skip-bad") { Description = "Skip and count bad records instead of failing." };
        var noExact = new Option<bool>("--no-exact-match") { Description = "Only loss and perplexity (no generation)." };
        var json = new Option<bool>("--json") { Description = "Print the results as one JSON object." };
        var device = ModelCommands.DeviceOption();
        var dtype = ModelCommands.DTypeOption("f32");
        var router = new RoutingCommands.RouterPolicyOptions();
        var cmd = new Command("eval", "Evaluate a model (and adapter) on a dataset: loss, perplexity, and exact match overall and per family when records have answers.")
        {
            model, adapters.Adapter, adapters.Use, dataset, template, maxNew, cutoff, batch, skipBad, noExact, json, device, dtype, router.Policy, router.Snapshot,
        };
        cmd.SetAction(p =>
        {
            string file = p.GetValue(dataset)!;
            var data = DatasetReader.Load(file, DatasetFormat.Auto, p.GetValue(skipBad));   // bad input fails before the model loads
            using var engine = router.LoadEngine(p, p.GetValue(model)!, adapters, p.GetValue(device)!, p.GetValue(dtype)!,
                p.GetValue(template));
            var skipped = data.Skipped.ToList();
            var rendered = TrainingData.FromRecords(data.Records, engine.Renderer, trainOnPrompt: false, p.GetValue(skipBad), file, skipped);
            var loss = Trainer.Evaluate(engine.Model, [.. rendered.Select(r => r.Example)], p.GetValue(cutoff), p.GetValue(batch),
                objective: new CausalLmObjective(engine.RouterPolicyOverride), adapters: AdapterSelection.Of(engine.DefaultAdapters));
            ExactMatchReport? exact = null;
            var answerable = rendered.Select(r => r.Record).Where(r => r.Messages is not null && r.ExpectedAnswer is not null).ToList();
            if (!p.GetValue(noExact) && answerable.Count > 0)
                exact = ExactMatchEvaluator.Evaluate(engine, answerable, p.GetValue(maxNew), batchSize: Math.Max(1, p.GetValue(batch)));

            var o = p.InvocationConfiguration.Output;
            if (p.GetValue(json))
            {
                var obj = new JsonObject
                {
                    ["model"] = Path.GetFullPath(p.GetValue(model)!),
                    ["adapters"] = new JsonArray([.. engine.LoadedAdapters.Select(a => (JsonNode)JsonValue.Create(Path.GetFullPath(a.Directory))!)]),
                    ["dataset"] = Path.GetFullPath(file),
                    ["examples"] = rendered.Count,
                    ["skipped"] = skipped.Count,
                    ["loss"] = loss.Loss,
                    ["perplexity"] = double.IsFinite(loss.Perplexity) ? loss.Perplexity : null,
                    ["target_tokens"] = loss.TargetTokens,
                    ["exact_match"] = exact?.Accuracy,
                    ["exact_match_count"] = exact?.Total,
                };
                if (exact is not null)
                {
                    var by = new JsonObject();
                    foreach (var (k, v) in exact.AccuracyByFamily) by[k] = v;
                    obj["exact_match_by_family"] = by;
                }
                o.WriteLine(obj.ToJsonString(Json));
                return 0;
            }
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"examples:    {rendered.Count}{(skipped.Count > 0 ? $" ({skipped.Count} bad record(s) skipped)" : "")}"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"loss:        {loss.Loss:F4} over {loss.TargetTokens} target tokens"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"perplexity:  {loss.Perplexity:F3}"));
            if (exact is not null)
            {
                o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"exact match: {exact.Accuracy:P1} ({exact.Correct}/{exact.Total})"));
                if (exact.ByFamily.Count > 1 || !exact.ByFamily.ContainsKey("all"))
                    foreach (var (family, (c, t)) in exact.ByFamily)
                        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {family,-16} {(t == 0 ? 0 : (double)c / t):P1} ({c}/{t})"));
            }
            return 0;
        });
        return cmd;
    }

    public static Command Merge()
    {
        var model = ModelCommands.ModelOption();
        var adapter = new Option<string>("--adapter") { Description = "A PEFT LoRA adapter directory.", Required = true };
        var output = new Option<string>("--out", "-o") { Description = "Output directory: a Hugging Face model with the adapter folded into its weights.", Required = true };
        var dtype = new Option<string?>("--dtype") { Description = "Dtype of the merged weights: f32, bf16 or f16 (default: the base model's)." };
        var overwrite = new Option<bool>("--overwrite")
        {
            Description = "Replace --out when it already exists and is not empty (the old directory is swapped out only once the new one is complete).",
        };
        var cmd = new Command("merge", "Fold a LoRA adapter into the base weights and write a standalone Hugging Face model directory (tokenizer files copied). " +
                                       "The directory is built beside --out and renamed into place when complete, so a failure leaves no partial output.")
        {
            model, adapter, output, dtype, overwrite,
        };
        cmd.SetAction(p =>
        {
            string baseDir = p.GetValue(model)!, adapterDir = p.GetValue(adapter)!, outDir = p.GetValue(output)!;
            if (AdapterMethods.Detect(adapterDir) == AdapterMethods.MixLora)
                throw new LoraMixException($"{adapterDir} is a MixLoRA adapter, which cannot be merged into the base weights: its router picks " +
                                           "different experts for every token, so there is no single weight update to fold in. " +
                                           $"Serve it with --adapter instead (e.g. ./loramix chat --model {baseDir} --adapter {adapterDir})");
            if (Path.GetFullPath(outDir) == Path.GetFullPath(baseDir))
                throw new LoraMixException("--out must differ from --model (the base model is not overwritten)");
            string outFull = Path.TrimEndingDirectorySeparator(Path.GetFullPath(outDir));
            foreach (var (flag, input) in new[] { ("--model", baseDir), ("--adapter", adapterDir) })
                if (IsSameOrInside(Path.GetFullPath(input), outFull))
                    throw new LoraMixException($"--out {outDir} contains {flag} {input}; replacing it would delete the input, so choose another --out");
            if (File.Exists(outFull))
                throw new LoraMixException($"--out {outDir} is an existing file; give a directory");
            if (Directory.Exists(outFull) && Directory.EnumerateFileSystemEntries(outFull).Any() && !p.GetValue(overwrite))
                throw new LoraMixException($"--out {outDir} already exists and is not empty; pass --overwrite to replace it (it is replaced only once the merged model is complete), or choose another directory");
            TorchRuntime.EnsureLoaded();
            var dt = p.GetValue(dtype) is { } d ? TorchRuntime.ParseDType(d) : (TorchSharp.torch.ScalarType?)null;
            using var m = LlamaForCausalLM.FromPretrained(baseDir);
            LoraAdapters.Load(m, adapterDir);
            IReadOnlyList<string> copied = [];
            AtomicDirectory.Write(outFull, temp =>
            {
                LoraAdapters.ExportMerged(m, temp, dtype: dt);
                copied = TokenizerFiles.CopyTo(baseDir, temp);
            }, overwrite: true);
            p.InvocationConfiguration.Output.WriteLine($"merged {adapterDir} into {baseDir}: wrote {Path.GetFullPath(outDir)}" +
                                                       (copied.Count > 0 ? $" (with {string.Join(", ", copied)})" : ""));
            return 0;
        });
        return cmd;
    }

    /// <summary>True when <paramref name="path"/> is <paramref name="directory"/> or lies below it (full paths).</summary>
    private static bool IsSameOrInside(string path, string directory)
    {
        string p = Path.TrimEndingDirectorySeparator(path), d = Path.TrimEndingDirectorySeparator(directory);
        var cmp = OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        return p.Equals(d, cmp) || p.StartsWith(d + Path.DirectorySeparatorChar, cmp);
    }
}
