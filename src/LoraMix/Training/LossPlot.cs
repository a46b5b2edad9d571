namespace LoraMix.Training;

/// <summary>Draws <c>loss.png</c>: the training loss per logged step as a line and evaluation losses as points (ScottPlot).</summary>
public static class LossPlot
{
    public const string FileName = "loss.png";

    /// <summary>Renders the curves and writes the PNG atomically.</summary>
    public static void Write(string path, IReadOnlyList<(int Step, double Loss)> train, IReadOnlyList<(int Step, double Loss)> eval,
        int width = 900, int height = 540)
    {
        var plot = new ScottPlot.Plot();
        var t = train.Where(p => double.IsFinite(p.Loss)).ToList();
        var e = eval.Where(p => double.IsFinite(p.Loss)).ToList();
        if (t.Count > 0)
        {
            var line = plot.Add.Scatter(t.Select(p => (double)p.Step).ToArray(), t.Select(p => p.Loss).ToArray());
            line.LegendText = "train loss";
            line.MarkerSize = t.Count == 1 ? 6 : 0;
            line.LineWidth = 2;
        }
        if (e.Count > 0)
        {
            var points = plot.Add.Scatter(e.Select(p => (double)p.Step).ToArray(), e.Select(p => p.Loss).ToArray());
            points.LegendText = "eval loss";
            points.LineWidth = 0;
            points.MarkerSize = 9;
        }
        plot.Title("LoraMix training loss");
        plot.XLabel("step");
        plot.YLabel("loss");
        if (t.Count + e.Count > 0) plot.ShowLegend();
        var bytes = plot.GetImageBytes(width, height, ScottPlot.ImageFormat.Png);
        AtomicFile.Write(path, s => s.Write(bytes));
    }
}
