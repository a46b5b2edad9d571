using System.Globalization;
using System.Text.Json.Nodes;

namespace LoraMix.Evaluation;

/// <summary>A proportion with its 95% Wilson score interval.</summary>
/// <param name="Count">Successes.</param>
/// <param name="Total">Trials.</param>
/// <param name="Low">Lower bound of the interval.</param>
/// <param name="High">Upper bound of the interval.</param>
public sealed record RateWithInterval(int Count, int Total, double Low, double High)
{
    /// <summary>Count / Total (0 when there are no trials).</summary>
    public double Rate => Total == 0 ? 0 : (double)Count / Total;

    /// <summary>The rate and interval from counts.</summary>
    public static RateWithInterval Of(int count, int total)
    {
        var (lo, hi) = Wilson.Interval(count, total);
        return new RateWithInterval(count, total, lo, hi);
    }

    /// <summary>As JSON: count, total, rate, ci95 [low, high] (rounded to 4 decimals).</summary>
    public JsonObject ToJson() => new()
    {
        ["count"] = Count,
        ["total"] = Total,
        ["rate"] = Math.Round(Rate, 4),
        ["ci95"] = new JsonArray(Math.Round(Low, 4), Math.Round(High, 4)),
    };

    /// <summary><c>41.7% [32.1, 51.9]</c>.</summary>
    public string ToMarkdown() => Total == 0 ? "-"
        : string.Create(CultureInfo.InvariantCulture, $"{100 * Rate:F1}% [{100 * Low:F1}, {100 * High:F1}]");
}

/// <summary>The Wilson score interval for a binomial proportion.</summary>
public static class Wilson
{
    /// <summary>The standard normal quantile for a two-sided 95% interval.</summary>
    public const double Z95 = 1.959963984540054;

    /// <summary>The interval for <paramref name="successes"/> out of <paramref name="trials"/> at normal quantile
    /// <paramref name="z"/>; (0, 1) when there are no trials.</summary>
    public static (double Low, double High) Interval(int successes, int trials, double z = Z95)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(trials);
        if (successes < 0 || successes > trials)
            throw new ArgumentOutOfRangeException(nameof(successes), successes, $"must lie in [0, {trials}]");
        if (trials == 0) return (0, 1);
        double n = trials, p = successes / n, z2 = z * z;
        double denom = 1 + z2 / n;
        double centre = (p + z2 / (2 * n)) / denom;
        double half = z / denom * Math.Sqrt(p * (1 - p) / n + z2 / (4 * n * n));
        return (Math.Max(0, centre - half), Math.Min(1, centre + half));
    }
}
