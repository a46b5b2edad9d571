using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// Training steps on the shapes of the embedded model (loramix-tiny v2: hidden 384, intermediate 1024, 5 layers, 6 query
/// heads and 2 key/value heads of 64, vocabulary 384, tied head), random weights, random token ids, fp32, sequences of 56
/// tokens, each step through the real <see cref="Trainer"/>:
/// (1) full pre-training step (<see cref="TrainingTarget.FullFineTune"/>, AdamW), batch 32: FLOPs = 6·P·T;
/// (2) LoRA r=16 (α=32) on all 7 projections, batch 16: FLOPs = 4·P·T + 6·r·(in + out)·T per adapted layer;
/// (3) the quickstart's MixLoRA (4 experts, top-2, r=16, α=32, all linear, <see cref="MixLoraObjective"/>), batch 16:
///     FLOPs = 4·P·T + the adapter work actually executed (see <see cref="MixLoraFlopsPerToken"/>).
/// P counts the tied embedding once (as the head); T = batch · seq; attention scores are not counted. Per case: best and mean
/// of the per-step times after the first step (which allocates gradients and optimizer state); tokens/s, GFLOP/s and MFU from
/// the best step. Cases 1 and 2 also run the same step as a bare TorchSharp op sequence over the state dict (GQA: k/v expanded
/// to the query heads, as the model does); trainer/bare time ratio = the framework's overhead. Also the GEMM peak at these
/// shapes: one [1792 × 384]·[1024 × 384]ᵀ linear (T = 32·56 tokens, hidden → intermediate).
/// </summary>
internal static class TinyTrainBench
{
    private const int Seq = 56, FullBatch = 32, AdapterBatch = 16, Rank = 16, Alpha = 32, Experts = 4, TopK = 2;
    private const double LearningRate = 1e-4, FullWeightDecay = 0.0;   // weight_decay as examples/pretrain-tiny.yaml

    /// <summary>The embedded model's architecture (loramix-tiny v2).</summary>
    internal static readonly LlamaConfig Config = new()
    {
        ModelType = "llama", VocabSize = 384, HiddenSize = 384, IntermediateSize = 1024, NumHiddenLayers = 5,
        NumAttentionHeads = 6, NumKeyValueHeads = 2, HeadDim = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
        MaxPositionEmbeddings = 512, TieWordEmbeddings = true,
    };

    /// <summary>Runs the three cases and the GEMM probe; writes every number to <paramref name="jsonPath"/> when given.</summary>
    public static void Run(double peak, bool quick, string? jsonPath)
    {
        var cfg = Config;
        long p = cfg.ParameterCount();
        int steps = quick ? 3 : 10, bareReps = quick ? 2 : 5, gemmReps = quick ? 5 : 30;
        Console.WriteLine($"train-tiny: embedded model shapes (hidden {cfg.HiddenSize}, intermediate {cfg.IntermediateSize}, {cfg.NumHiddenLayers} layers, " +
                          $"{cfg.NumAttentionHeads} heads / {cfg.NumKeyValueHeads} kv heads x {cfg.HeadDim}, vocab {cfg.VocabSize}, tied), " +
                          $"{p / 1e6:F2}M parameters, seq {Seq}, fp32; {steps} trainer steps per case (first untimed), bare best of {bareReps}");

        // GEMM peak at these shapes: the batch-32 step's hidden → intermediate projection.
        long gm = (long)FullBatch * Seq, gk = cfg.HiddenSize, gn = cfg.IntermediateSize;
        double gemmS;
        using (no_grad())
        {
            using var x = randn(gm, gk);
            using var w = randn(gn, gk);
            nn.functional.linear(x, w).Dispose();   // warm-up
            gemmS = double.MaxValue;
            for (int i = 0; i < gemmReps; i++)
            {
                var sw = Stopwatch.StartNew();
                using var y = nn.functional.linear(x, w);
                gemmS = Math.Min(gemmS, sw.Elapsed.TotalSeconds);
            }
        }
        double gemmGflops = 2.0 * gm * gk * gn / gemmS / 1e9;
        Console.WriteLine($"linear [{gm}x{gk}]x[{gn}x{gk}]^T fp32 (T = {FullBatch}x{Seq} tokens): {gemmS * 1e6:F0} us, {gemmGflops:F1} GFLOP/s, " +
                          $"{100 * gemmGflops / peak:F1}% of the measured peak");

        var cases = new JsonObject
        {
            ["full"] = FullCase(cfg, p, peak, steps, bareReps),
            ["lora"] = LoraCase(cfg, p, peak, steps, bareReps),
            ["mixlora"] = MixLoraCase(cfg, p, peak, steps),
        };

        if (jsonPath is not null)
        {
            var result = new JsonObject
            {
                ["bench"] = "train-tiny", ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"), ["quick"] = quick,
                ["libtorch"] = __version__, ["threads"] = get_num_threads(), ["cores"] = Environment.ProcessorCount,
                ["matmul_peak_gflops"] = peak,
                ["model"] = new JsonObject
                {
                    ["name"] = "loramix-tiny v2 shapes (random weights)", ["hidden_size"] = cfg.HiddenSize,
                    ["intermediate_size"] = cfg.IntermediateSize, ["num_hidden_layers"] = cfg.NumHiddenLayers,
                    ["num_attention_heads"] = cfg.NumAttentionHeads, ["num_key_value_heads"] = cfg.NumKeyValueHeads,
                    ["head_dim"] = cfg.HeadDim, ["vocab_size"] = cfg.VocabSize, ["tie_word_embeddings"] = cfg.TieWordEmbeddings,
                    ["parameters"] = p,
                },
                ["seq"] = Seq, ["dtype"] = "float32", ["trainer_steps"] = steps, ["bare_reps"] = bareReps,
                ["gemm"] = new JsonObject
                {
                    ["m"] = gm, ["k"] = gk, ["n"] = gn, ["best_s"] = gemmS, ["gflops"] = gemmGflops, ["fraction_of_peak"] = gemmGflops / peak,
                },
                ["cases"] = cases,
            };
            File.WriteAllText(jsonPath, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            Console.WriteLine($"results written to {jsonPath}");
        }
    }

    private static LlamaForCausalLM RandomModel(LlamaConfig cfg)
    {
        var model = new LlamaForCausalLM(cfg, null, ScalarType.Float32);
        ModelPresets.InitializeRandom(model, seed: 0);
        return model;
    }

    private static JsonObject FullCase(LlamaConfig cfg, long p, double peak, int steps, int bareReps)
    {
        using var model = RandomModel(cfg);
        var target = TrainingTarget.FullFineTune(model);
        long tokens = (long)FullBatch * Seq;
        double flops = 6.0 * p * tokens;
        long trainable = target.Parameters.Sum(tp => tp.Parameter.numel());
        Console.WriteLine($"[1] full pre-training step, AdamW (weight decay {FullWeightDecay}), {trainable / 1e6:F2}M trainable, batch {FullBatch} x {Seq} tokens; " +
                          $"{flops / 1e9:F2} GFLOP per step (6·P·T)");
        var times = TrainerSteps(target, null, cfg, FullBatch, steps, FullWeightDecay);
        var json = Report("full", times, tokens, flops, peak);
        var (bareBest, bareMean) = BareStep(model, cfg, target, FullBatch, loraScale: null, FullWeightDecay, bareReps);
        AddBare(json, "full", times.Min(), bareBest, bareMean, tokens, flops, peak);
        json["batch"] = FullBatch;
        json["trainable"] = trainable;
        json["weight_decay"] = FullWeightDecay;
        return json;
    }

    private static JsonObject LoraCase(LlamaConfig cfg, long p, double peak, int steps, int bareReps)
    {
        using var model = RandomModel(cfg);
        var lora = new LoraConfig { R = Rank, LoraAlpha = Alpha, AllLinear = true, TargetModules = null };
        LoraAdapters.Attach(model, lora, seed: 1);
        var target = TrainingTarget.Lora(model, lora);
        long tokens = (long)AdapterBatch * Seq;
        long loraFlopsPerToken = 0;
        foreach (var (_, layer) in LoraAdapters.AdaptedLayers(model)) loraFlopsPerToken += 6L * Rank * (layer.InFeatures + layer.OutFeatures);
        double flops = 4.0 * p * tokens + (double)loraFlopsPerToken * tokens;
        long trainable = target.Parameters.Sum(tp => tp.Parameter.numel());
        Console.WriteLine($"[2] LoRA r={Rank} α={Alpha} on all 7 projections, {trainable / 1e6:F3}M trainable, batch {AdapterBatch} x {Seq} tokens; " +
                          $"{flops / 1e9:F2} GFLOP per step (4·P·T + LoRA {loraFlopsPerToken * tokens / 1e9:F3})");
        var times = TrainerSteps(target, null, cfg, AdapterBatch, steps, 0);
        var json = Report("lora", times, tokens, flops, peak);
        var (bareBest, bareMean) = BareStep(model, cfg, target, AdapterBatch, loraScale: (double)Alpha / Rank, 0, bareReps);
        AddBare(json, "lora", times.Min(), bareBest, bareMean, tokens, flops, peak);
        json["batch"] = AdapterBatch;
        json["trainable"] = trainable;
        json["lora_gflop_per_step"] = loraFlopsPerToken * tokens / 1e9;
        return json;
    }

    private static JsonObject MixLoraCase(LlamaConfig cfg, long p, double peak, int steps)
    {
        using var model = RandomModel(cfg);
        // the quickstart's adapter (Workflows/Quickstart.cs): 4 experts, top-2, r 16, α 2r, no dropout, all 7 projections
        var mix = MixLoraAdapters.Attach(model, new MixLoraConfig
        {
            NumExperts = Experts, TopK = TopK, R = Rank, LoraAlpha = Alpha, LoraDropout = 0, RouterAuxLossCoef = 0.01, RouterZLossCoef = 0.001,
        }, seed: 1);
        var target = TrainingTarget.MixLora(model, mix);
        var objective = new MixLoraObjective(mix);
        long tokens = (long)AdapterBatch * Seq;
        var (adapterPerToken, extraDownPerToken, routerPerToken, attnPerToken, expertPerToken) = MixLoraFlopsPerToken(cfg);
        double flops = 4.0 * p * tokens + (double)adapterPerToken * tokens;
        long trainable = target.Parameters.Sum(tp => tp.Parameter.numel());
        long h = cfg.HiddenSize, q = (long)cfg.NumAttentionHeads * cfg.HeadDim, kv = (long)cfg.NumKeyValueHeads * cfg.HeadDim, inter = cfg.IntermediateSize;
        long expected = cfg.NumHiddenLayers * (Rank * ((h + q) * 2 + (h + kv) * 2) + Experts * Rank * 3 * (h + inter) + h * Experts);
        Console.WriteLine($"[3] MixLoRA {Experts} experts top-{TopK} r={Rank} α={Alpha}, all linear (attention LoRA q/k/v/o, experts gate/up/down), " +
                          $"{trainable / 1e6:F3}M trainable (expected {expected / 1e6:F3}M), batch {AdapterBatch} x {Seq} tokens; {flops / 1e9:F2} GFLOP per step " +
                          $"(4·P·T + adapter {adapterPerToken * tokens / 1e9:F3}: extra down {extraDownPerToken * tokens / 1e9:F3}, router {routerPerToken * tokens / 1e9:F4}, " +
                          $"attention LoRA {attnPerToken * tokens / 1e9:F3}, experts {expertPerToken * tokens / 1e9:F3})");
        var times = TrainerSteps(target, objective, cfg, AdapterBatch, steps, 0);
        var json = Report("mixlora", times, tokens, flops, peak);
        json["batch"] = AdapterBatch;
        json["trainable"] = trainable;
        json["adapter_gflop_per_step"] = adapterPerToken * tokens / 1e9;
        json["flops_per_token"] = new JsonObject
        {
            ["base_4p"] = 4 * p, ["extra_down_proj"] = extraDownPerToken, ["router"] = routerPerToken,
            ["attention_lora"] = attnPerToken, ["expert_lora"] = expertPerToken,
        };
        return json;
    }

    /// <summary>
    /// FLOPs per token of a MixLoRA training step beyond the frozen base's 4·P (forward 2 + input gradient 2 per weight; a
    /// trainable weight costs 6: forward 2, input gradient 2, weight gradient 2), per layer, as the sparse dispatch of
    /// <see cref="MixLoraFeedForward"/> executes them:
    /// <list type="bullet">
    /// <item>extra down: the frozen gate/up projections run once per token (in 4·P), but the frozen down projection runs once
    /// per routed (token, slot) pair, i.e. top-k = 2 times per token: (k − 1)·4·I·h more;</item>
    /// <item>router: a trainable fp32 h → E linear on every token: 6·h·E;</item>
    /// <item>attention LoRA: one plain LoRA on each of q/k/v/o: 6·r·(in + out) each;</item>
    /// <item>experts: each token runs k of the E experts, each a LoRA on gate, up and down: k·6·r·(in + out) per projection.</item>
    /// </list>
    /// Not counted (as for the other cases): attention scores, softmax/top-k, gathers and the weighted scatter, SwiGLU and
    /// other elementwise work, the router losses.
    /// </summary>
    private static (long Total, long ExtraDown, long Router, long AttentionLora, long Experts) MixLoraFlopsPerToken(LlamaConfig c)
    {
        long h = c.HiddenSize, q = (long)c.NumAttentionHeads * c.HeadDim, kv = (long)c.NumKeyValueHeads * c.HeadDim, inter = c.IntermediateSize;
        long layers = c.NumHiddenLayers;
        long extraDown = layers * (TopK - 1) * 4 * inter * h;
        long router = layers * 6 * h * Experts;
        long attention = layers * 6L * Rank * ((h + q) + (h + kv) + (h + kv) + (q + h));
        long experts = layers * TopK * 6L * Rank * 3 * (h + inter);
        return (extraDown + router + attention + experts, extraDown, router, attention, experts);
    }

    /// <summary>Runs <paramref name="steps"/> optimizer steps through a fresh <see cref="Trainer"/> on random token ids
    /// (output in a temporary directory, deleted); returns the per-step times of steps 2..n.</summary>
    private static List<double> TrainerSteps(TrainingTarget target, ITrainingObjective? objective, LlamaConfig cfg, int batch, int steps, double weightDecay)
    {
        var rnd = new Random(7);
        var examples = Enumerable.Range(0, 2 * batch).Select(_ =>
            TrainingExample.AllTargets(Enumerable.Range(0, Seq).Select(_ => rnd.Next(3, cfg.VocabSize)).ToArray())).ToList();
        string outDir = Path.Combine(Path.GetTempPath(), "loramix-bench-train-tiny-" + Guid.NewGuid().ToString("N"));
        var clock = new TrainBench.StepClock();
        try
        {
            new Trainer(target, new TrainingOptions
            {
                OutputDir = outDir, MaxSteps = steps, BatchSize = batch, LearningRate = LearningRate, LrScheduler = "constant", CutoffLen = Seq,
                LoggingSteps = 1000, MaxGradNorm = 1.0, WeightDecay = weightDecay,
            }, objective, clock).Train(examples);
        }
        finally
        {
            if (Directory.Exists(outDir)) Directory.Delete(outDir, recursive: true);
        }
        // the first step allocates gradients and optimizer state: time the rest
        return clock.Elapsed.Zip(clock.Elapsed.Skip(1), (a, b) => b - a).ToList();
    }

    private static JsonObject Report(string key, List<double> times, long tokens, double flops, double peak)
    {
        double best = times.Min(), mean = times.Average();
        double gflops = flops / best / 1e9;
        Console.WriteLine($"  {key} trainer step: best {best * 1000:F1} ms (mean {mean * 1000:F1} ms over {times.Count}), {tokens / best:F0} tokens/s, " +
                          $"{gflops:F1} GFLOP/s, MFU {100 * gflops / peak:F1}% of measured peak");
        return new JsonObject
        {
            ["seq"] = Seq, ["tokens_per_step"] = tokens, ["gflop_per_step"] = flops / 1e9,
            ["best_step_s"] = best, ["mean_step_s"] = mean, ["tokens_per_s"] = tokens / best, ["tokens_per_s_mean"] = tokens / mean,
            ["gflops"] = gflops, ["mfu"] = gflops / peak,
            ["step_s"] = new JsonArray(times.Select(x => (JsonNode)x).ToArray()),
        };
    }

    private static void AddBare(JsonObject json, string key, double trainerBest, double bareBest, double bareMean, long tokens, double flops, double peak)
    {
        double gflops = flops / bareBest / 1e9;
        Console.WriteLine($"  {key} bare TorchSharp op sequence, same step: best {bareBest * 1000:F1} ms (mean {bareMean * 1000:F1} ms), {tokens / bareBest:F0} tokens/s, " +
                          $"{gflops:F1} GFLOP/s, {100 * gflops / peak:F1}% of peak; trainer/bare time ratio {trainerBest / bareBest:F3}");
        json["bare_best_step_s"] = bareBest;
        json["bare_mean_step_s"] = bareMean;
        json["bare_tokens_per_s"] = tokens / bareBest;
        json["bare_gflops"] = gflops;
        json["bare_mfu"] = gflops / peak;
        json["trainer_over_bare"] = trainerBest / bareBest;
    }

    /// <summary>
    /// The same step as plain ops over the state dict (as <see cref="TrainBench"/>'s bare step, for a batch and GQA): forward
    /// (with LoRA deltas when <paramref name="loraScale"/> is set), summed CE over the shifted targets / their count,
    /// backward, gradient clipping at 1, AdamW on the target's parameters. Returns the best and mean of
    /// <paramref name="reps"/> timed steps after one untimed step.
    /// </summary>
    private static (double Best, double Mean) BareStep(LlamaForCausalLM model, LlamaConfig cfg, TrainingTarget target, int batch, double? loraScale,
        double weightDecay, int reps)
    {
        var sd = model.state_dict();
        var inv = RotaryEmbedding.InverseFrequencies(cfg);
        var ids = randint(3, cfg.VocabSize, [batch, Seq], dtype: ScalarType.Int64);
        int heads = cfg.NumAttentionHeads, kvHeads = cfg.NumKeyValueHeads, hd = cfg.HeadDim, rep = heads / kvHeads;
        using var opt = new AdamWOptimizer(target.Parameters, weightDecay: weightDecay);
        Tensor Lin(Tensor x, string path)
        {
            var y = nn.functional.linear(x, sd[path + ".weight"]);
            if (loraScale is not double scale) return y;
            var a = sd[path + ".lora.default.lora_A"];
            var b = sd[path + ".lora.default.lora_B"];
            return y + nn.functional.linear(nn.functional.linear(x, a), b) * scale;
        }
        void Step()
        {
            using var scope = NewDisposeScope();
            var pos = arange(Seq, dtype: ScalarType.Float32).unsqueeze(1) * inv.unsqueeze(0);
            var emb = cat([pos, pos], 1);
            var cos = emb.cos(); var sin = emb.sin();
            Tensor Rope(Tensor t) { long half = t.shape[^1] / 2; return t * cos + cat([-t.narrow(-1, half, half), t.narrow(-1, 0, half)], -1) * sin; }
            Tensor Norm(Tensor t, Tensor wt) => wt * (t * rsqrt(t.pow(2).mean([-1L], keepdim: true) + cfg.RmsNormEps));
            Tensor Expand(Tensor t) => t.unsqueeze(2).expand(batch, kvHeads, rep, Seq, hd).reshape(batch, heads, Seq, hd);   // GQA: kv heads → query heads
            var x = sd["model.embed_tokens.weight"].index_select(0, ids.reshape(-1)).view(batch, Seq, cfg.HiddenSize);
            for (int l = 0; l < cfg.NumHiddenLayers; l++)
            {
                string p = $"model.layers.{l}.";
                var xn = Norm(x, sd[p + "input_layernorm.weight"]);
                var q = Rope(Lin(xn, p + "self_attn.q_proj").view(batch, Seq, heads, hd).transpose(1, 2));
                var k = Expand(Rope(Lin(xn, p + "self_attn.k_proj").view(batch, Seq, kvHeads, hd).transpose(1, 2)));
                var v = Expand(Lin(xn, p + "self_attn.v_proj").view(batch, Seq, kvHeads, hd).transpose(1, 2));
                var o = nn.functional.scaled_dot_product_attention(q, k, v, null, 0, true).transpose(1, 2).reshape(batch, Seq, heads * hd);
                x = x + Lin(o, p + "self_attn.o_proj");
                var yn = Norm(x, sd[p + "post_attention_layernorm.weight"]);
                x = x + Lin(nn.functional.silu(Lin(yn, p + "mlp.gate_proj")) * Lin(yn, p + "mlp.up_proj"), p + "mlp.down_proj");
            }
            var logits = nn.functional.linear(Norm(x, sd["model.norm.weight"]), sd["model.embed_tokens.weight"]);
            var loss = nn.functional.cross_entropy(logits.narrow(1, 0, Seq - 1).reshape(-1, cfg.VocabSize), ids.narrow(1, 1, Seq - 1).reshape(-1),
                reduction: nn.Reduction.Sum) / (batch * (Seq - 1));
            opt.ZeroGrad();
            loss.backward();
            Trainer.ClipGradients(opt, 1.0, Trainer.GradientNorm(opt));
            opt.Step(LearningRate);
        }
        Step();
        var times = new List<double>();
        for (int i = 0; i < reps; i++)
        {
            var sw = Stopwatch.StartNew();
            Step();
            times.Add(sw.Elapsed.TotalSeconds);
        }
        return (times.Min(), times.Average());
    }
}
