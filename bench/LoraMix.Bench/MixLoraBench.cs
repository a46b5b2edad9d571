using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// MixLoRA against plain LoRA on the `small` preset, in one process (issue 5 item 8):
/// (a) LoRA r=16 (α=32) on all 7 projections; (b) MixLoRA, 8 experts, top-2, r=16 (α=32), MoE-PEFT semantics: one plain
/// LoRA on each of q/k/v/o, expert LoRAs on gate/up/down, router losses through <see cref="MixLoraObjective"/>, sparse
/// dispatch; (c) the same MixLoRA with <see cref="MixLoraDispatch.Dense"/>. Training: optimizer steps through the real
/// <see cref="Trainer"/> (batch 1 × seq tokens, fp32, dropout 0.05 for both), in rounds whose variant order alternates
/// (A B C, C B A, ...) so that drift on a shared machine hits every variant alike; each round is a fresh
/// <c>Train</c> call whose first step (optimizer-state allocation) is not timed; the reported figure is the median step.
/// Decode: KV-cached greedy generation, batch 1, from the time difference between generating 1 and 1 + N tokens after
/// the same prompt (so the prefill cancels), medians over alternating repetitions.
/// </summary>
internal static class MixLoraBench
{
    private const int Rank = 16, Alpha = 32, Experts = 8, TopK = 2;
    private const double Dropout = 0.05;

    private sealed record Variant(string Key, string Label, TrainingTarget Target, ITrainingObjective? Objective, Action Select);

    public static void Run(double peak, bool quick, string? jsonPath)
    {
        int seq = quick ? 128 : 512;
        int rounds = quick ? 2 : 4, stepsPerRound = quick ? 3 : 5;
        int promptLen = quick ? 16 : 64, newTokens = quick ? 16 : 64, decodeReps = quick ? 2 : 5;
        var cfg = ModelPresets.Get("small");
        long p = cfg.ParameterCount();

        using var loraModel = ModelPresets.CreateRandom("small", seed: 0);
        var lora = new LoraConfig { R = Rank, LoraAlpha = Alpha, LoraDropout = Dropout, AllLinear = true, TargetModules = null };
        LoraAdapters.Attach(loraModel, lora, seed: 1);
        var loraTarget = TrainingTarget.Lora(loraModel, lora);

        using var mixModel = ModelPresets.CreateRandom("small", seed: 0);
        var mix = MixLoraAdapters.Attach(mixModel, new MixLoraConfig
        {
            R = Rank, LoraAlpha = Alpha, LoraDropout = Dropout, NumExperts = Experts, TopK = TopK,
            RoutingStrategy = MixLoraConfig.TopKStrategy, TargetModules = MixLoraConfig.LlamaTargetOrder,
        }, seed: 1);
        var mixTarget = TrainingTarget.MixLora(mixModel, mix);
        var objective = new MixLoraObjective(mix);

        long loraParams = loraTarget.Parameters.Sum(tp => tp.Parameter.numel());
        long mixParams = mixTarget.Parameters.Sum(tp => tp.Parameter.numel());
        Console.WriteLine($"mixlora bench: small ({p / 1e6:F1}M base parameters), batch 1 x {seq} tokens, fp32, dropout {Dropout}");
        Console.WriteLine($"  LoRA    r={Rank} α={Alpha} on all 7 projections: {loraParams / 1e6:F2}M trainable");
        Console.WriteLine($"  MixLoRA {Experts} experts top-{TopK} r={Rank} α={Alpha}, attention LoRA q/k/v/o + experts on gate/up/down: {mixParams / 1e6:F2}M trainable");
        Console.WriteLine($"  {rounds} rounds x {stepsPerRound} steps per variant (first step of each round untimed), alternating order");

        var variants = new List<Variant>
        {
            new("lora", "LoRA r=16, all 7 projections", loraTarget, null, () => { }),
            new("mixlora_sparse", "MixLoRA 8x top-2, sparse dispatch", mixTarget, objective, () => MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Sparse)),
            new("mixlora_dense", "MixLoRA 8x top-2, dense dispatch", mixTarget, objective, () => MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Dense)),
        };

        var rnd = new Random(7);
        var examples = Enumerable.Range(0, 4).Select(_ =>
            TrainingExample.AllTargets(Enumerable.Range(0, seq).Select(_ => rnd.Next(3, cfg.VocabSize)).ToArray())).ToList();

        // warm-up: one short run per variant (JIT, allocator, libtorch kernels), not recorded
        foreach (var v in variants)
        {
            v.Select();
            TrainSteps(v, examples, seq, 2);
        }
        var times = variants.ToDictionary(v => v.Key, _ => new List<double>());
        for (int r = 0; r < rounds; r++)
        {
            var order = r % 2 == 0 ? variants : Enumerable.Reverse(variants).ToList();
            foreach (var v in order)
            {
                v.Select();
                var steps = TrainSteps(v, examples, seq, stepsPerRound);
                times[v.Key].AddRange(steps);
                Console.WriteLine($"  round {r + 1} {v.Key,-15} steps (ms): {string.Join(" ", steps.Select(s => (s * 1000).ToString("F0")))}");
            }
        }
        MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Sparse);

        var train = new JsonObject();
        Console.WriteLine();
        Console.WriteLine($"| training step, {seq} tokens | median ms/step | ms/token | tokens/s | min–max ms | steps |");
        Console.WriteLine("|---|---|---|---|---|---|");
        var median = new Dictionary<string, double>();
        foreach (var v in variants)
        {
            var t = times[v.Key];
            double m = Median(t);
            median[v.Key] = m;
            Console.WriteLine($"| {v.Label} | {m * 1000:F0} | {m * 1000 / seq:F2} | {seq / m:F0} | {t.Min() * 1000:F0}–{t.Max() * 1000:F0} | {t.Count} |");
            train[v.Key] = new JsonObject
            {
                ["median_step_s"] = m, ["ms_per_token"] = m * 1000 / seq, ["tokens_per_s"] = seq / m,
                ["step_s"] = new JsonArray(t.Select(x => (JsonNode)x).ToArray()),
            };
        }
        double ratio = median["mixlora_sparse"] / median["lora"];
        double denseRatio = median["mixlora_dense"] / median["mixlora_sparse"];
        Console.WriteLine();
        Console.WriteLine($"MixLoRA (sparse) / LoRA time per token: {ratio:F3}  (target ≤ 1.6; MoE-PEFT's published figures ≈ 1.9–2.2)");
        Console.WriteLine($"MixLoRA dense / LoRA time per token:    {median["mixlora_dense"] / median["lora"]:F3}");
        Console.WriteLine($"dense / sparse dispatch:                {denseRatio:F3}  (target > 1: sparse faster)");

        // decode
        loraModel.eval();
        mixModel.eval();
        var prompt = Enumerable.Range(0, promptLen).Select(i => 3 + (i * 7) % 1000).ToArray();
        var adapter = AdapterSelection.Of("default");
        var decodeVariants = new List<(string Key, string Label, LlamaForCausalLM Model, AdapterSelection? Adapters, Action Select)>
        {
            ("base", "base (LoRA model, adapter off)", loraModel, null, () => { }),
            ("lora", "base + LoRA (unmerged)", loraModel, adapter, () => { }),
            ("mixlora_sparse", "MixLoRA, sparse dispatch", mixModel, adapter, () => MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Sparse)),
            ("mixlora_dense", "MixLoRA, dense dispatch", mixModel, adapter, () => MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Dense)),
        };
        var shortOpts = new GenerationOptions { MaxNewTokens = 1, Temperature = 0, StopAtEos = false };
        var longOpts = shortOpts with { MaxNewTokens = newTokens + 1 };
        var shortT = decodeVariants.ToDictionary(v => v.Key, _ => new List<double>());
        var longT = decodeVariants.ToDictionary(v => v.Key, _ => new List<double>());
        foreach (var v in decodeVariants)   // warm-up
        {
            v.Select();
            new TokenGenerator(v.Model).Generate(prompt, longOpts with { Adapters = v.Adapters });
        }
        for (int r = 0; r < decodeReps; r++)
        {
            var order = r % 2 == 0 ? decodeVariants : Enumerable.Reverse(decodeVariants).ToList();
            foreach (var v in order)
            {
                v.Select();
                var gen = new TokenGenerator(v.Model);
                shortT[v.Key].Add(Time(() => gen.Generate(prompt, shortOpts with { Adapters = v.Adapters })));
                longT[v.Key].Add(Time(() => gen.Generate(prompt, longOpts with { Adapters = v.Adapters })));
            }
        }
        MixLoraAdapters.SetDispatch(mixModel, MixLoraDispatch.Sparse);

        var decode = new JsonObject();
        var perStep = new Dictionary<string, double>();
        Console.WriteLine();
        Console.WriteLine($"| decode, batch 1, {promptLen}-token prompt + {newTokens} new tokens (greedy, KV cache) | ms/token | tokens/s |");
        Console.WriteLine("|---|---|---|");
        foreach (var v in decodeVariants)
        {
            double s = (Median(longT[v.Key]) - Median(shortT[v.Key])) / newTokens;
            perStep[v.Key] = s;
            Console.WriteLine($"| {v.Label} | {s * 1000:F2} | {1 / s:F1} |");
            decode[v.Key] = new JsonObject { ["ms_per_token"] = s * 1000, ["tokens_per_s"] = 1 / s };
        }
        Console.WriteLine();
        Console.WriteLine($"decode MixLoRA (sparse) / LoRA time per token: {perStep["mixlora_sparse"] / perStep["lora"]:F3}; " +
                          $"dense / sparse: {perStep["mixlora_dense"] / perStep["mixlora_sparse"]:F3}");

        if (jsonPath is not null)
        {
            var result = new JsonObject
            {
                ["bench"] = "mixlora", ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"), ["quick"] = quick,
                ["libtorch"] = TorchSharp.torch.__version__, ["threads"] = get_num_threads(), ["cores"] = Environment.ProcessorCount,
                ["matmul_peak_gflops"] = peak, ["preset"] = "small", ["seq"] = seq, ["batch"] = 1, ["dtype"] = "float32",
                ["rounds"] = rounds, ["steps_per_round"] = stepsPerRound,
                ["lora_trainable"] = loraParams, ["mixlora_trainable"] = mixParams,
                ["train"] = train,
                ["ratio_mixlora_over_lora"] = ratio, ["ratio_dense_over_sparse"] = denseRatio,
                ["decode_prompt"] = promptLen, ["decode_new_tokens"] = newTokens, ["decode"] = decode,
            };
            File.WriteAllText(jsonPath, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            Console.WriteLine($"results written to {jsonPath}");
        }
    }

    /// <summary>Runs <paramref name="steps"/> optimizer steps in a fresh <see cref="Trainer"/>; returns the times of steps 2..n.</summary>
    private static List<double> TrainSteps(Variant v, IReadOnlyList<TrainingExample> examples, int seq, int steps)
    {
        string outDir = Path.Combine(Path.GetTempPath(), "loramix-bench-mixlora-" + Guid.NewGuid().ToString("N"));
        var clock = new TrainBench.StepClock();
        try
        {
            new Trainer(v.Target, new TrainingOptions
            {
                OutputDir = outDir, MaxSteps = steps, BatchSize = 1, LearningRate = 1e-4, LrScheduler = "constant", CutoffLen = seq,
                LoggingSteps = 1000, MaxGradNorm = 1.0,
            }, v.Objective, clock).Train(examples);
        }
        finally
        {
            if (Directory.Exists(outDir)) Directory.Delete(outDir, recursive: true);
        }
        return clock.Elapsed.Zip(clock.Elapsed.Skip(1), (a, b) => b - a).ToList();
    }

    /// <summary>Wall time of one run, seconds (shared by the bench modes).</summary>
    internal static double Time(Action run)
    {
        var sw = Stopwatch.StartNew();
        run();
        return sw.Elapsed.TotalSeconds;
    }

    internal static double Median(IReadOnlyList<double> xs)
    {
        var s = xs.OrderBy(x => x).ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }
}
