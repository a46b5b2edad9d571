using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.XLora;
using LoraMix.Inference;
using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// X-LoRA decode and prefill (issue 16) on the `small` preset, fp32, batch 1: 4 LoRA experts (r=16, α=32, all 7
/// projections, lora_B ~ N(0, 0.02)) under a depth-1 X-LoRA head, against the base model and base + one LoRA (the first
/// expert as a plain adapter). Decode variants: X-LoRA with the dual KV cache (both passes on the new token only), with
/// non-granular scalings frozen after 3 decode steps (one pass afterwards), and cache-free recomputation (PEFT's way: both
/// passes over the whole sequence at every step). Cached variants: ms/token = (time for 1 + N new tokens − time for 1) / N,
/// so the prefill cancels; cache-free: the mean over the N steps of a full two-pass forward of the growing sequence.
/// Medians over repetitions whose variant order alternates; every variant warmed up first.
/// </summary>
internal static class XLoraBench
{
    private const int Rank = 16, Alpha = 32, Experts = 4, PromptLen = 64, PrefillLen = 512, NonGranular = 3;

    public static void Run(double peak, bool quick, string? jsonPath)
    {
        int newTokens = quick ? 16 : 256, reps = quick ? 2 : 3, freeTokens = quick ? 8 : 256;
        var cfg = ModelPresets.Get("small");
        string dir = Path.Combine(Path.GetTempPath(), "loramix-bench-xlora-" + Guid.NewGuid().ToString("N"));
        try
        {
            using var model = ModelPresets.CreateRandom("small", seed: 0);
            var lora = new LoraConfig { R = Rank, LoraAlpha = Alpha, AllLinear = true, TargetModules = null };
            var experts = new List<(string, string)>();
            using (no_grad())
                for (int i = 0; i < Experts; i++)
                {
                    string name = $"e{i}";
                    LoraAdapters.Attach(model, lora, name, seed: 1 + i);
                    foreach (var (key, t) in LoraAdapters.PeftStateDict(model, name))
                        if (key.EndsWith(".lora_B.weight", StringComparison.Ordinal)) t.normal_(0, 0.02);
                    LoraAdapters.Save(model, lora, Path.Combine(dir, name), name);
                    if (i > 0) LoraAdapters.Remove(model, name);
                    experts.Add((name, Path.Combine(dir, name)));
                }
            // e0 stays attached as the plain LoRA baseline; the X-LoRA loads its own copies of the experts
            XLoraAdapters.Create(model, new XLoraConfig { HiddenSize = cfg.HiddenSize, Adapters = experts }, "xl", seed: 5);
            model.eval();

            var rnd = new Random(11);
            IReadOnlyList<int> prompt = Enumerable.Range(0, PromptLen).Select(_ => rnd.Next(3, cfg.VocabSize)).ToArray();
            var gen = new TokenGenerator(model);
            var variants = new (string Key, string Label, GenerationOptions Options)[]
            {
                ("base", "base model", Options(AdapterSelection.Base, null, 0)),
                ("lora", "base + one LoRA (unmerged)", Options(AdapterSelection.Of("e0"), null, 0)),
                ("xlora_dual", "X-LoRA, dual KV cache", Options(AdapterSelection.Of("xl"), null, 0)),
                ("xlora_nongranular", $"X-LoRA, non-granular (frozen after {NonGranular} decode steps)", Options(AdapterSelection.Of("xl"), NonGranular, 0)),
            };
            Console.WriteLine($"X-LoRA bench: small ({cfg.ParameterCount() / 1e6:F1}M), {Experts} experts r={Rank} on all 7 projections, depth-1 head, fp32, batch 1");
            Console.WriteLine($"  decode: {PromptLen}-token prompt, {newTokens} new tokens (greedy, EOS ignored), {reps} alternating repetitions, medians");
            foreach (var v in variants) { gen.Generate(prompt, v.Options with { MaxNewTokens = 2 }); }   // warm-up
            var shortT = variants.ToDictionary(v => v.Key, _ => new List<double>());
            var longT = variants.ToDictionary(v => v.Key, _ => new List<double>());
            for (int r = 0; r < reps; r++)
            {
                var order = r % 2 == 0 ? variants : variants.Reverse().ToArray();
                foreach (var v in order)
                {
                    shortT[v.Key].Add(MixLoraBench.Time(() => gen.Generate(prompt, v.Options with { MaxNewTokens = 1 })));
                    longT[v.Key].Add(MixLoraBench.Time(() => gen.Generate(prompt, v.Options with { MaxNewTokens = 1 + newTokens })));
                }
            }
            var perToken = variants.ToDictionary(v => v.Key, v => (MixLoraBench.Median(longT[v.Key]) - MixLoraBench.Median(shortT[v.Key])) / newTokens);

            // cache-free recomputation: both passes over the whole sequence for each new token (greedy)
            double cacheFree;
            using (no_grad())
            {
                var seq = prompt.Select(x => (long)x).ToList();
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < freeTokens; i++)
                {
                    using var scope = NewDisposeScope();
                    var logits = model.Forward(tensor(seq.ToArray()).unsqueeze(0), lastOnly: true, adapters: AdapterSelection.Of("xl"));
                    seq.Add(logits[0, 0].argmax().item<long>());
                }
                cacheFree = sw.Elapsed.TotalSeconds / freeTokens;
            }

            // prefill of 512 tokens
            var ids = randint(3, cfg.VocabSize, [1, PrefillLen], dtype: ScalarType.Int64);
            double Prefill(AdapterSelection sel)
            {
                var times = new List<double>();
                using var noGrad = no_grad();
                for (int i = 0; i < reps + 1; i++)
                {
                    using var scope = NewDisposeScope();
                    double t = MixLoraBench.Time(() => model.Forward(ids, adapters: sel));
                    if (i > 0) times.Add(t);
                }
                return MixLoraBench.Median(times);
            }
            var prefill = new Dictionary<string, double>
            {
                ["base"] = Prefill(AdapterSelection.Base), ["lora"] = Prefill(AdapterSelection.Of("e0")), ["xlora"] = Prefill(AdapterSelection.Of("xl")),
            };

            Console.WriteLine();
            Console.WriteLine($"| decode, batch 1, {PromptLen}-token prompt | ms/token | tokens/s | / LoRA |");
            Console.WriteLine("|---|---|---|---|");
            foreach (var v in variants)
                Console.WriteLine($"| {v.Label} | {perToken[v.Key] * 1000:F2} | {1 / perToken[v.Key]:F1} | {perToken[v.Key] / perToken["lora"]:F2} |");
            Console.WriteLine($"| X-LoRA, cache-free recomputation (PEFT), mean over {freeTokens} tokens | {cacheFree * 1000:F2} | {1 / cacheFree:F1} | {cacheFree / perToken["lora"]:F2} |");
            Console.WriteLine();
            Console.WriteLine($"| prefill, {PrefillLen} tokens | ms | / LoRA |");
            Console.WriteLine("|---|---|---|");
            foreach (var (k, v) in prefill) Console.WriteLine($"| {k} | {v * 1000:F1} | {v / prefill["lora"]:F2} |");
            Console.WriteLine();
            Console.WriteLine($"X-LoRA dual cache / LoRA: {perToken["xlora_dual"] / perToken["lora"]:F3} (goal <= 2.2); non-granular / LoRA: " +
                              $"{perToken["xlora_nongranular"] / perToken["lora"]:F3} (goal <= 1.3); cache-free / dual cache: {cacheFree / perToken["xlora_dual"]:F2}");

            if (jsonPath is not null)
            {
                var result = new JsonObject
                {
                    ["bench"] = "xlora", ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"), ["quick"] = quick,
                    ["libtorch"] = TorchSharp.torch.__version__, ["threads"] = get_num_threads(), ["cores"] = Environment.ProcessorCount,
                    ["matmul_peak_gflops"] = peak, ["preset"] = "small", ["experts"] = Experts, ["rank"] = Rank,
                    ["decode_prompt"] = PromptLen, ["decode_new_tokens"] = newTokens, ["cache_free_tokens"] = freeTokens,
                    ["decode_ms_per_token"] = new JsonObject(perToken.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value * 1000)))
                        .Append(KeyValuePair.Create("xlora_cache_free", (JsonNode?)JsonValue.Create(cacheFree * 1000)))),
                    ["prefill_ms"] = new JsonObject(prefill.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value * 1000)))),
                    ["ratio_dual_over_lora"] = perToken["xlora_dual"] / perToken["lora"],
                    ["ratio_nongranular_over_lora"] = perToken["xlora_nongranular"] / perToken["lora"],
                    ["ratio_cache_free_over_lora"] = cacheFree / perToken["lora"],
                };
                File.WriteAllText(jsonPath, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
                Console.WriteLine($"results written to {jsonPath}");
            }
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }

        static GenerationOptions Options(AdapterSelection sel, int? nonGranular, int _) => new()
        {
            Temperature = 0, StopAtEos = false, Adapters = sel, XLoraNonGranular = nonGranular, MaxNewTokens = 1,
        };
    }
}
