namespace LoraMix.Tests.Reference;

/// <summary>
/// Checks the plain-C# llama2.c reference (<see cref="Llama2cReference"/>) against greedy ids produced by the real
/// llama2.c run.c (see the provenance comments in Golden/stories260K_llama2c_greedy.txt).
/// </summary>
public class Llama2cReferenceTests
{
    internal const string CheckpointRelativePath = "models/stories260K/stories260K.bin";
    internal const string GoldenRelativePath = "Golden/stories260K_llama2c_greedy.txt";

    /// <summary>Parses the golden file: '#' comment lines, then one line of space-separated generated ids.</summary>
    internal static List<int> LoadGoldenIds()
    {
        string path = SharedAssets.FindTestFile(GoldenRelativePath)
            ?? throw new FileNotFoundException($"golden file {GoldenRelativePath} not found above {AppContext.BaseDirectory}");
        string[] dataLines = File.ReadAllLines(path)
            .Select(l => l.Trim())
            .Where(l => l.Length > 0 && !l.StartsWith('#'))
            .ToArray();
        Assert.Single(dataLines);
        return dataLines[0].Split(' ').Select(int.Parse).ToList();
    }

    private static Llama2cReference LoadModel()
    {
        string path = SharedAssets.Find(CheckpointRelativePath)
            ?? throw new FileNotFoundException(CheckpointRelativePath);
        return Llama2cReference.Load(path);
    }

    [SharedAssetFact(CheckpointRelativePath)]
    public void Header_MatchesDocumentedHyperparameters()
    {
        var m = LoadModel();
        Assert.Equal(
            (64, 172, 5, 8, 4, 512, 512),
            (m.Dim, m.HiddenDim, m.Layers, m.Heads, m.KvHeads, m.Vocab, m.SeqLen));
        Assert.True(m.SharedClassifier);
    }

    [SharedAssetFact(CheckpointRelativePath)]
    public void GreedyFromBos_MatchesLlama2cRunC()
    {
        List<int> golden = LoadGoldenIds();
        Assert.Equal(256, golden.Count);

        var m = LoadModel();
        List<int> ids = m.GenerateGreedy(firstToken: 1, steps: 256, stopOnBos: true);

        Assert.Equal(golden, ids);
    }

    [SharedAssetFact(CheckpointRelativePath)]
    public void GreedyFromBos_ShorterRunIsPrefix()
    {
        // run.c with -n 64 printed exactly the first 64 golden ids.
        List<int> golden = LoadGoldenIds();
        var m = LoadModel();
        List<int> ids = m.GenerateGreedy(firstToken: 1, steps: 64, stopOnBos: true);
        Assert.Equal(golden.Take(64), ids);
    }

    [SharedAssetFact(CheckpointRelativePath)]
    public void Forward_LogitsAreFiniteAndDeterministic()
    {
        var a = LoadModel();
        var b = LoadModel();
        float[] la = a.Forward(1, 0);
        float[] lb = b.Forward(1, 0);
        Assert.Equal(512, la.Length);
        Assert.All(la, v => Assert.True(float.IsFinite(v)));
        Assert.Equal(la, lb);
        // Restarting at pos 0 overwrites the cache, so re-running gives identical logits.
        a.Forward(461, 1);
        Assert.Equal(la, a.Forward(1, 0));
    }
}
