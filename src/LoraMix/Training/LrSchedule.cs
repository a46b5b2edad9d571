namespace LoraMix.Training;

/// <summary>
/// Learning-rate schedules with linear warm-up, with the formulas of Hugging Face transformers
/// (<c>get_constant_schedule_with_warmup</c>, <c>get_linear_schedule_with_warmup</c>,
/// <c>get_cosine_schedule_with_warmup</c> with <c>num_cycles = 0.5</c>). The optimizer step with zero-based index
/// <c>s</c> uses <c>base_lr · λ(s)</c>, as in a PyTorch <c>LambdaLR</c> stepped after each optimizer step — so with
/// warm-up the first update uses a learning rate of 0, exactly as transformers does.
/// </summary>
/// <param name="Name">constant, constant_with_warmup, linear or cosine (constant with warm-up steps is constant_with_warmup).</param>
/// <param name="BaseLearningRate">The peak learning rate.</param>
/// <param name="WarmupSteps">Linear warm-up length in optimizer steps.</param>
/// <param name="TotalSteps">The run's total optimizer steps.</param>
public sealed record LrSchedule(string Name, double BaseLearningRate, int WarmupSteps, int TotalSteps)
{
    /// <summary>The multiplier λ(step) for the zero-based optimizer step.</summary>
    public double Lambda(long step)
    {
        if (step < WarmupSteps) return step / (double)Math.Max(1, WarmupSteps);
        switch (Name)
        {
            case "constant":
            case "constant_with_warmup":
                return 1.0;
            case "linear":
                return Math.Max(0.0, (TotalSteps - step) / (double)Math.Max(1, TotalSteps - WarmupSteps));
            case "cosine":
                double progress = (step - WarmupSteps) / (double)Math.Max(1, TotalSteps - WarmupSteps);
                return Math.Max(0.0, 0.5 * (1.0 + Math.Cos(Math.PI * 0.5 * 2.0 * progress)));
            default:
                throw new LoraMixException($"unknown lr_scheduler '{Name}'; expected one of {string.Join(", ", TrainingOptions.SchedulerNames)}");
        }
    }

    /// <summary>The learning rate used by the zero-based optimizer step <paramref name="step"/>.</summary>
    public double LearningRate(long step) => BaseLearningRate * Lambda(step);

    /// <summary>The schedule for <paramref name="options"/> over <paramref name="totalSteps"/> optimizer steps
    /// (warm-up: <c>warmup_steps</c>, else <c>ceil(warmup_ratio · total)</c> as transformers computes it).</summary>
    public static LrSchedule For(TrainingOptions options, int totalSteps)
    {
        int warmup = options.WarmupSteps > 0 ? options.WarmupSteps : (int)Math.Ceiling(options.WarmupRatio * totalSteps);
        return new LrSchedule(options.LrScheduler, options.LearningRate, warmup, totalSteps);
    }
}
