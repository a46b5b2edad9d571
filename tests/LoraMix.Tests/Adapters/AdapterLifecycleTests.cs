using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Tests.Modeling;
using LoraMix.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Tests.Adapters;

/// <summary>Adapters load and unload at run time on a loaded model, without reloading the base, and unloading frees them.</summary>
public sealed class AdapterLifecycleTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-lifecycle-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private (string Lora, string MixLora) SaveAdapters()
    {
        using var scope = NewDisposeScope();
        using var source = TestModels.Random(TestModels.Llama, 3);
        var lora = new LoraConfig { R = 4, LoraAlpha = 8, AllLinear = true, TargetModules = null };
        LoraAdapters.Attach(source, lora, "l", seed: 1);
        using (no_grad())
            foreach (var (key, t) in LoraAdapters.PeftStateDict(source, "l"))
                if (key.Contains("lora_B", StringComparison.Ordinal)) t.copy_(randn(t.shape, generator: new TorchSharp.torch.Generator(2)) * 0.1);
        var mix = MixLoraTestKit.Config() with { PrivilegeEmbedding = true };
        MixLoraAdapters.Attach(source, mix, "m", seed: 2);
        MixLoraTestKit.Randomize(source, "m", 4);
        string loraDir = Path.Combine(_dir, "lora"), mixDir = Path.Combine(_dir, "mixlora");
        LoraAdapters.Save(source, lora, loraDir, "l");
        MixLoraAdapters.Save(source, mix, mixDir, "m");
        return (loraDir, mixDir);
    }

    [Fact]
    public void LoadingAndUnloadingTwentyAdaptersInTurnLeavesTheLiveTensorCountFlat()
    {
        var (loraDir, mixDir) = SaveAdapters();
        using var model = TestModels.Random(TestModels.Llama, 7);
        model.eval();
        var ids = tensor(new long[] { 1, 5, 9, 13, 17 }).unsqueeze(0);
        using var labels = new LoraMix.Routing.RoutingContext();
        labels.SetPrivileges(Privilege.System, 1, 5);
        using var baseLogits = model.Forward(ids);

        // one round first: the slots become adapter-holding wrappers once (they take over the base tensors, no copies)
        LoraAdapters.Load(model, loraDir, "warm");
        LoraAdapters.Remove(model, "warm");
        var stats = DisposeScopeManager.Statistics;
        long before = stats.ThreadTotalLiveCount;
        var counts = new List<long>();
        for (int i = 0; i < 20; i++)
        {
            string name = $"adapter{i}";
            bool mix = i % 2 == 1;
            if (mix) MixLoraAdapters.Load(model, mixDir, name);
            else LoraAdapters.Load(model, loraDir, name);
            Assert.Equal(mix ? "mixlora" : "lora", model.Adapters[name]);
            using (var scope = NewDisposeScope())
            using (no_grad())
            {
                var logits = model.Forward(ids, routing: labels, adapters: AdapterSelection.Of(name));
                Assert.True(TestModels.RelativeError(logits, baseLogits) > 1e-4, $"{name} changed nothing");
            }
            if (mix) MixLoraAdapters.Remove(model, name);
            else LoraAdapters.Remove(model, name);
            Assert.False(model.Adapters.ContainsKey(name));
            counts.Add(stats.ThreadTotalLiveCount);
        }
        Assert.Equal(before, counts[^1]);
        Assert.All(counts, c => Assert.Equal(before, c));
        // the base model is untouched: the same logits as before any adapter, bit for bit
        using (no_grad()) Assert.True(model.Forward(ids).equal(baseLogits).all().item<bool>());
        Assert.Empty(model.Adapters);
        Assert.All(model.Model.Layers, l => Assert.IsType<LlamaMlp>(l.FeedForward));
        Assert.Empty(model.Model.EmbedTokens.PrivilegeEmbeddingNames);
    }

    [Fact]
    public void SelectingAnAdapterThatIsNotAttachedFailsNamingWhatIs()
    {
        var (loraDir, _) = SaveAdapters();
        using var model = TestModels.Random(TestModels.Llama, 8);
        var ids = tensor(new long[] { 1, 2, 3 }).unsqueeze(0);
        var none = Assert.Throws<ArgumentException>(() => model.Forward(ids, adapters: AdapterSelection.Of("math")));
        Assert.Contains("no adapters", none.Message);
        LoraAdapters.Load(model, loraDir, "code");
        var e = Assert.Throws<ArgumentException>(() => model.Forward(ids, adapters: AdapterSelection.Of("math")));
        Assert.Contains("'math'", e.Message);
        Assert.Contains("code", e.Message);
        var rows = Assert.Throws<ArgumentException>(() =>
            model.Forward(ids, adapters: AdapterSelection.PerRow([AdapterChoice.Of("code"), AdapterChoice.Base])));
        Assert.Contains("2 rows", rows.Message);
        Assert.Throws<ArgumentException>(() => LoraAdapters.Load(model, loraDir, "code"));   // the name is taken
    }

    [Fact]
    public void ChoicesParseAndPrintInOneForm()
    {
        Assert.Same(AdapterChoice.Base, AdapterChoice.Parse("base"));
        Assert.Equal(AdapterChoice.Of("math"), AdapterChoice.Parse(" math "));
        var c = AdapterChoice.Parse("math:0.7,code:0.3");
        Assert.Equal([new AdapterTerm("math", 0.7), new AdapterTerm("code", 0.3)], c.Terms);
        Assert.Equal(c, AdapterChoice.Parse(c.ToString()));
        Assert.Equal("math,code:0.5", AdapterChoice.Compose(new AdapterTerm("math"), new AdapterTerm("code", 0.5)).ToString());
        Assert.Throws<FormatException>(() => AdapterChoice.Parse(""));
        Assert.Throws<FormatException>(() => AdapterChoice.Parse("math:x"));
        Assert.Throws<FormatException>(() => AdapterChoice.Parse("math,math"));
        Assert.Throws<FormatException>(() => AdapterChoice.Parse("a.b"));
        Assert.Throws<FormatException>(() => AdapterChoice.Parse("math:NaN"));
        Assert.Throws<ArgumentException>(() => AdapterChoice.Of("base"));
        // a per-row selection whose rows all agree is one choice for any batch of that size
        var same = AdapterSelection.PerRow([AdapterChoice.Of("a"), AdapterChoice.Of("a")]);
        Assert.Equal(AdapterChoice.Of("a"), same.Uniform);
        Assert.Throws<ArgumentException>(() => same.CheckBatch(3));
        Assert.Throws<ArgumentException>(() => AdapterSelection.PerRow([]));
    }
}
