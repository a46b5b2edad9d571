using System.Text.Json.Nodes;
using LoraMix.Modeling;
using LoraMix.Adapters;
using LoraMix.Adapters.MixLora;
using LoraMix.Routing;
using LoraMix.Tests.Modeling;
using LoraMix.Tokenization;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

/// <summary>The ISE-style learned privilege embedding of a MixLoRA adapter (<c>privilege_embedding: true</c>).</summary>
public sealed class PrivilegeEmbeddingTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-ise-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static readonly long[] Ids = [1, 17, 300, 42, 8, 99, 5, 250, 3];
    private static readonly Privilege[] Labels =
    [
        Privilege.System, Privilege.System, Privilege.User, Privilege.User, Privilege.Untrusted, Privilege.Untrusted,
        Privilege.Untrusted, Privilege.System, Privilege.Assistant,
    ];

    private static MixLoraConfig Config(bool ise = true) => MixLoraTestKit.Config() with { PrivilegeEmbedding = ise, BaseModelNameOrPath = "tiny" };

    private static RoutingContext Routing(params Privilege[][] rows)
    {
        var r = new RoutingContext();
        r.SetPrivileges(rows);
        return r;
    }

    private static void RandomizeTable(LoraMix.Modeling.LlamaForCausalLM model, string adapter = "default", double std = 0.5)
    {
        using var noGrad = no_grad();
        var w = model.Model.EmbedTokens.GetPrivilegeEmbedding(adapter)!.Weight;
        using var gen = new TorchSharp.torch.Generator(7, CPU);
        w.copy_(empty(w.shape).normal_(0, std, gen));
    }

    [Fact]
    public void AFreshTableIsZeroAndLeavesTheLogitsUnchanged()
    {
        using var scope = NewDisposeScope();
        using var with = MixLoraTestKit.Model(Config(ise: true), 3);
        using var without = MixLoraTestKit.Model(Config(ise: false), 3);
        with.eval(); without.eval();
        var table = with.Model.EmbedTokens.GetPrivilegeEmbedding("default")!.Weight;
        Assert.Equal(new long[] { PrivilegeEmbedding.Levels, with.Config.HiddenSize }, table.shape);
        Assert.Equal(0.0, table.abs().max().item<float>());
        using var r1 = Routing(Labels);
        using var r2 = Routing(Labels);
        var ids = tensor(Ids).unsqueeze(0);
        Assert.True(with.Forward(ids, routing: r1, adapters: MixLoraTestKit.Default).equal(without.Forward(ids, routing: r2, adapters: MixLoraTestKit.Default)).all().item<bool>());
    }

    [Fact]
    public void TheForwardAddsEachTokensRowToItsEmbedding()
    {
        // independent computation: embeddings + table[label] looked up by hand, run with the table detached
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(Config(), 5);
        model.eval();
        RandomizeTable(model);
        var ids = tensor(Ids).unsqueeze(0);
        using var routing = Routing(Labels);
        var actual = model.Forward(ids, routing: routing, adapters: MixLoraTestKit.Default);

        var table = model.Model.EmbedTokens.GetPrivilegeEmbedding("default")!.Weight.detach().clone();
        var emb = model.Model.EmbedTokens.Weight.detach().index_select(0, ids.reshape(-1));
        var added = emb + stack(Labels.Select(l => table[(long)l]).ToArray()).to(emb.dtype);
        using var plainRouting = Routing(Labels);
        // the mixture without its privilege embedding: the same adapter's routers and experts, the table added by hand
        model.Model.EmbedTokens.RemovePrivilegeEmbedding("default");
        var hidden = model.ForwardEmbeddings(added.unsqueeze(0), routing: plainRouting, adapters: MixLoraTestKit.Default);
        var expected = nn.functional.linear(hidden, model.OutputWeight);
        Assert.True(TestModels.RelativeError(actual, expected) < 1e-5, $"relative error {TestModels.RelativeError(actual, expected)}");

        // and the table matters: the same ids with every label system give other logits
        model.Model.EmbedTokens.AddPrivilegeEmbedding("default").Weight.detach().copy_(table);
        using var allSystem = Routing(Enumerable.Repeat(Privilege.System, Ids.Length).ToArray());
        Assert.True(TestModels.RelativeError(model.Forward(ids, routing: allSystem, adapters: MixLoraTestKit.Default), actual) > 1e-3);
    }

    [Fact]
    public void WithoutLabelsTheForwardFailsClosed()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(Config(), 6);
        var e = Assert.Throws<InvalidOperationException>(() => model.Forward(tensor(Ids).unsqueeze(0), adapters: MixLoraTestKit.Default));
        Assert.Contains("privilege_embedding", e.Message);
        using var routing = Routing(Labels[..4]);
        Assert.Throws<ArgumentException>(() => model.Forward(tensor(Ids).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default));
    }

    [Fact]
    public void CachedDecodingEqualsTheFullForward()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(Config(), 8);
        model.eval();
        RandomizeTable(model);
        using var noGrad = no_grad();
        using var full = Routing(Labels);
        var expected = model.Forward(tensor(Ids).unsqueeze(0), routing: full, adapters: MixLoraTestKit.Default);

        int prompt = 6;
        using var cache = model.CreateCache(1, Ids.Length);
        using var step = Routing(Labels[..prompt]);
        var parts = new List<Tensor> { model.Forward(tensor(Ids[..prompt]).unsqueeze(0), cache, routing: step, adapters: MixLoraTestKit.Default) };
        for (int i = prompt; i < Ids.Length; i++)
        {
            step.SetPrivileges([[Labels[i]]]);
            parts.Add(model.Forward(tensor(new[] { Ids[i] }).unsqueeze(0), cache, routing: step, adapters: MixLoraTestKit.Default));
        }
        var actual = cat(parts.ToArray(), 1);
        Assert.True(TestModels.RelativeError(actual, expected) < 1e-5, $"relative error {TestModels.RelativeError(actual, expected)}");
    }

    [Fact]
    public void TrainingUpdatesTheRowsOfTheLabelsSeen()
    {
        using var scope = NewDisposeScope();
        using var model = MixLoraTestKit.Model(Config(), 9);
        var trainable = MixLoraAdapters.PrepareForTraining(model);
        var table = model.Model.EmbedTokens.GetPrivilegeEmbedding("default")!.Weight;
        Assert.Contains(trainable, p => ReferenceEquals(p, table));
        var labels = Labels.Select(l => l == Privilege.Assistant ? Privilege.User : l).ToArray();   // no assistant row in use
        using var routing = Routing(labels);
        var logits = model.Forward(tensor(Ids).unsqueeze(0), routing: routing, adapters: MixLoraTestKit.Default);
        logits.pow(2).mean().backward();
        var grad = table.grad!.abs().sum(1);
        Assert.True(grad[(long)Privilege.System].item<float>() > 0);
        Assert.True(grad[(long)Privilege.User].item<float>() > 0);
        Assert.True(grad[(long)Privilege.Untrusted].item<float>() > 0);
        Assert.Equal(0f, grad[(long)Privilege.Assistant].item<float>());
    }

    [Fact]
    public void ItIsSavedAndLoadedWithTheAdapter()
    {
        using var scope = NewDisposeScope();
        var config = Config();
        using var model = MixLoraTestKit.Model(config, 10);
        model.eval();
        RandomizeTable(model);
        using var r1 = Routing(Labels);
        var expected = model.Forward(tensor(Ids).unsqueeze(0), routing: r1, adapters: MixLoraTestKit.Default);
        MixLoraAdapters.Save(model, config, _dir);

        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(_dir, "adapter_config.json")))!.AsObject();
        Assert.True(cfg["privilege_embedding"]!.GetValue<bool>());
        var keys = MixLoraAdapters.StateDict(model).Select(kv => kv.Key).ToList();
        Assert.Equal(MixLoraAdapters.PrivilegeEmbeddingKey, keys[^1]);
        Assert.Single(keys, k => k.Contains("privilege", StringComparison.Ordinal));

        using var fresh = TestModels.Random(TestModels.Llama, 10);
        var loaded = MixLoraAdapters.Load(fresh, _dir, "again");
        fresh.eval();
        Assert.True(loaded.PrivilegeEmbedding);
        using var r2 = Routing(Labels);
        Assert.True(expected.equal(fresh.Forward(tensor(Ids).unsqueeze(0), routing: r2, adapters: AdapterSelection.Of("again"))).all().item<bool>());

        // removing the adapter removes its table: the base model needs no labels again
        MixLoraAdapters.Remove(fresh, "again");
        Assert.Empty(fresh.Model.EmbedTokens.PrivilegeEmbeddingNames);
        fresh.Forward(tensor(Ids).unsqueeze(0)).Dispose();
    }

    [Fact]
    public void WithoutTheFlagNoTableIsAttachedOrWritten()
    {
        using var scope = NewDisposeScope();
        var config = Config(ise: false);
        using var model = MixLoraTestKit.Model(config, 11);
        Assert.Empty(model.Model.EmbedTokens.PrivilegeEmbeddingNames);
        Assert.DoesNotContain("privilege_embedding", config.ToJson(), StringComparison.Ordinal);
        Assert.DoesNotContain(MixLoraAdapters.StateDict(model), kv => kv.Key == MixLoraAdapters.PrivilegeEmbeddingKey);
    }
}
