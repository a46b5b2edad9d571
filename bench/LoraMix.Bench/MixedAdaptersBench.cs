using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraMix.Adapters.Lora;
using LoraMix.Inference;
using LoraMix.Modeling;
using static TorchSharp.torch;

namespace LoraMix.Bench;

/// <summary>
/// Mixed-adapter batches (issue 14): on the `small` preset with 8 LoRA adapters attached (r=16, α=32, all 7 projections,
/// lora_B drawn from N(0, 0.02) so that no adapter is a no-op), greedy KV-cached decode at batch 8 (128-token prompts of
/// differing content) where the rows use 1, 2, 4 or 8 different adapters (round-robin: row i runs adapter i mod k), against
/// the base model at batch 8 and against the 8 adapters run one after another at batch 1 (one generation each, same
/// prompt length and token count; time per step = the sum of the 8 generations' per-step times, 8 tokens per step).
/// Per-step time is the difference between generating 1 and 1 + N tokens (the prefill cancels), divided by N; medians
/// over repetitions whose variant order alternates (A B C ..., ... C B A) so that drift on a shared machine hits every
/// variant alike; every variant is warmed up first.
/// </summary>
internal static class MixedAdaptersBench
{
    private const int Rank = 16, Alpha = 32, Adapters = 8, Batch = 8, PromptLen = 128;
    private const double InitB = 0.02;

    private sealed record Variant(string Key, string Label, int? Distinct, Func<GenerationOptions, object> Run);

    public static void Run(double peak, bool quick, string? jsonPath)
    {
        int newTokens = quick ? 16 : 64, reps = quick ? 2 : 5;
        var cfg = ModelPresets.Get("small");
        long p = cfg.ParameterCount();

        using var model = ModelPresets.CreateRandom("small", seed: 0);
        var lora = new LoraConfig { R = Rank, LoraAlpha = Alpha, AllLinear = true, TargetModules = null };
        var names = Enumerable.Range(0, Adapters).Select(i => $"a{i}").ToArray();
        random.manual_seed(1234);
        using (no_grad())
        {
            for (int i = 0; i < Adapters; i++)
            {
                LoraAdapters.Attach(model, lora, names[i], seed: 1 + i);
                foreach (var (key, t) in LoraAdapters.PeftStateDict(model, names[i]))
                    if (key.EndsWith(".lora_B.weight", StringComparison.Ordinal)) t.normal_(0, InitB);
            }
        }
        model.eval();
        long perAdapter = LoraAdapters.PeftStateDict(model, names[0]).Sum(kv => kv.Value.numel());

        var rnd = new Random(11);
        var prompts = Enumerable.Range(0, Batch)
            .Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, PromptLen).Select(_ => rnd.Next(3, cfg.VocabSize)).ToArray()).ToList();

        Console.WriteLine($"mixed-adapter bench: small ({p / 1e6:F1}M base parameters), {Adapters} LoRA adapters r={Rank} α={Alpha} on all 7 projections " +
                          $"({perAdapter / 1e6:F2}M each, lora_B ~ N(0, {InitB})), fp32");
        Console.WriteLine($"  greedy decode, batch {Batch}, {PromptLen}-token prompts (distinct content), {newTokens} new tokens, " +
                          $"{reps} alternating repetitions per variant, medians");

        var gen = new TokenGenerator(model);
        AdapterSelection RoundRobin(int k) => AdapterSelection.PerRow(Enumerable.Range(0, Batch).Select(r => AdapterChoice.Of(names[r % k])));
        Func<GenerationOptions, object> Batched(AdapterSelection? sel) => o => gen.Generate(prompts, o with { Adapters = sel });

        var variants = new List<Variant> { new("base", "base model (no adapter), batch 8", null, Batched(null)) };
        foreach (int k in new[] { 1, 2, 4, 8 })
            variants.Add(new($"mixed_{k}", $"{k} adapter{(k == 1 ? "" : "s")} in the batch of 8", k,
                Batched(k == 1 ? AdapterSelection.Of(names[0]) : RoundRobin(k))));
        variants.Add(new("sequential", "8 adapters one after another, batch 1 each", null, o =>
            Enumerable.Range(0, Adapters).Select(i => gen.Generate([prompts[i]], o with { Adapters = AdapterSelection.Of(names[i]) })[0]).ToList()));

        var shortOpts = new GenerationOptions { MaxNewTokens = 1, Temperature = 0, StopAtEos = false };
        var longOpts = shortOpts with { MaxNewTokens = newTokens + 1 };

        // warm-up (JIT, allocator, kernels): one full-length run of every variant; its tokens are kept for a sanity check
        var warm = new Dictionary<string, object>();
        foreach (var v in variants) warm[v.Key] = v.Run(longOpts);

        var shortT = variants.ToDictionary(v => v.Key, _ => new List<double>());
        var longT = variants.ToDictionary(v => v.Key, _ => new List<double>());
        for (int r = 0; r < reps; r++)
        {
            var order = r % 2 == 0 ? variants : Enumerable.Reverse(variants).ToList();
            foreach (var v in order)
            {
                shortT[v.Key].Add(MixLoraBench.Time(() => v.Run(shortOpts)));
                longT[v.Key].Add(MixLoraBench.Time(() => v.Run(longOpts)));
            }
        }

        // per step: the batch-8 variants produce 8 tokens per step; "sequential" produces 8 tokens (one per adapter) in
        // the sum of its 8 generations' steps, which is what the difference of its totals measures
        var step = variants.ToDictionary(v => v.Key, v => (MixLoraBench.Median(longT[v.Key]) - MixLoraBench.Median(shortT[v.Key])) / newTokens);
        double Tps(string key) => Batch / step[key];
        double one = Tps("mixed_1"), seq = Tps("sequential");

        Console.WriteLine();
        Console.WriteLine($"| adapters in batch | ms/step | tokens/s | ratio vs 1 adapter | ratio vs sequential |");
        Console.WriteLine("|---|---|---|---|---|");
        var decode = new JsonObject();
        foreach (var v in variants)
        {
            double tps = Tps(v.Key);
            string label = v.Key switch { "base" => "base (no adapter), batch 8", "sequential" => "8 × batch 1, one after another", _ => $"{v.Distinct}" };
            Console.WriteLine($"| {label} | {step[v.Key] * 1000:F2} | {tps:F1} | {tps / one:F3} | {tps / seq:F3} |");
            decode[v.Key] = new JsonObject
            {
                ["label"] = v.Label, ["distinct_adapters"] = v.Distinct, ["ms_per_step"] = step[v.Key] * 1000, ["tokens_per_s"] = tps,
                ["ratio_vs_one_adapter"] = tps / one, ["ratio_vs_sequential"] = tps / seq,
                ["short_s"] = new JsonArray(shortT[v.Key].Select(x => (JsonNode)x).ToArray()),
                ["long_s"] = new JsonArray(longT[v.Key].Select(x => (JsonNode)x).ToArray()),
            };
        }
        double vsOne = Tps("mixed_8") / one, vsSeq = Tps("mixed_8") / seq;
        Console.WriteLine();
        Console.WriteLine($"goal: 8 different adapters in one batch >= 0.8x one adapter:  {vsOne:F3}x  {(vsOne >= 0.8 ? "PASS" : "MISS")}");
        Console.WriteLine($"goal: 8 different adapters in one batch >= 3x one-after-another: {vsSeq:F3}x  {(vsSeq >= 3 ? "PASS" : "MISS")}");
        Console.WriteLine($"base / 1 adapter time per step: {step["mixed_1"] / step["base"]:F3} (the cost of one unmerged LoRA on every projection)");

        // sanity (not timed): the adapters change the output, and a mixed batch row matches its adapter run alone
        var baseTok = (IReadOnlyList<GeneratedSequence>)warm["base"];
        var mixTok = (IReadOnlyList<GeneratedSequence>)warm["mixed_8"];
        var seqTok = (IReadOnlyList<GeneratedSequence>)warm["sequential"];
        int differFromBase = Enumerable.Range(0, Batch).Count(i => !mixTok[i].Tokens.SequenceEqual(baseTok[i].Tokens));
        int matchSeq = Enumerable.Range(0, Batch).Count(i => mixTok[i].Tokens.SequenceEqual(seqTok[i].Tokens));
        Console.WriteLine($"check: 8-adapter batch rows whose tokens differ from the base model: {differFromBase}/{Batch}; " +
                          $"equal to the same adapter at batch 1: {matchSeq}/{Batch} (greedy; fp32 batch/no-batch rounding can flip near-ties)");

        if (jsonPath is not null)
        {
            var result = new JsonObject
            {
                ["bench"] = "mixed", ["date"] = DateTime.UtcNow.ToString("yyyy-MM-dd"), ["quick"] = quick,
                ["libtorch"] = TorchSharp.torch.__version__, ["threads"] = get_num_threads(), ["cores"] = Environment.ProcessorCount,
                ["matmul_peak_gflops"] = peak, ["preset"] = "small", ["dtype"] = "float32",
                ["adapters"] = Adapters, ["rank"] = Rank, ["alpha"] = Alpha, ["lora_b_init_std"] = InitB, ["adapter_parameters"] = perAdapter,
                ["batch"] = Batch, ["prompt"] = PromptLen, ["new_tokens"] = newTokens, ["repetitions"] = reps,
                ["decode"] = decode,
                ["ratio_8_over_1"] = vsOne, ["goal_8_over_1"] = 0.8, ["pass_8_over_1"] = vsOne >= 0.8,
                ["ratio_8_over_sequential"] = vsSeq, ["goal_8_over_sequential"] = 3.0, ["pass_8_over_sequential"] = vsSeq >= 3,
                ["rows_differing_from_base"] = differFromBase, ["rows_matching_batch1"] = matchSeq,
            };
            File.WriteAllText(jsonPath, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            Console.WriteLine($"results written to {jsonPath}");
        }
    }
}
