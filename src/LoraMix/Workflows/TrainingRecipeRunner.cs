using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Adapters.XLora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using LoraMix.Torch;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Workflows;

/// <summary>The per-family exact-match of a pre-trained model on the task world's test split (<c>pretrain_report.json</c>).</summary>
public sealed record PretrainReport(string ModelDir, long Parameters, IReadOnlyList<string> TrainedFamilies, int SamplesPerFamily,
    double ExactMatch, IReadOnlyDictionary<string, double> ExactMatchByFamily, double? FinalTrainLoss, double? FinalEvalLoss, int Steps,
    double TrainSeconds)
{
    /// <summary>The report's file name in the model directory.</summary>
    public const string FileName = "pretrain_report.json";

    public JsonObject ToJson()
    {
        var byFamily = new JsonObject();
        foreach (var (k, v) in ExactMatchByFamily) byFamily[k] = Math.Round(v, 4);
        return new JsonObject
        {
            ["model_dir"] = ModelDir,
            ["parameters"] = Parameters,
            ["split"] = "test",
            ["samples_per_family"] = SamplesPerFamily,
            ["trained_families"] = new JsonArray([.. TrainedFamilies.Select(f => (JsonNode)JsonValue.Create(f)!)]),
            ["exact_match"] = Math.Round(ExactMatch, 4),
            ["exact_match_by_family"] = byFamily,
            ["final_train_loss"] = FinalTrainLoss is double l && double.IsFinite(l) ? Math.Round(l, 5) : null,
            ["final_eval_loss"] = FinalEvalLoss is double e && double.IsFinite(e) ? Math.Round(e, 5) : null,
            ["steps"] = Steps,
            ["train_seconds"] = Math.Round(TrainSeconds, 1),
        };
    }
}

/// <summary>Runs a <see cref="TrainingRecipe"/> (see <see cref="TrainingRecipe.Run"/>).</summary>
internal static class TrainingRecipeRunner
{
    public const string EvalResultsFile = "eval_results.json";
    public const string RoutingStatsFile = "routing_stats.json";

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static RecipeResult Run(TrainingRecipe r, ITrainingProgress progress, CancellationToken cancellationToken)
    {
        TorchRuntime.EnsureLoaded();
        var options = r.Trainer;
        string outDir = Path.GetFullPath(options.OutputDir);
        var device = TorchRuntime.ParseDevice(r.Device);
        var dtype = options.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32;

        // ---- dataset files: read and checked before anything is written, so a bad file leaves no output behind
        var files = new Dictionary<(string, DatasetFormat), Dataset>();
        foreach (var spec in new[] { r.Dataset, r.EvalDataset })
            foreach (var file in spec?.Files ?? [])
                if (!files.ContainsKey((file, spec!.Format))) files[(file, spec.Format)] = DatasetReader.Load(file, spec.Format, r.SkipBad);

        // ---- tokenizer (and, from scratch, the architecture)
        TextTokenizer tokenizer;
        LlamaConfig? initConfig = null;
        if (r.ModelInit is { } init)
        {
            Directory.CreateDirectory(outDir);
            if (init.TrainTokenizer is { } bpe) TrainTokenizer(r, bpe, outDir, progress, files, cancellationToken);
            else if (init.Tokenizer == "byte-level") ByteLevelTokenizerFiles.Write(outDir, modelMaxLength: init.Architecture.MaxPositionEmbeddings);
            else TokenizerFiles.CopyTo(init.Tokenizer, outDir);
            tokenizer = TextTokenizer.FromDirectory(outDir);
            initConfig = Architecture(init, tokenizer, r.Source);
        }
        else
        {
            string dir = r.ModelPath!;
            if (!Directory.Exists(dir)) throw new LoraMixException($"{r.Source}: 'model': directory '{dir}' does not exist");
            if (!ChatEngine.HasTokenizerFiles(dir))
                throw new TokenizerFileException(dir, null, "no tokenizer.json or tokenizer.model: training on text needs the model's tokenizer");
            tokenizer = TextTokenizer.FromDirectory(dir);
        }
        var renderer = new ChatRenderer(tokenizer, r.Template is null ? null : ChatTemplate.Parse(r.Template));

        // ---- data
        var skipped = new List<string>();
        var train = LoadData(r.Dataset, r, renderer, skipped, files);
        if (r.MaxSamples > 0 && train.Count > r.MaxSamples) train = train.Take(r.MaxSamples).ToList();
        var valid = new List<RenderedRecord>();
        if (r.EvalDataset is { } evalSpec) valid = LoadData(evalSpec, r, renderer, skipped, files);
        else if (r.ValSize > 0)
        {
            var (t, v) = DatasetReader.Split(train, r.ValSize, (int)options.Seed);
            train = [.. t];
            valid = [.. v];
        }
        if (skipped.Count > 0)
            progress.Info($"skip_bad: {skipped.Count} bad record(s) skipped; the first: {skipped[0]}");

        // ---- model, target, objective; train
        var model = initConfig is not null ? new LlamaForCausalLM(initConfig, device, dtype) : LlamaForCausalLM.FromPretrained(r.ModelPath!, device, dtype);
        TrainingResult result;
        IReadOnlyList<LayerRoutingStatistics>? routing = null;
        try
        {
            if (r.ModelInit is { } mi) ModelPresets.InitializeRandom(model, mi.Seed);
            TrainingTarget target;
            ITrainingObjective? objective = null;
            MixLoraObjective? mixObjective = null;
            switch (r.Method)
            {
                case RecipeMethod.Lora:
                    LoraAdapters.Attach(model, r.Lora!, seed: options.Seed);
                    target = TrainingTarget.Lora(model, r.Lora!);
                    break;
                case RecipeMethod.MixLora:
                    var mixConfig = MixLoraAdapters.Attach(model, r.MixLora!, seed: options.Seed);
                    target = TrainingTarget.MixLora(model, mixConfig);
                    objective = mixObjective = new MixLoraObjective(mixConfig);
                    break;
                case RecipeMethod.XLora:
                    var xconfig = r.XLora!.HiddenSize == 0 ? r.XLora with { HiddenSize = model.Config.HiddenSize } : r.XLora;
                    var xlora = XLoraAdapters.Create(model, xconfig, seed: options.Seed, source: r.Source + ": adapter");
                    target = TrainingTarget.XLora(model, xlora);
                    objective = new XLoraObjective();
                    break;
                default:
                    target = TrainingTarget.FullFineTune(model);
                    break;
            }
            var trainer = new Trainer(target, options, objective, progress);
            result = trainer.Train([.. train.Select(x => x.Example)], valid.Count > 0 ? [.. valid.Select(x => x.Example)] : null, cancellationToken);
            if (mixObjective is not null && valid.Count > 0) routing = mixObjective.EvalStatistics.Result();
        }
        finally
        {
            model.Dispose();
        }

        // ---- complete the output directory
        string? adapterDir = r.Method == RecipeMethod.Full ? null : outDir;
        string modelDir = r.Method == RecipeMethod.Full ? outDir : Path.GetFullPath(r.ModelPath!);
        if (initConfig is not null) WriteGenerationConfig(outDir, initConfig);
        else if (r.Method == RecipeMethod.Full) TokenizerFiles.CopyTo(r.ModelPath!, outDir);
        if (routing is not null)
        {
            AtomicFile.WriteAllText(Path.Combine(outDir, RoutingStatsFile), RoutingJson(routing).ToJsonString(Indented));
            foreach (var l in routing)
                progress.Info(string.Create(CultureInfo.InvariantCulture,
                    $"routing layer {l.Layer}: entropy {l.Entropy:F3} nats, expert load [{string.Join(", ", l.ExpertLoad.Select(x => x.ToString("F3", CultureInfo.InvariantCulture)))}]"));
        }

        // ---- exact match through the engine, on what was saved
        ExactMatchReport? exact = null;
        if (r.RunsExactMatch)
        {
            var records = valid.Select(v => v.Record).Where(x => x.Messages is not null && x.ExpectedAnswer is not null).ToList();
            if (records.Count == 0) progress.Info("eval_exact_match: no evaluation record has an answer to compare with; skipped");
            else
            {
                using var engine = LoadEngine(r, modelDir, adapterDir, device, dtype);
                exact = ExactMatchEvaluator.Evaluate(engine, records, r.EvalMaxNewTokens, cancellationToken: cancellationToken);
                progress.Info(string.Create(CultureInfo.InvariantCulture, $"exact match {exact.Accuracy:P1} ({exact.Correct}/{exact.Total})")
                              + (exact.ByFamily.Count > 1 || !exact.ByFamily.ContainsKey("all")
                                  ? " — " + string.Join(", ", exact.AccuracyByFamily.Select(kv => string.Create(CultureInfo.InvariantCulture, $"{kv.Key} {kv.Value:P0}")))
                                  : ""));
            }
        }
        if (result.Evaluations.Count > 0 || exact is not null)
            AtomicFile.WriteAllText(Path.Combine(outDir, EvalResultsFile), EvalJson(result, exact).ToJsonString(Indented));

        return new RecipeResult(result, outDir, modelDir, adapterDir, train.Count, valid.Count, skipped, exact, routing);
    }

    /// <summary>Loads the trained result (base + adapter, or the trained model) in the one engine.</summary>
    internal static ChatEngine LoadEngine(TrainingRecipe r, string modelDir, string? adapterDir, Device device, ScalarType dtype) =>
        ChatEngine.Load(modelDir, new EngineOptions
        {
            Device = device, DType = dtype, Adapters = adapterDir is null ? [] : [adapterDir], Template = r.Template,
        });

    /// <summary>Evaluates a pre-trained model on every task family's test split and writes pretrain_report.json.</summary>
    public static PretrainReport WritePretrainReport(TrainingRecipe r, RecipeResult result, ITrainingProgress progress, CancellationToken cancellationToken)
    {
        var families = TaskWorld.Families;
        var placement = r.Dataset.TaskWorld is { } tw ? tw.Placement : null;
        var records = new TaskWorldSource(families, r.ReportSamplesPerFamily * families.Count, 20_24, TaskSplit.Test, placement).Records();
        var device = TorchRuntime.ParseDevice(r.Device);
        var dtype = r.Trainer.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32;
        ExactMatchReport exact;
        long parameters;
        using (var engine = LoadEngine(r, result.ModelDir, null, device, dtype))
        {
            parameters = engine.Model.parameters().Sum(p => p.numel());
            exact = ExactMatchEvaluator.Evaluate(engine, records, r.EvalMaxNewTokens, cancellationToken: cancellationToken);
        }
        var report = new PretrainReport(r.Trainer.OutputDir, parameters,   // as the recipe names it: a committed report holds no machine path
            r.Dataset.TaskWorld?.Families ?? [], r.ReportSamplesPerFamily,
            exact.Accuracy, exact.AccuracyByFamily, result.Training.Steps.Count > 0 ? result.Training.Steps[^1].Loss : null,
            result.Training.Evaluations.Count > 0 ? result.Training.Evaluations[^1].Loss : null, result.Training.GlobalStep,
            result.Training.Seconds);
        AtomicFile.WriteAllText(Path.Combine(result.ModelDir, PretrainReport.FileName), report.ToJson().ToJsonString(Indented));
        progress.Info(string.Create(CultureInfo.InvariantCulture, $"pretrain report: exact match {exact.Accuracy:P1} on the test split — ")
                      + string.Join(", ", exact.AccuracyByFamily.Select(kv => string.Create(CultureInfo.InvariantCulture, $"{kv.Key} {kv.Value:P0}"))));
        return report;
    }

    private static List<RenderedRecord> LoadData(DatasetSpec spec, TrainingRecipe r, ChatRenderer renderer, List<string> skipped,
        IReadOnlyDictionary<(string, DatasetFormat), Dataset> files)
    {
        var list = new List<RenderedRecord>();
        if (spec.TaskWorld is { } tw)
            return TrainingData.FromRecords(tw.Records(), renderer, r.TrainOnPrompt, r.SkipBad, tw.Name, skipped);
        foreach (var file in spec.Files)
        {
            var data = files[(file, spec.Format)];
            skipped.AddRange(data.Skipped);
            list.AddRange(TrainingData.FromRecords(data.Records, renderer, r.TrainOnPrompt, r.SkipBad, file, skipped));
        }
        return list;
    }

    /// <summary>
    /// Learns a byte-level BPE tokenizer from the training dataset and writes it into <paramref name="outDir"/>: the data is
    /// rendered with the chat template through a byte-level tokenizer without merges, and the text between special tokens
    /// (roles, instructions, inputs, answers) is the corpus, so the merges fit exactly what the model will be trained on.
    /// </summary>
    private static void TrainTokenizer(TrainingRecipe r, BpeTrainerOptions bpe, string outDir, ITrainingProgress progress,
        IReadOnlyDictionary<(string, DatasetFormat), Dataset> files, CancellationToken cancellationToken)
    {
        int maxLength = r.ModelInit!.Architecture.MaxPositionEmbeddings;
        ByteLevelTokenizerFiles.Write(outDir, modelMaxLength: maxLength);
        var bytes = TextTokenizer.FromDirectory(outDir);
        var renderer = new ChatRenderer(bytes, r.Template is null ? null : ChatTemplate.Parse(r.Template));
        var records = LoadData(r.Dataset, r, renderer, [], files);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var merges = BpeTrainer.Train(BpeTrainer.TextRuns(records.Select(x => x.Example.InputIds)), bpe, cancellationToken);
        ByteLevelTokenizerFiles.Write(outDir, merges, maxLength);
        progress.Info($"tokenizer: byte-level BPE learnt from {records.Count} training records: {merges.Count} merges, " +
                      $"vocabulary {ByteLevelTokenizerFiles.VocabSize(merges.Count)} ({clock.Elapsed.TotalSeconds:F1} s)");
    }

    private static LlamaConfig Architecture(ModelInitSpec init, TextTokenizer tokenizer, string source)
    {
        var a = init.Architecture;
        int vocab = a.VocabSize > 0 ? a.VocabSize : tokenizer.VocabSize;
        if (vocab < tokenizer.VocabSize)
            throw new Configuration.ConfigFileException(source, "model_init.vocab_size", $"{vocab} is smaller than the tokenizer's vocabulary ({tokenizer.VocabSize})");
        var cfg = a with
        {
            VocabSize = vocab,
            BosTokenId = tokenizer.BosId,
            EosTokenIds = tokenizer.EosId is int eos ? [eos] : [],
            PadTokenId = tokenizer.PadId,
            TorchDtype = "float32",
        };
        cfg.Validate(source + ": model_init");
        return cfg;
    }

    private static void WriteGenerationConfig(string dir, LlamaConfig cfg)
    {
        var o = new JsonObject { ["_from_model_config"] = true };
        if (cfg.BosTokenId is int b) o["bos_token_id"] = b;
        if (cfg.EosTokenIds.Count == 1) o["eos_token_id"] = cfg.EosTokenIds[0];
        else if (cfg.EosTokenIds.Count > 1) o["eos_token_id"] = new JsonArray([.. cfg.EosTokenIds.Select(e => (JsonNode)JsonValue.Create(e)!)]);
        if (cfg.PadTokenId is int p) o["pad_token_id"] = p;
        o["transformers_version"] = "4.46.0";
        AtomicFile.WriteAllText(Path.Combine(dir, "generation_config.json"), o.ToJsonString(Indented) + "\n");
    }

    internal static JsonObject RoutingJson(IReadOnlyList<LayerRoutingStatistics> layers) => new()
    {
        ["layers"] = new JsonArray([.. layers.Select(l => (JsonNode)new JsonObject
        {
            ["layer"] = l.Layer,
            ["tokens"] = l.Tokens,
            ["entropy"] = Math.Round(l.Entropy, 5),
            ["expert_load"] = new JsonArray([.. l.ExpertLoad.Select(x => (JsonNode)JsonValue.Create(Math.Round(x, 5))!)]),
            ["mean_probability"] = new JsonArray([.. l.MeanProbability.Select(x => (JsonNode)JsonValue.Create(Math.Round(x, 5))!)]),
        })]),
    };

    private static JsonObject EvalJson(TrainingResult result, ExactMatchReport? exact)
    {
        var o = new JsonObject();
        if (result.Evaluations.Count > 0)
        {
            var e = result.Evaluations[^1];
            o["step"] = e.Step;
            o["eval_loss"] = MetricsLog.Num(e.Loss);
            o["eval_ppl"] = MetricsLog.Num(e.Perplexity);
            foreach (var (k, v) in e.Extras ?? new Dictionary<string, double>()) o["eval_" + k] = MetricsLog.Num(v);
        }
        if (exact is not null)
        {
            o["exact_match"] = exact.Accuracy;
            o["exact_match_count"] = exact.Total;
            var by = new JsonObject();
            foreach (var (k, v) in exact.AccuracyByFamily) by[k] = v;
            o["exact_match_by_family"] = by;
        }
        return o;
    }
}
