using System.Globalization;

namespace LoraMix.Training;

/// <summary>
/// The loss or the gradient norm became NaN or infinite. The trainer stops before applying that step's update and writes
/// no checkpoint for it (a checkpoint of a diverged state would only poison a resume); the last good checkpoint, if any,
/// is named in the message.
/// </summary>
public sealed class TrainingDivergedException : LoraMixException
{
    public TrainingDivergedException(int step, string quantity, double value, double learningRate, string? lastCheckpoint)
        : base(string.Create(CultureInfo.InvariantCulture,
            $"training diverged at step {step}: the {quantity} is {value}. No update was applied for this step. " +
            $"Lower learning_rate (it was {learningRate:G4} at this step), enable or tighten max_grad_norm, or check the data; ") +
            (lastCheckpoint is null ? "no checkpoint had been written (set save_steps to keep one)." : $"the last good checkpoint is {lastCheckpoint} (resume_from_checkpoint)."))
    {
        Step = step;
        Quantity = quantity;
        Value = value;
        LastCheckpoint = lastCheckpoint;
    }

    /// <summary>The 1-based optimizer step that diverged.</summary>
    public int Step { get; }

    /// <summary><c>loss</c>, <c>grad_norm</c> or an objective's auxiliary loss name.</summary>
    public string Quantity { get; }

    /// <summary>The non-finite value (NaN or ±∞).</summary>
    public double Value { get; }

    /// <summary>The newest checkpoint directory written before the divergence, if any.</summary>
    public string? LastCheckpoint { get; }
}
