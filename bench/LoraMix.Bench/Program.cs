using System.Diagnostics;
using System.Globalization;
using LoraMix.Inference;
using LoraMix.Modeling;
using TorchSharp;
using static TorchSharp.torch;

// LoraMix benchmarks (not run by CI). Everything is measured in one process so that ratios are meaningful:
// the machine's fp32 matmul peak first, then the model on the `small` preset.
//   dotnet run -c Release --project bench/LoraMix.Bench [-- --quick]          runtime: prefill MFU, decode tokens/s
//   dotnet run -c Release --project bench/LoraMix.Bench -- train [--quick]    LoRA training step: tokens/s, MFU
//   dotnet run -c Release --project bench/LoraMix.Bench -- train-tiny [--quick] [--json PATH]
//                                                     training steps on the embedded model's shapes (loramix-tiny v2): full
//                                                     pre-training batch 32x48, LoRA and MixLoRA batch 16x48; tokens/s, MFU,
//                                                     trainer/bare-op ratio, GEMM GFLOP/s at these shapes
//   dotnet run -c Release --project bench/LoraMix.Bench -- mixlora [--quick] [--json PATH]
//                                                     MixLoRA (sparse, dense) vs LoRA: training step per token, decode tokens/s
//   dotnet run -c Release --project bench/LoraMix.Bench -- router-attack [--quick] [--json PATH]
//                                                     router attack success under free / privileged routing (issue 6)
//   dotnet run -c Release --project bench/LoraMix.Bench -- mixed [--quick] [--json PATH]
//                                                     8 LoRA adapters, batch 8 decode with 1/2/4/8 different adapters per batch vs
//                                                     one adapter, base model, and the 8 adapters one after another at batch 1 (issue 14)
//   dotnet run -c Release --project bench/LoraMix.Bench -- xlora [--quick] [--json PATH]
//                                                     X-LoRA (4 experts) decode: dual KV cache, non-granular, cache-free, vs
//                                                     base + one LoRA; 512-token prefill (issue 16)
bool quick = args.Contains("--quick");
bool trainMode = args.Contains("train");
bool tinyTrainMode = args.Contains("train-tiny");
bool mixMode = args.Contains("mixlora");
bool attackMode = args.Contains("router-attack");
bool mixedMode = args.Contains("mixed");
bool xloraMode = args.Contains("xlora");
int jsonAt = Array.IndexOf(args, "--json");
string? jsonPath = jsonAt >= 0 && jsonAt + 1 < args.Length ? args[jsonAt + 1] : null;
if (jsonAt >= 0 && jsonPath is null) { Console.Error.WriteLine("--json needs a file path"); return; }
CultureInfo.DefaultThreadCurrentCulture = CultureInfo.InvariantCulture;
CultureInfo.CurrentCulture = CultureInfo.InvariantCulture;
LoraMix.Torch.TorchRuntime.EnsureLoaded();
bool tuned = !args.Contains("--no-allocator-tuning") && LoraMix.Torch.TorchRuntime.TuneNativeAllocator();
Console.WriteLine($"native allocator tuning (mallopt): {(tuned ? "on" : "off")}");
Console.WriteLine($"libtorch {torch.__version__}, threads {torch.get_num_threads()}, {Environment.ProcessorCount} cores, {DateTime.UtcNow:yyyy-MM-dd}");

if (attackMode)   // no timing against a matmul peak: it measures attack success, not speed
{
    LoraMix.Bench.RouterAttackBench.Run(quick, jsonPath);
    return;
}

double Best(int reps, Action run)
{
    run();   // warm-up
    double best = double.MaxValue;
    for (int i = 0; i < reps; i++)
    {
        var sw = Stopwatch.StartNew();
        run();
        best = Math.Min(best, sw.Elapsed.TotalSeconds);
    }
    return best;
}

// 1. Matmul peak (fp32 sgemm), best of several sizes.
double peak = 0;
using (no_grad())
{
    foreach (int n in new[] { 1024, 2048 })
    {
        using var a = randn(n, n);
        using var b = randn(n, n);
        double s = Best(quick ? 3 : 6, () => { using var c = a.matmul(b); });
        double gflops = 2.0 * n * n * n / s / 1e9;
        Console.WriteLine($"matmul {n}^3 fp32: {gflops:F1} GFLOP/s");
        peak = Math.Max(peak, gflops);
    }
    // The prefill's own GEMM shape: [512, 768] x [768, 2048].
    using var x = randn(512, 768);
    using var w = randn(2048, 768);
    double sg = Best(quick ? 5 : 20, () => { using var y = nn.functional.linear(x, w); });
    Console.WriteLine($"linear [512x768]x[768x2048] fp32: {2.0 * 512 * 768 * 2048 / sg / 1e9:F1} GFLOP/s");
}
Console.WriteLine($"measured fp32 matmul peak: {peak:F1} GFLOP/s");

if (mixMode)
{
    LoraMix.Bench.MixLoraBench.Run(peak, quick, jsonPath);
    return;
}
if (mixedMode)
{
    LoraMix.Bench.MixedAdaptersBench.Run(peak, quick, jsonPath);
    return;
}
if (xloraMode)
{
    LoraMix.Bench.XLoraBench.Run(peak, quick, jsonPath);
    return;
}
if (tinyTrainMode)
{
    LoraMix.Bench.TinyTrainBench.Run(peak, quick, jsonPath);
    return;
}
if (trainMode)
{
    LoraMix.Bench.TrainBench.Run(peak, quick);
    return;
}

// 2. Prefill of 512 tokens on `small` (full logits: 2·P·T FLOPs, attention score FLOPs not counted).
var cfg = ModelPresets.Get("small");
using var model = ModelPresets.CreateRandom("small", seed: 0);
long parameters = cfg.ParameterCount();
int promptLen = 512;
var ids = randint(3, cfg.VocabSize, [1, promptLen], dtype: ScalarType.Int64);
double prefill;
using (no_grad())
    prefill = Best(quick ? 2 : 5, () => { using var scope = NewDisposeScope(); model.Forward(ids); });
double prefillFlops = 2.0 * parameters * promptLen;
double prefillGflops = prefillFlops / prefill / 1e9;
Console.WriteLine($"prefill 512 (small, {parameters / 1e6:F1}M params): {prefill * 1000:F1} ms, {promptLen / prefill:F0} tokens/s, {prefillGflops:F1} GFLOP/s, MFU {100 * prefillGflops / peak:F1}% of measured peak");

// The same computation as a bare sequence of TorchSharp ops (no modules, no cache, no context): the framework's overhead.
double bare;
using (no_grad())
{
    var sd = model.state_dict();
    var inv = RotaryEmbedding.InverseFrequencies(cfg);
    bare = Best(quick ? 2 : 5, () =>
    {
        using var scope = NewDisposeScope();
        var pos = arange(promptLen, dtype: ScalarType.Float32).unsqueeze(1) * inv.unsqueeze(0);
        var emb = cat([pos, pos], 1);
        var cos = emb.cos(); var sin = emb.sin();
        Tensor Rope(Tensor t) { long h = t.shape[^1] / 2; return t * cos + cat([-t.narrow(-1, h, h), t.narrow(-1, 0, h)], -1) * sin; }
        Tensor Norm(Tensor t, Tensor wt) => wt * (t * rsqrt(t.pow(2).mean([-1L], keepdim: true) + 1e-5));
        var h = sd["model.embed_tokens.weight"].index_select(0, ids.reshape(-1)).unsqueeze(0);
        for (int l = 0; l < cfg.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var xn = Norm(h, sd[p + "input_layernorm.weight"]);
            var q = Rope(nn.functional.linear(xn, sd[p + "self_attn.q_proj.weight"]).view(1, promptLen, 12, 64).transpose(1, 2));
            var k = Rope(nn.functional.linear(xn, sd[p + "self_attn.k_proj.weight"]).view(1, promptLen, 12, 64).transpose(1, 2));
            var v = nn.functional.linear(xn, sd[p + "self_attn.v_proj.weight"]).view(1, promptLen, 12, 64).transpose(1, 2);
            var o = nn.functional.scaled_dot_product_attention(q, k, v, null, 0, true).transpose(1, 2).reshape(1, promptLen, 768);
            h = h + nn.functional.linear(o, sd[p + "self_attn.o_proj.weight"]);
            var yn = Norm(h, sd[p + "post_attention_layernorm.weight"]);
            h = h + nn.functional.linear(nn.functional.silu(nn.functional.linear(yn, sd[p + "mlp.gate_proj.weight"])) * nn.functional.linear(yn, sd[p + "mlp.up_proj.weight"]), sd[p + "mlp.down_proj.weight"]);
        }
        nn.functional.linear(Norm(h, sd["model.norm.weight"]), sd["model.embed_tokens.weight"]);
    });
}
double bareGflops = prefillFlops / bare / 1e9;
Console.WriteLine($"bare TorchSharp op sequence, same prefill: {bare * 1000:F1} ms, {bareGflops:F1} GFLOP/s, {100 * bareGflops / peak:F1}% of peak; LoraMix/bare time ratio {prefill / bare:F3}");

// 3. Decode tokens/s after a 128-token prompt, batch 1 and 8 (greedy, EOS ignored).
var results = new List<string>();
foreach (int batch in new[] { 1, 8 })
{
    int newTokens = quick ? 16 : 64;
    var prompts = Enumerable.Range(0, batch).Select(b => (IReadOnlyList<int>)Enumerable.Range(0, 128).Select(i => 3 + (i * 7 + b) % 1000).ToArray()).ToList();
    var gen = new TokenGenerator(model);
    var shortOpts = new GenerationOptions { MaxNewTokens = 1, Temperature = 0, StopAtEos = false };
    var longOpts = shortOpts with { MaxNewTokens = newTokens + 1 };
    double tShort = Best(2, () => gen.Generate(prompts, shortOpts));   // prefill + first token
    double tLong = Best(2, () => gen.Generate(prompts, longOpts));
    double perStep = (tLong - tShort) / newTokens;
    double tps = batch / perStep;
    double decodeGflops = 2.0 * parameters * batch / perStep / 1e9;
    Console.WriteLine($"decode batch {batch}: {perStep * 1000:F2} ms/step, {tps:F1} tokens/s, {decodeGflops:F1} GFLOP/s ({100 * decodeGflops / peak:F1}% of peak; decode is memory-bound)");
}
