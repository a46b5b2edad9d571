using LoraMix.Modeling;
using LoraMix.Data;
using LoraMix.Inference;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Evaluation;

/// <summary>How one MoE layer's expert choice depends on the task family.</summary>
/// <param name="Layer">The decoder layer.</param>
/// <param name="Tokens">Answer tokens counted.</param>
/// <param name="MutualInformationBits">I(family; top expert) in bits, from the empirical joint counts.</param>
/// <param name="MaxBits">The largest possible value, min(log2 families, log2 experts): 0 = no dependence, this = the
/// family determines the expert.</param>
/// <param name="LoadByFamily">Per family, the share of its answer tokens whose top expert is each expert.</param>
public sealed record LayerSpecialisation(int Layer, long Tokens, double MutualInformationBits, double MaxBits,
    IReadOnlyDictionary<string, double[]> LoadByFamily);

/// <summary>
/// Do experts specialise by task? Runs each record's whole conversation (answer included) through a MixLoRA model with a
/// routing trace and, per layer, relates the task family to the top expert of every answer token (the tokens the
/// adapter was trained to produce): mutual information and per-family expert load.
/// </summary>
public static class ExpertSpecialisation
{
    /// <summary>Measures every MoE layer over the records that have a family and messages.</summary>
    public static IReadOnlyList<LayerSpecialisation> Measure(ChatEngine engine, IReadOnlyList<DatasetRecord> records, int numExperts,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(engine);
        ArgumentNullException.ThrowIfNull(records);
        ArgumentOutOfRangeException.ThrowIfLessThan(numExperts, 1);
        var families = records.Where(r => r.Family is not null).Select(r => r.Family!).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
        var familyIndex = families.Select((f, i) => (f, i)).ToDictionary(x => x.f, x => x.i, StringComparer.Ordinal);
        Dictionary<int, long[,]> counts = [];
        var layerOrder = new List<int>();
        foreach (var record in records)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (record.Family is null || record.Messages is null) continue;
            var rendered = engine.Renderer.Render(record.Messages);
            var trace = new RoutingTrace();
            using (var routing = new RoutingContext { Trace = trace })
            using (no_grad())
            using (var scope = NewDisposeScope())
            {
                routing.SetPrivileges([rendered.Privileges]);
                var ids = tensor(rendered.Ids.Select(i => (long)i).ToArray(), [1, rendered.Length], device: engine.Model.Device);
                engine.Model.Forward(ids, lastOnly: true, routing: routing, adapters: AdapterSelection.Of(engine.DefaultAdapters));
            }
            if (layerOrder.Count == 0) layerOrder.AddRange(trace.LayerIndices);
            var tokens = trace.Row(0);
            int f = familyIndex[record.Family];
            for (int t = 0; t < tokens.Count; t++)
            {
                if (!rendered.LossMask[t]) continue;
                for (int l = 0; l < tokens[t].Layers.Count; l++)
                {
                    var route = tokens[t].Layers[l];
                    if (route.Experts.Length == 0) continue;
                    int top = route.Experts[Array.IndexOf(route.Weights, route.Weights.Max())];
                    int layer = layerOrder[l];
                    if (!counts.TryGetValue(layer, out var c)) counts[layer] = c = new long[families.Count, numExperts];
                    c[f, top]++;
                }
            }
        }
        double maxBits = Math.Min(Math.Log2(Math.Max(1, families.Count)), Math.Log2(numExperts));
        return layerOrder.Where(counts.ContainsKey).Select(layer =>
        {
            var c = counts[layer];
            var load = new Dictionary<string, double[]>(StringComparer.Ordinal);
            for (int f = 0; f < families.Count; f++)
            {
                double n = 0;
                for (int e = 0; e < numExperts; e++) n += c[f, e];
                load[families[f]] = [.. Enumerable.Range(0, numExperts).Select(e => n == 0 ? 0 : c[f, e] / n)];
            }
            long total = 0;
            foreach (long v in c) total += v;
            return new LayerSpecialisation(layer, total, MutualInformationBits(c), maxBits, load);
        }).ToList();
    }

    /// <summary>I(X; Y) in bits of the empirical distribution given by joint counts [x, y] (0 for no counts).</summary>
    public static double MutualInformationBits(long[,] counts)
    {
        ArgumentNullException.ThrowIfNull(counts);
        int nx = counts.GetLength(0), ny = counts.GetLength(1);
        double total = 0;
        var px = new double[nx];
        var py = new double[ny];
        for (int x = 0; x < nx; x++)
            for (int y = 0; y < ny; y++)
            {
                total += counts[x, y];
                px[x] += counts[x, y];
                py[y] += counts[x, y];
            }
        if (total == 0) return 0;
        double mi = 0;
        for (int x = 0; x < nx; x++)
            for (int y = 0; y < ny; y++)
            {
                if (counts[x, y] == 0) continue;
                double pxy = counts[x, y] / total;
                mi += pxy * Math.Log2(pxy / (px[x] / total * (py[y] / total)));
            }
        return Math.Max(0, mi);
    }

    /// <summary>Draws the per-family expert load of every layer as one heatmap (rows: families; columns: layer × expert).</summary>
    public static void WriteHeatmap(string path, IReadOnlyList<LayerSpecialisation> layers, string title = "expert load per task family (answer tokens, top expert)")
    {
        ArgumentNullException.ThrowIfNull(layers);
        if (layers.Count == 0) throw new ArgumentException("no MoE layers to draw", nameof(layers));
        var families = layers[0].LoadByFamily.Keys.Order(StringComparer.Ordinal).ToList();
        int experts = layers[0].LoadByFamily[families[0]].Length;
        var data = new double[families.Count, layers.Count * experts];
        for (int f = 0; f < families.Count; f++)
            for (int l = 0; l < layers.Count; l++)
                for (int e = 0; e < experts; e++)
                    data[families.Count - 1 - f, l * experts + e] = layers[l].LoadByFamily[families[f]][e];   // drawn at y = f

        var plot = new ScottPlot.Plot();
        var hm = plot.Add.Heatmap(data);
        hm.Colormap = new ScottPlot.Colormaps.Viridis();
        hm.ManualRange = new ScottPlot.Range(0, 1);
        plot.Add.ColorBar(hm).Label = "share of the family's answer tokens";
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            [.. families.Select((f, i) => new ScottPlot.Tick(i, f))]);
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            [.. Enumerable.Range(0, layers.Count * experts).Select(i => new ScottPlot.Tick(i, $"L{layers[i / experts].Layer}E{i % experts}"))]);
        plot.Axes.Bottom.TickLabelStyle.Rotation = 90;
        plot.Axes.Bottom.TickLabelStyle.Alignment = ScottPlot.Alignment.MiddleLeft;
        for (int l = 1; l < layers.Count; l++)
        {
            var line = plot.Add.VerticalLine(l * experts - 0.5);
            line.Color = ScottPlot.Colors.White;
            line.LineWidth = 2;
        }
        plot.Title(title);
        plot.XLabel("layer, expert");
        var bytes = plot.GetImageBytes(Math.Clamp(260 + layers.Count * experts * 28, 640, 2400), Math.Clamp(240 + families.Count * 40, 360, 1200),
            ScottPlot.ImageFormat.Png);
        AtomicFile.Write(path, s => s.Write(bytes));
    }
}
