using System.Globalization;
using Spectre.Console;

namespace LoraMix.Training;

/// <summary>The shape of a run, announced once before the first step.</summary>
public sealed record TrainingPlan(int TotalSteps, int StartStep, int StepsPerEpoch, int TrainSequences, int ValidationSequences,
    string Target, string OutputDir);

/// <summary>One optimizer step's numbers. <see cref="Loss"/> is the mean token loss of this step.</summary>
public sealed record StepMetrics(int Step, double Epoch, double Loss, double LearningRate, double GradNorm, double TokensPerSecond,
    double ElapsedSeconds, double EtaSeconds, IReadOnlyDictionary<string, double> Extras);

/// <summary>An evaluation pass: mean token loss, perplexity = exp(loss), number of target tokens and wall time, plus the
/// objective's extra metrics (e.g. router entropy), averaged over batches weighted by target tokens.</summary>
public sealed record EvalMetrics(int Step, double Epoch, double Loss, double Perplexity, long TargetTokens, double Seconds,
    IReadOnlyDictionary<string, double>? Extras = null);

/// <summary>
/// Where the trainer reports progress. The CLI picks <see cref="TrainingProgress.ForConsole"/> (a live bar in a terminal,
/// plain lines otherwise); tests pass their own sink or <see cref="TrainingProgress.None"/>.
/// </summary>
public interface ITrainingProgress
{
    void Started(TrainingPlan plan);
    /// <summary>Called after every optimizer step; <paramref name="logged"/> is true on logging steps (every <c>logging_steps</c>).</summary>
    void StepCompleted(StepMetrics metrics, bool logged);
    void Evaluated(EvalMetrics metrics);
    /// <summary>A one-line notice (resume, checkpoint written, examples dropped).</summary>
    void Info(string message);
    /// <summary>Called once when the run ends, successfully or not.</summary>
    void Finished();
}

/// <summary>Progress sinks.</summary>
public static class TrainingProgress
{
    /// <summary>Reports nothing.</summary>
    public static ITrainingProgress None { get; } = new NullProgress();

    /// <summary>A live Spectre.Console progress bar when stdout is an interactive terminal, plain log lines otherwise.</summary>
    public static ITrainingProgress ForConsole() =>
        !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive ? new SpectreProgress() : new PlainProgress(Console.Out);

    internal static string Duration(double seconds)
    {
        if (!double.IsFinite(seconds) || seconds < 0) return "?";
        var t = TimeSpan.FromSeconds(Math.Round(seconds));
        return t.TotalHours >= 1 ? $"{(int)t.TotalHours}:{t.Minutes:00}:{t.Seconds:00}" : $"{t.Minutes:00}:{t.Seconds:00}";
    }

    internal static string Line(StepMetrics m, int total) => string.Create(CultureInfo.InvariantCulture,
        $"step {m.Step}/{total} | epoch {m.Epoch:F2} | loss {m.Loss:F4} | lr {m.LearningRate:E2} | grad_norm {m.GradNorm:F3} | {m.TokensPerSecond:F0} tok/s | elapsed {Duration(m.ElapsedSeconds)} | eta {Duration(m.EtaSeconds)}")
        + string.Concat(m.Extras.Select(kv => string.Create(CultureInfo.InvariantCulture, $" | {kv.Key} {kv.Value:G4}")));

    internal static string Line(EvalMetrics m) => string.Create(CultureInfo.InvariantCulture,
        $"eval at step {m.Step} | eval_loss {m.Loss:F4} | eval_ppl {m.Perplexity:F3} | {m.TargetTokens} target tokens in {m.Seconds:F1} s")
        + string.Concat((m.Extras ?? new Dictionary<string, double>()).Select(kv => string.Create(CultureInfo.InvariantCulture, $" | eval_{kv.Key} {kv.Value:G4}")));

    private sealed class NullProgress : ITrainingProgress
    {
        public void Started(TrainingPlan plan) { }
        public void StepCompleted(StepMetrics metrics, bool logged) { }
        public void Evaluated(EvalMetrics metrics) { }
        public void Info(string message) { }
        public void Finished() { }
    }
}

/// <summary>Plain log lines (non-interactive output, CI logs): one per logging step, evaluation and notice.</summary>
public sealed class PlainProgress(TextWriter writer) : ITrainingProgress
{
    private int _total;

    public void Started(TrainingPlan plan)
    {
        _total = plan.TotalSteps;
        writer.WriteLine($"training {plan.Target}: {plan.TotalSteps} steps ({plan.StepsPerEpoch} per epoch), {plan.TrainSequences} training sequences, " +
                         $"{plan.ValidationSequences} validation sequences{(plan.StartStep > 0 ? $", resuming after step {plan.StartStep}" : "")}; output in {plan.OutputDir}");
        writer.Flush();
    }

    public void StepCompleted(StepMetrics metrics, bool logged)
    {
        if (!logged) return;
        writer.WriteLine(TrainingProgress.Line(metrics, _total));
        writer.Flush();
    }

    public void Evaluated(EvalMetrics metrics)
    {
        writer.WriteLine(TrainingProgress.Line(metrics));
        writer.Flush();
    }

    public void Info(string message)
    {
        writer.WriteLine(message);
        writer.Flush();
    }

    public void Finished() => writer.Flush();
}

/// <summary>
/// A live Spectre.Console progress bar (step count, percentage, elapsed, remaining) whose description shows the latest
/// loss, learning rate and throughput; evaluations and notices are printed above it. The display runs on its own thread,
/// driven by the training thread's callbacks.
/// </summary>
public sealed class SpectreProgress(IAnsiConsole? console = null) : ITrainingProgress
{
    private readonly IAnsiConsole _console = console ?? AnsiConsole.Console;
    private readonly ManualResetEventSlim _ready = new();
    private readonly ManualResetEventSlim _done = new();
    private Thread? _thread;
    private ProgressTask? _task;
    private string _last = "";

    public void Started(TrainingPlan plan)
    {
        _console.MarkupLine($"[bold]training[/] {Markup.Escape(plan.Target)}: {plan.TotalSteps} steps, {plan.TrainSequences} sequences → {Markup.Escape(plan.OutputDir)}");
        _thread = new Thread(() =>
        {
            try
            {
                Render(plan);
            }
            catch (Exception)
            {
                // no live display possible (e.g. the console went away): training goes on without it
                _task = null;
            }
            finally
            {
                _ready.Set();
            }
        }) { IsBackground = true, Name = "loramix-progress" };
        _thread.Start();
        _ready.Wait(TimeSpan.FromSeconds(5));
    }

    private void Render(TrainingPlan plan) =>
            _console.Progress()
                .AutoClear(false)
                .HideCompleted(false)
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(),
                    new ElapsedTimeColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    _task = ctx.AddTask("starting", maxValue: plan.TotalSteps);
                    _task.Value = plan.StartStep;
                    _ready.Set();
                    _done.Wait();
                    ctx.Refresh();
                });

    public void StepCompleted(StepMetrics m, bool logged)
    {
        if (_task is null) return;
        _last = string.Create(CultureInfo.InvariantCulture, $"step {m.Step} loss {m.Loss:F4} lr {m.LearningRate:E1} {m.TokensPerSecond:F0} tok/s");
        _task.Description = Markup.Escape(_last);
        _task.Value = m.Step;
    }

    public void Evaluated(EvalMetrics metrics) => _console.MarkupLine(Markup.Escape(TrainingProgress.Line(metrics)));

    public void Info(string message) => _console.MarkupLine(Markup.Escape(message));

    public void Finished()
    {
        _done.Set();
        _thread?.Join(TimeSpan.FromSeconds(5));
        _thread = null;
    }
}
