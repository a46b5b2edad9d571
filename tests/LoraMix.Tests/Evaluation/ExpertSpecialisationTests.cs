using LoraMix.Adapters.MixLora;
using LoraMix.Data;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Adapters;
using LoraMix.Tests.Training;

namespace LoraMix.Tests.Evaluation;

/// <summary>Expert specialisation: the mutual-information estimate against an entropy identity, and the per-family loads
/// of a real MixLoRA model against a direct count over its routing trace.</summary>
public sealed class ExpertSpecialisationTests : IDisposable
{
    private readonly TempDir _dir = new();

    public ExpertSpecialisationTests() => Directory.CreateDirectory(_dir.Path);

    public void Dispose() => _dir.Dispose();

    private static double Entropy(IEnumerable<long> counts)
    {
        var c = counts.Where(x => x > 0).Select(x => (double)x).ToArray();
        double n = c.Sum();
        return -c.Sum(x => x / n * Math.Log(x / n, 2));
    }

    [Fact]
    public void MutualInformationIsHxPlusHyMinusHxy()
    {
        var rng = new Random(5);
        for (int trial = 0; trial < 50; trial++)
        {
            int nx = rng.Next(1, 6), ny = rng.Next(1, 9);
            var c = new long[nx, ny];
            for (int x = 0; x < nx; x++)
                for (int y = 0; y < ny; y++)
                    c[x, y] = rng.Next(4) == 0 ? 0 : rng.Next(1, 50);
            var rows = Enumerable.Range(0, nx).Select(x => Enumerable.Range(0, ny).Sum(y => c[x, y]));
            var cols = Enumerable.Range(0, ny).Select(y => Enumerable.Range(0, nx).Sum(x => c[x, y]));
            double expected = Entropy(rows) + Entropy(cols) - Entropy(c.Cast<long>());
            Assert.Equal(Math.Max(0, expected), ExpertSpecialisation.MutualInformationBits(c), 9);
        }
        // a family that determines the expert: log2 of the number of families; independence: 0
        Assert.Equal(Math.Log2(3), ExpertSpecialisation.MutualInformationBits(new long[,] { { 7, 0, 0 }, { 0, 7, 0 }, { 0, 0, 7 } }), 12);
        Assert.Equal(0, ExpertSpecialisation.MutualInformationBits(new long[,] { { 2, 4 }, { 3, 6 } }), 12);
        Assert.Equal(0, ExpertSpecialisation.MutualInformationBits(new long[2, 2]));
    }

    [Fact]
    public void LoadsCountEveryAnswerTokenOnceInEveryLayerAndSumToOne()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        string adapter = _dir.Sub("mix");
        var config = MixLoraTestKit.Config() with { LoraDropout = 0 };
        using (var m = LlamaForCausalLM.FromPretrained(model))
        {
            MixLoraAdapters.Attach(m, config, seed: 3);
            MixLoraTestKit.Randomize(m, "default", 4);
            MixLoraAdapters.Save(m, config, adapter);
        }
        var records = new LoraMix.Workflows.TaskWorldSource(["last_word", "uppercase"], 6, 1, TaskSplit.Test, null).Records();
        using var engine = ChatEngine.Load(model, new EngineOptions { Adapters = [adapter] });
        var layers = ExpertSpecialisation.Measure(engine, records, config.NumExperts);

        long answerTokens = records.Sum(r => engine.Renderer.Render(r.Messages!).LossMask.Count(x => x));
        Assert.Equal(engine.Model.Config.NumHiddenLayers, layers.Count);
        foreach (var l in layers)
        {
            Assert.Equal(answerTokens, l.Tokens);
            Assert.Equal(["last_word", "uppercase"], l.LoadByFamily.Keys.Order(StringComparer.Ordinal));
            foreach (var load in l.LoadByFamily.Values) Assert.Equal(1.0, load.Sum(), 9);
            Assert.InRange(l.MutualInformationBits, 0, l.MaxBits + 1e-12);
            Assert.Equal(1.0, l.MaxBits, 12);   // min(log2 2 families, log2 4 experts)
        }
        string png = _dir.Sub("load.png");
        ExpertSpecialisation.WriteHeatmap(png, layers);
        Assert.Equal([0x89, 0x50, 0x4E, 0x47], File.ReadAllBytes(png).Take(4));
    }
}
