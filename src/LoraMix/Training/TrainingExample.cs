using LoraMix.Tokenization;

namespace LoraMix.Training;

/// <summary>
/// One tokenized training sequence. <see cref="LossMask"/>[t] is true where token t is a target: the loss at position t
/// predicts <c>InputIds[t]</c> from <c>InputIds[..t]</c> (the shift happens inside the objective), so <c>LossMask[0]</c>
/// never contributes. Dataset readers and chat rendering produce these; the trainer consumes them.
/// <see cref="Privileges"/> holds the chat renderer's per-token privilege labels (<see cref="RenderedChat.Privileges"/>),
/// aligned with <see cref="InputIds"/>, for adapters with <c>router_policy: privileged</c>; it is null for plain text and
/// raw ids (such a row is routed freely: every token counts as privileged).
/// </summary>
public sealed record TrainingExample(int[] InputIds, bool[] LossMask, Privilege[]? Privileges = null)
{
    /// <summary>Whether any token is labelled <see cref="Privilege.Untrusted"/>.</summary>
    public bool HasUntrusted => Privileges is not null && Array.IndexOf(Privileges, Privilege.Untrusted) >= 0;

    /// <summary>An example whose every token after the first is a target (plain-text / pre-training data).</summary>
    public static TrainingExample AllTargets(int[] inputIds) => new(inputIds, Enumerable.Repeat(true, inputIds.Length).ToArray());

    /// <summary>Number of tokens that contribute to the loss (targets after the first position).</summary>
    public int TargetCount
    {
        get
        {
            int n = 0;
            for (int t = 1; t < LossMask.Length; t++) if (LossMask[t]) n++;
            return n;
        }
    }

    /// <summary>Checks lengths and id range; throws <see cref="LoraMixException"/> naming the example.</summary>
    public void Validate(int index, int vocabSize, string source = "training data")
    {
        if (InputIds is null || LossMask is null)
            throw new LoraMixException($"{source}: example {index}: InputIds and LossMask must not be null");
        if (InputIds.Length != LossMask.Length)
            throw new LoraMixException($"{source}: example {index}: {InputIds.Length} input ids but {LossMask.Length} loss-mask entries; they must have the same length");
        if (Privileges is not null && Privileges.Length != InputIds.Length)
            throw new LoraMixException($"{source}: example {index}: {InputIds.Length} input ids but {Privileges.Length} privilege labels; they must have the same length");
        if (InputIds.Length == 0)
            throw new LoraMixException($"{source}: example {index} is empty");
        for (int t = 0; t < InputIds.Length; t++)
            if ((uint)InputIds[t] >= (uint)vocabSize)
                throw new LoraMixException($"{source}: example {index}: token id {InputIds[t]} at position {t} is outside the model's vocabulary [0, {vocabSize}); was the data tokenized for another model?");
    }
}
