using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraMix.Training;

/// <summary>
/// <c>metrics.jsonl</c>: one JSON object per line (step, epoch, loss, lr, grad_norm, tokens_per_s, elapsed_s, eta_s, the
/// objective's extras, and eval_loss / eval_ppl on evaluation steps). The file is append-only: each line is written and
/// flushed whole. It is the one file not written through <see cref="AtomicFile"/> (rewriting it per line would be
/// quadratic); a crash can at worst leave a torn last line, which <see cref="TruncateAfter"/> drops when a run resumes.
/// </summary>
public sealed class MetricsLog : IDisposable
{
    public const string FileName = "metrics.jsonl";
    private readonly FileStream _stream;

    private MetricsLog(string path, FileStream stream)
    {
        FilePath = path;
        _stream = stream;
    }

    public string FilePath { get; }

    /// <summary>Starts a new, empty log (replacing an old one atomically).</summary>
    public static MetricsLog Create(string directory)
    {
        string path = Path.Combine(directory, FileName);
        AtomicFile.WriteAllText(path, "");
        return Open(path);
    }

    /// <summary>Continues a log after a resume from <paramref name="step"/>: lines of later steps (written after that checkpoint)
    /// and unparsable (torn) lines are removed atomically first.</summary>
    public static MetricsLog Resume(string directory, int step)
    {
        string path = Path.Combine(directory, FileName);
        TruncateAfter(path, step);
        return Open(path);
    }

    private static MetricsLog Open(string path) =>
        new(path, new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read));

    /// <summary>Keeps only the well-formed lines whose step is ≤ <paramref name="step"/>.</summary>
    public static void TruncateAfter(string path, int step)
    {
        if (!File.Exists(path)) { AtomicFile.WriteAllText(path, ""); return; }
        var sb = new StringBuilder();
        foreach (var line in File.ReadLines(path))
        {
            try
            {
                if (JsonNode.Parse(line) is JsonObject o && o["step"] is JsonValue v && v.GetValue<int>() <= step) sb.Append(line).Append('\n');
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or ArgumentException) { }   // duplicate keys: ArgumentException
        }
        AtomicFile.WriteAllText(path, sb.ToString());
    }

    /// <summary>Appends one record and flushes it.</summary>
    public void Append(JsonObject record)
    {
        var bytes = Encoding.UTF8.GetBytes(record.ToJsonString() + "\n");
        _stream.Write(bytes);
        _stream.Flush(flushToDisk: false);
    }

    /// <summary>Builds the record of a step (non-finite numbers are written as null).</summary>
    public static JsonObject Record(StepMetrics m, double windowLoss, double windowTokensPerSecond, EvalMetrics? eval)
    {
        var o = new JsonObject
        {
            ["step"] = m.Step,
            ["epoch"] = Num(Math.Round(m.Epoch, 4)),
            ["loss"] = Num(windowLoss),
            ["lr"] = Num(m.LearningRate),
            ["grad_norm"] = Num(m.GradNorm),
            ["tokens_per_s"] = Num(Math.Round(windowTokensPerSecond, 1)),
            ["elapsed_s"] = Num(Math.Round(m.ElapsedSeconds, 3)),
            ["eta_s"] = Num(Math.Round(m.EtaSeconds, 3)),
        };
        foreach (var (k, v) in m.Extras) o[k] = Num(v);
        if (eval is not null)
        {
            o["eval_loss"] = Num(eval.Loss);
            o["eval_ppl"] = Num(eval.Perplexity);
            foreach (var (k, v) in eval.Extras ?? new Dictionary<string, double>()) o["eval_" + k] = Num(v);
        }
        return o;
    }

    internal static JsonNode? Num(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;

    public void Dispose() => _stream.Dispose();

    internal static string Invariant(double v) => v.ToString("R", CultureInfo.InvariantCulture);
}
