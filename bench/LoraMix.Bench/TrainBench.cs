using System.Diagnostics;
using LoraMix.Adapters.Lora;
using LoraMix.Modeling;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// One LoRA training step (r=16 on all 7 linear projections of the `small` preset, one sequence of 512 tokens, fp32)
/// through the real <see cref="Trainer"/>, against a bare TorchSharp op sequence of the same step.
/// FLOPs = 4·P·T (frozen base: forward 2·P·T plus input gradients 2·P·T; the tied head counted once, as in the prefill
/// figure; attention scores not counted) + LoRA: 6·r·(in + out)·T per adapted layer (forward, input and weight gradients).
/// </summary>
internal static class TrainBench
{
    internal sealed class StepClock : ITrainingProgress
    {
        public List<double> Elapsed { get; } = [];
        public void Started(TrainingPlan plan) { }
        public void StepCompleted(StepMetrics metrics, bool logged) => Elapsed.Add(metrics.ElapsedSeconds);
        public void Evaluated(EvalMetrics metrics) { }
        public void Info(string message) { }
        public void Finished() { }
    }

    public static void Run(double peak, bool quick)
    {
        const int seq = 512, rank = 16;
        var cfg = ModelPresets.Get("small");
        using var model = ModelPresets.CreateRandom("small", seed: 0);
        var lora = new LoraConfig { R = rank, LoraAlpha = 32, AllLinear = true, TargetModules = null };
        LoraAdapters.Attach(model, lora, seed: 1);
        var target = TrainingTarget.Lora(model, lora);
        long p = cfg.ParameterCount();
        long loraFlopsPerToken = 0;
        foreach (var (_, layer) in LoraAdapters.AdaptedLayers(model)) loraFlopsPerToken += 6L * rank * (layer.InFeatures + layer.OutFeatures);
        double flops = 4.0 * p * seq + (double)loraFlopsPerToken * seq;
        long loraParams = target.Parameters.Sum(tp => tp.Parameter.numel());
        Console.WriteLine($"train step: small ({p / 1e6:F1}M base parameters), LoRA r={rank} on all 7 projections ({loraParams / 1e6:F2}M trainable), " +
                          $"batch 1 x {seq} tokens, fp32; {flops / 1e9:F1} GFLOP per step (4·P·T + LoRA)");

        var rnd = new Random(7);
        var examples = Enumerable.Range(0, 4).Select(_ =>
            TrainingExample.AllTargets(Enumerable.Range(0, seq).Select(_ => rnd.Next(3, cfg.VocabSize)).ToArray())).ToList();
        int steps = quick ? 4 : 8;
        string outDir = Path.Combine(Path.GetTempPath(), "loramix-bench-train-" + Guid.NewGuid().ToString("N"));
        var clock = new StepClock();
        try
        {
            new Trainer(target, new TrainingOptions
            {
                OutputDir = outDir, MaxSteps = steps, BatchSize = 1, LearningRate = 1e-4, LrScheduler = "constant", CutoffLen = seq,
                LoggingSteps = 1000, MaxGradNorm = 1.0,
            }, progress: clock).Train(examples);
        }
        finally
        {
            if (Directory.Exists(outDir)) Directory.Delete(outDir, recursive: true);
        }
        // the first step allocates gradients and optimizer state: time the rest (best of the per-step times)
        var perStep = clock.Elapsed.Zip(clock.Elapsed.Skip(1), (a, b) => b - a).ToList();
        double best = perStep.Min(), mean = perStep.Average();
        double gflops = flops / best / 1e9;
        Console.WriteLine($"LoraMix trainer step: best {best * 1000:F0} ms (mean {mean * 1000:F0} ms over {perStep.Count}), {seq / best:F0} tokens/s, " +
                          $"{gflops:F1} GFLOP/s, MFU {100 * gflops / peak:F1}% of measured peak");

        double bare = BareStep(model, cfg, target, rank, seq, quick ? 3 : 5);
        double bareGflops = flops / bare / 1e9;
        Console.WriteLine($"bare TorchSharp op sequence, same step: {bare * 1000:F0} ms, {seq / bare:F0} tokens/s, {bareGflops:F1} GFLOP/s, " +
                          $"{100 * bareGflops / peak:F1}% of peak; trainer/bare time ratio {best / bare:F3}");
    }

    /// <summary>The same step written as plain ops over the state dict: LoRA forward, summed CE / T, backward, AdamW.</summary>
    private static double BareStep(LlamaForCausalLM model, LlamaConfig cfg, TrainingTarget target, int rank, int seq, int reps)
    {
        var sd = model.state_dict();
        var inv = RotaryEmbedding.InverseFrequencies(cfg);
        var ids = randint(3, cfg.VocabSize, [1, seq], dtype: ScalarType.Int64);
        double scale = 32.0 / rank;
        int heads = cfg.NumAttentionHeads, hd = cfg.HeadDim, h = cfg.HiddenSize;
        using var opt = new AdamWOptimizer(target.Parameters);
        Tensor Lin(Tensor x, string path)
        {
            var y = nn.functional.linear(x, sd[path + ".weight"]);
            var a = sd[path + ".lora.default.lora_A"];
            var b = sd[path + ".lora.default.lora_B"];
            return y + nn.functional.linear(nn.functional.linear(x, a), b) * scale;
        }
        void Step()
        {
            using var scope = NewDisposeScope();
            var pos = arange(seq, dtype: ScalarType.Float32).unsqueeze(1) * inv.unsqueeze(0);
            var emb = cat([pos, pos], 1);
            var cos = emb.cos(); var sin = emb.sin();
            Tensor Rope(Tensor t) { long half = t.shape[^1] / 2; return t * cos + cat([-t.narrow(-1, half, half), t.narrow(-1, 0, half)], -1) * sin; }
            Tensor Norm(Tensor t, Tensor wt) => wt * (t * rsqrt(t.pow(2).mean([-1L], keepdim: true) + 1e-5));
            var x = sd["model.embed_tokens.weight"].index_select(0, ids.reshape(-1)).unsqueeze(0);
            for (int l = 0; l < cfg.NumHiddenLayers; l++)
            {
                string p = $"model.layers.{l}.";
                var xn = Norm(x, sd[p + "input_layernorm.weight"]);
                var q = Rope(Lin(xn, p + "self_attn.q_proj").view(1, seq, heads, hd).transpose(1, 2));
                var k = Rope(Lin(xn, p + "self_attn.k_proj").view(1, seq, heads, hd).transpose(1, 2));
                var v = Lin(xn, p + "self_attn.v_proj").view(1, seq, heads, hd).transpose(1, 2);
                var o = nn.functional.scaled_dot_product_attention(q, k, v, null, 0, true).transpose(1, 2).reshape(1, seq, h);
                x = x + Lin(o, p + "self_attn.o_proj");
                var yn = Norm(x, sd[p + "post_attention_layernorm.weight"]);
                x = x + Lin(nn.functional.silu(Lin(yn, p + "mlp.gate_proj")) * Lin(yn, p + "mlp.up_proj"), p + "mlp.down_proj");
            }
            var logits = nn.functional.linear(Norm(x, sd["model.norm.weight"]), sd["model.embed_tokens.weight"]);
            var loss = nn.functional.cross_entropy(logits[0].narrow(0, 0, seq - 1), ids[0].narrow(0, 1, seq - 1), reduction: nn.Reduction.Sum) / (seq - 1);
            opt.ZeroGrad();
            loss.backward();
            Trainer.ClipGradients(opt, 1.0, Trainer.GradientNorm(opt));
            opt.Step(1e-4);
        }
        Step();
        double best = double.MaxValue;
        for (int i = 0; i < reps; i++)
        {
            var sw = Stopwatch.StartNew();
            Step();
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return best;
    }
}
