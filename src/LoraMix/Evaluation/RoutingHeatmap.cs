using LoraMix.Tokenization;

namespace LoraMix.Evaluation;

/// <summary>
/// Draws a token × layer heatmap of routing decisions (ScottPlot): each cell is the top expert a layer chose for a
/// token; untrusted tokens are shaded so that frozen routing is visible at a glance.
/// </summary>
public static class RoutingHeatmap
{
    /// <summary>Writes the PNG atomically.</summary>
    /// <param name="path">Output file.</param>
    /// <param name="experts">[layer, token] top expert index (−1 for none, e.g. padding).</param>
    /// <param name="numExperts">Experts per layer (fixes the colour scale).</param>
    /// <param name="tokenLabels">One label per token (pieces); shown when there are at most 96 tokens.</param>
    /// <param name="privileges">Per-token privilege; untrusted spans get a translucent overlay. Optional.</param>
    /// <param name="title">Plot title.</param>
    public static void Write(string path, int[,] experts, int numExperts, IReadOnlyList<string>? tokenLabels = null,
        IReadOnlyList<Privilege>? privileges = null, string title = "routing: top expert per token and layer")
    {
        ArgumentNullException.ThrowIfNull(experts);
        ArgumentOutOfRangeException.ThrowIfLessThan(numExperts, 1);
        int layers = experts.GetLength(0), tokens = experts.GetLength(1);
        if (tokenLabels is not null && tokenLabels.Count != tokens)
            throw new ArgumentException($"{tokenLabels.Count} token labels for {tokens} tokens", nameof(tokenLabels));
        if (privileges is not null && privileges.Count != tokens)
            throw new ArgumentException($"{privileges.Count} privileges for {tokens} tokens", nameof(privileges));

        // ScottPlot draws data row r at y = rows − 1 − r (row 0 on top): put layer 0 in the last row, at y = 0.
        var data = new double[layers, tokens];
        for (int l = 0; l < layers; l++)
            for (int t = 0; t < tokens; t++)
                data[layers - 1 - l, t] = experts[l, t] < 0 ? double.NaN : experts[l, t];

        var plot = new ScottPlot.Plot();
        var hm = plot.Add.Heatmap(data);
        hm.Colormap = new ScottPlot.Colormaps.Turbo();
        hm.ManualRange = new ScottPlot.Range(0, Math.Max(1, numExperts - 1));
        hm.NaNCellColor = ScottPlot.Colors.White;
        var bar = plot.Add.ColorBar(hm);
        bar.Label = "expert";

        if (privileges is not null)
        {
            int t = 0;
            while (t < tokens)
            {
                if (privileges[t] != Privilege.Untrusted) { t++; continue; }
                int start = t;
                while (t < tokens && privileges[t] == Privilege.Untrusted) t++;
                var span = plot.Add.HorizontalSpan(start - 0.5, t - 0.5);
                span.FillStyle.Color = ScottPlot.Colors.Black.WithAlpha(0.18);
                span.LineStyle.Width = 0;
                span.LegendText = "untrusted";
            }
        }
        if (tokenLabels is not null && tokens <= 96)
        {
            var ticks = Enumerable.Range(0, tokens)
                .Select(i => new ScottPlot.Tick(i, Shorten(tokenLabels[i]))).ToArray();
            plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(ticks);
            plot.Axes.Bottom.TickLabelStyle.Rotation = 90;
            plot.Axes.Bottom.TickLabelStyle.Alignment = ScottPlot.Alignment.MiddleLeft;
        }
        var layerTicks = Enumerable.Range(0, layers).Select(l => new ScottPlot.Tick(l, $"L{l}")).ToArray();   // data row r is drawn at y = rows − 1 − r
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericManual(layerTicks);
        plot.Title(title);
        plot.XLabel("token");
        plot.YLabel("layer");
        int width = Math.Clamp(220 + tokens * 14, 640, 2400);
        int height = Math.Clamp(260 + layers * 28, 360, 1400);
        var bytes = plot.GetImageBytes(width, height, ScottPlot.ImageFormat.Png);
        AtomicFile.Write(path, s => s.Write(bytes));
    }

    private static string Shorten(string piece)
    {
        string s = piece.Replace("\n", "\\n", StringComparison.Ordinal).Replace("\t", "\\t", StringComparison.Ordinal);
        return s.Length <= 10 ? s : s[..9] + "…";
    }
}
