using System.Text;
using LoraMix.Adapters.MixLora;
using LoraMix.Configuration;
using LoraMix.Data;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tests.Adapters;
using LoraMix.Tokenization;
using LoraMix.Training;
using LoraMix.Workflows;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

/// <summary>router_policy: privileged in training: privilege labels flow from the chat renderer through the collator into
/// the objective's routing context, aligned with the right-padded ids.</summary>
public sealed class PrivilegedTrainingTests
{
    private static readonly Privilege S = Privilege.System, U = Privilege.User, A = Privilege.Assistant, X = Privilege.Untrusted;

    /// <summary>A chat example of <paramref name="length"/> random tokens: system, user, then untrusted data from
    /// <paramref name="firstUntrusted"/> (none when -1), then an assistant tail; the tail is the target.</summary>
    private static TrainingExample Example(int seed, int length, int firstUntrusted)
    {
        var rng = new Random(seed);
        var ids = Enumerable.Range(0, length).Select(_ => rng.Next(0, 500)).ToArray();
        var labels = new Privilege[length];
        int assistantFrom = length - 3;
        for (int i = 0; i < length; i++)
            labels[i] = i >= assistantFrom ? A : firstUntrusted >= 0 && i >= firstUntrusted && i < firstUntrusted + 3 ? X : i < 2 ? S : U;
        var mask = labels.Select(l => l == A).ToArray();
        return new TrainingExample(ids, mask, labels);
    }

    private static MixLoraConfig Config(string policy) =>
        MixLoraTestKit.Config() with { LoraDropout = 0.0, RouterPolicy = policy, RouterZLossCoef = 0.01 };

    [Fact]
    public void ARecipeTrainsAPrivilegedMixLoraOnChatsWithDataMessagesAndKeepsThePolicy()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        var sb = new StringBuilder();
        for (int i = 0; i < 12; i++)
        {
            string input = $"ab{i % 10}c";
            string answer = new(input.Reverse().ToArray());
            sb.Append($$"""{"messages":[{"role":"system","content":"Reverse the data."},{"role":"data","content":"{{input}}"},{"role":"user","content":"go"},{"role":"assistant","content":"{{answer}}"}]}""").Append('\n');
        }
        string data = dir.Sub("data.jsonl");
        File.WriteAllText(data, sb.ToString());
        string outDir = dir.Sub("mix");
        string yaml = $"""
            model: {model}
            dataset: {data}
            val_size: 0.25
            output_dir: {outDir}
            cutoff_len: 256
            adapter:
              type: mixlora
              num_experts: 4
              top_k: 2
              r: 4
              lora_alpha: 8
              router_z_loss_coef: 0.001
              router_policy: privileged
              privileged_snapshot: pooled
              target_modules: all-linear
            learning_rate: 5.0e-3
            max_steps: 3
            batch_size: 4
            logging_steps: 1
            eval_steps: 3
            """;
        var result = TrainingRecipe.Parse(ConfigDocument.Parse(yaml, "priv.yaml")).Run();

        Assert.Equal(3, result.Training.GlobalStep);
        var cfg = MixLoraConfig.Load(Path.Combine(outDir, "adapter_config.json"));
        Assert.Equal(MixLoraConfig.PrivilegedPolicy, cfg.RouterPolicy);
        Assert.Equal(MixLoraConfig.PooledSnapshot, cfg.PrivilegedSnapshot);
        Assert.NotNull(result.Routing);                                          // evaluated under the policy too

        // packing would freeze later examples at an earlier example's data message: refused, clearly
        var packed = TrainingRecipe.Parse(ConfigDocument.Parse(yaml.Replace($"output_dir: {outDir}", $"output_dir: {dir.Sub("packed")}") + "\npacking: true\n", "priv.yaml"));
        var e = Assert.Throws<LoraMixException>(() => packed.Run());
        Assert.Contains("packing", e.Message);
        Assert.Contains("privileged", e.Message);

        // a learned privilege embedding trains on the same chats (and is saved); on text data, which has no labels, it is refused
        string iseOut = dir.Sub("ise");
        string iseYaml = yaml.Replace($"output_dir: {outDir}", $"output_dir: {iseOut}").Replace("  router_policy: privileged\n", "  privilege_embedding: true\n")
                             .Replace("  privileged_snapshot: pooled\n", "");
        Assert.Contains("privilege_embedding: true", iseYaml);
        TrainingRecipe.Parse(ConfigDocument.Parse(iseYaml, "ise.yaml")).Run();
        var iseCfg = MixLoraConfig.Load(Path.Combine(iseOut, "adapter_config.json"));
        Assert.True(iseCfg.PrivilegeEmbedding);
        Assert.Equal(MixLoraConfig.FreePolicy, iseCfg.RouterPolicy);
        string texts = dir.Sub("texts.jsonl");
        File.WriteAllText(texts, string.Concat(Enumerable.Range(0, 8).Select(i => $"{{\"text\": \"abc {i} cba\"}}\n")));
        var onText = TrainingRecipe.Parse(ConfigDocument.Parse(iseYaml.Replace($"dataset: {data}", $"dataset: {texts}")
            .Replace($"output_dir: {iseOut}", $"output_dir: {dir.Sub("ise-text")}"), "ise.yaml"));
        var te = Assert.Throws<LoraMixException>(() => onText.Run());
        Assert.Contains("privilege_embedding", te.Message);
        Assert.Contains("chat dataset", te.Message);
        Assert.False(File.Exists(Path.Combine(dir.Sub("ise-text"), "adapter_config.json")));
    }

    [Fact]
    public void ChatRecordsCarryTheRenderersPrivilegesAndTextRecordsNone()
    {
        using var dir = new TempDir();
        string model = RecipeFixtures.TinyByteModel(dir.Sub("base"));
        var renderer = new ChatRenderer(TextTokenizer.FromDirectory(model));
        var messages = new[] { ChatMessage.System("s"), ChatMessage.Data("d"), ChatMessage.Assistant("a") };
        var chat = TrainingData.FromRecord(new DatasetRecord(1, messages, null), renderer);
        Assert.Equal(renderer.Render(messages).Privileges, chat.Privileges);
        Assert.True(chat.HasUntrusted);
        Assert.Null(TrainingData.FromRecord(new DatasetRecord(2, null, "hello"), renderer).Privileges);

        // truncation cuts the labels with the ids; collation pads them on the right with System
        var collator = new DataCollator(cutoffLength: chat.InputIds.Length - 1);
        var prepared = collator.Prepare([chat, TrainingExample.AllTargets([1, 2, 3])], out _);
        Assert.Equal(chat.Privileges![..^1], prepared[0].Privileges);
        using var batch = collator.Collate(prepared);
        var labels = batch.Privileges!.data<byte>().ToArray();
        long t = batch.SequenceLength;
        Assert.Equal(prepared[0].Privileges!.Select(p => (byte)p), labels[..(int)t]);
        Assert.All(labels[(int)t..], l => Assert.Equal((byte)S, l));            // unlabelled row and its padding
    }

    [Theory]
    [InlineData(MixLoraConfig.LastSnapshot)]
    [InlineData(MixLoraConfig.PooledSnapshot)]
    public void LabelsReachThePolicyAlignedWithRightPaddedIds(string snapshot)
    {
        using var scope = NewDisposeScope();
        var config = Config(MixLoraConfig.PrivilegedPolicy) with { PrivilegedSnapshot = snapshot };
        using var model = MixLoraTestKit.Model(config, 41);
        var examples = new[] { Example(1, 14, 6), Example(2, 9, 3), Example(3, 17, 9), Example(4, 11, -1) };
        var collator = new DataCollator(64);
        using var batch = collator.Collate(examples);
        batch.Adapters = MixLoraTestKit.Default;
        Assert.True(examples.Select(e => e.InputIds.Length).Distinct().Count() > 1);

        // the objective's loss equals the sum of the rows' losses, each routed alone (no padding) under the policy
        var objective = new MixLoraObjective(config);
        double batched = objective.Compute(model, batch, training: true).TargetLossSum.item<float>();
        double rows = 0;
        foreach (var e in examples)
        {
            using var routing = new RoutingContext();
            routing.SetPrivileges([e.Privileges!]);
            using var one = collator.Collate([e]);
            rows += CausalLmObjective.ShiftedCrossEntropySum(model.Forward(one.InputIds, routing: routing, adapters: MixLoraTestKit.Default), one.Labels).item<float>();
        }
        Assert.Equal(rows, batched, 3);
        using var freeModel = MixLoraTestKit.Model(config with { RouterPolicy = MixLoraConfig.FreePolicy, PrivilegedSnapshot = MixLoraConfig.LastSnapshot }, 41);   // same weights
        double free = new MixLoraObjective(config).Compute(freeModel, batch, training: true).TargetLossSum.item<float>();
        Assert.NotEqual(free, batched, 3);                                         // the policy did change the routing

        if (snapshot != MixLoraConfig.LastSnapshot) return;
        // with the last-token snapshot, every token from the first untrusted one on is routed as the last privileged token
        using var traced = new RoutingContext { Trace = new RoutingTrace() };
        batch.ApplyPrivileges(traced);
        model.Forward(batch.InputIds, routing: traced, adapters: MixLoraTestKit.Default);
        for (int r = 0; r < examples.Length; r++)
        {
            var routes = traced.Trace!.Row(r);
            int first = Array.IndexOf(examples[r].Privileges!, X);
            if (first < 0) continue;
            var anchor = routes[first - 1].Layers;
            for (int i = first; i < examples[r].InputIds.Length; i++)
                for (int l = 0; l < anchor.Count; l++)
                {
                    Assert.Equal(anchor[l].Experts, routes[i].Layers[l].Experts);
                    Assert.Equal(anchor[l].Weights, routes[i].Layers[l].Weights);
                }
        }
    }

    [Fact]
    public void WithoutUntrustedTokensThePrivilegedObjectiveEqualsTheFreeOne()
    {
        using var scope = NewDisposeScope();
        using var privModel = MixLoraTestKit.Model(Config(MixLoraConfig.PrivilegedPolicy), 43);
        using var freeModel = MixLoraTestKit.Model(Config(MixLoraConfig.FreePolicy), 43);
        var examples = new[] { Example(5, 13, -1), Example(6, 8, -1), Example(7, 16, -1) };
        using var batch = new DataCollator(64).Collate(examples);
        batch.Adapters = MixLoraTestKit.Default;
        var priv = new MixLoraObjective(Config(MixLoraConfig.PrivilegedPolicy)).Compute(privModel, batch, training: true);
        var free = new MixLoraObjective(Config(MixLoraConfig.FreePolicy)).Compute(freeModel, batch, training: true);
        Assert.Equal(free.TargetLossSum.item<float>(), priv.TargetLossSum.item<float>(), 4);
        Assert.Equal(free.AuxiliaryLoss!.item<float>(), priv.AuxiliaryLoss!.item<float>(), 5);
        foreach (var (k, v) in free.Metrics!) Assert.Equal(v, priv.Metrics![k], 5);

        // and the plain causal-LM objective applies the labels too (the configured policy needs them)
        var causal = CausalLmObjective.Instance.Compute(privModel, batch, training: true);
        Assert.Equal(free.TargetLossSum.item<float>(), causal.TargetLossSum.item<float>(), 4);
    }
}
