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

        var values = new double[layers, tokens];
        for (int l = 0; l < layers; l++)
            for (int t = 0; t < tokens; t++)
                values[l, t] = experts[l, t] < 0 ? double.NaN : experts[l, t];
        Draw(path, values, Enumerable.Range(0, layers).Select(l => $"L{l}").ToList(), 0, Math.Max(1, numExperts - 1), "expert",
            tokenLabels, privileges, title, "layer");
    }

    /// <summary>
    /// Writes a heatmap of continuous values <c>[row, token]</c> (e.g. one X-LoRA expert's scalings per wrapped module and
    /// token), with untrusted spans shaded as in <see cref="Write"/>; the colour scale spans [<paramref name="min"/>,
    /// <paramref name="max"/>]. Row 0 is drawn at the bottom.
    /// </summary>
    public static void WriteValues(string path, double[,] values, IReadOnlyList<string> rowLabels, double min, double max, string valueLabel,
        IReadOnlyList<string>? tokenLabels, IReadOnlyList<Privilege>? privileges, string title, string rowAxis)
    {
        ArgumentNullException.ThrowIfNull(values);
        if (rowLabels.Count != values.GetLength(0))
            throw new ArgumentException($"{rowLabels.Count} row labels for {values.GetLength(0)} rows", nameof(rowLabels));
        if (tokenLabels is not null && tokenLabels.Count != values.GetLength(1))
            throw new ArgumentException($"{tokenLabels.Count} token labels for {values.GetLength(1)} tokens", nameof(tokenLabels));
        if (privileges is not null && privileges.Count != values.GetLength(1))
            throw new ArgumentException($"{privileges.Count} privileges for {values.GetLength(1)} tokens", nameof(privileges));
        Draw(path, values, rowLabels, min, max == min ? min + 1 : max, valueLabel, tokenLabels, privileges, title, rowAxis);
    }

    private static void Draw(string path, double[,] values, IReadOnlyList<string> rowLabels, double min, double max, string valueLabel,
        IReadOnlyList<string>? tokenLabels, IReadOnlyList<Privilege>? privileges, string title, string rowAxis)
    {
        int rows = values.GetLength(0), tokens = values.GetLength(1);
        // ScottPlot draws data row r at y = rows − 1 − r (row 0 on top): put row 0 in the last data row, at y = 0.
        var data = new double[rows, tokens];
        for (int l = 0; l < rows; l++)
            for (int t = 0; t < tokens; t++)
                data[rows - 1 - l, t] = values[l, t];

        var plot = new ScottPlot.Plot();
        var hm = plot.Add.Heatmap(data);
        hm.Colormap = new ScottPlot.Colormaps.Turbo();
        hm.ManualRange = new ScottPlot.Range(min, max);
        hm.NaNCellColor = ScottPlot.Colors.White;
        var bar = plot.Add.ColorBar(hm);
        bar.Label = valueLabel;

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
        // label every row when there are few, else every k-th (a 32-layer model has 224 wrapped modules)
        int every = Math.Max(1, rows / 48);
        var rowTicks = Enumerable.Range(0, rows).Where(l => l % every == 0).Select(l => new ScottPlot.Tick(l, rowLabels[l])).ToArray();
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericManual(rowTicks);
        plot.Title(title);
        plot.XLabel("token");
        plot.YLabel(rowAxis);
        int width = Math.Clamp(220 + tokens * 14, 640, 2400);
        int height = Math.Clamp(260 + Math.Min(rows, 48) * 28, 360, 1600);
        var bytes = plot.GetImageBytes(width, height, ScottPlot.ImageFormat.Png);
        AtomicFile.Write(path, s => s.Write(bytes));
    }

    private static string Shorten(string piece)
    {
        string s = piece.Replace("\n", "\\n", StringComparison.Ordinal).Replace("\t", "\\t", StringComparison.Ordinal);
        return s.Length <= 10 ? s : s[..9] + "…";
    }
}
