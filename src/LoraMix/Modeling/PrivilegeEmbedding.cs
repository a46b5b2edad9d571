using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// A learned privilege embedding (ISE-style, Wu et al. 2024, "Instructional Segment Embedding"): one vector per
/// <see cref="Privilege"/> level, added to every token's input embedding according to its privilege label, so the model
/// can tell a system instruction from the same words inside untrusted data whatever the text says. <c>weight</c> is
/// <c>[4, hidden]</c>, row <c>i</c> for the privilege with value <c>i</c> (untrusted, assistant, user, system); it starts
/// at zero, so attaching it leaves the model's outputs unchanged until it is trained.
/// </summary>
public sealed class PrivilegeEmbedding : nn.Module
{
    /// <summary>Rows of <see cref="Weight"/>: one per <see cref="Privilege"/> value.</summary>
    public const int Levels = 4;

    [ComponentName(Name = "weight")] private readonly Parameter _weight;

    /// <summary>A zero table on <paramref name="device"/> in <paramref name="dtype"/>.</summary>
    public PrivilegeEmbedding(long hidden, Device device, ScalarType dtype) : base(nameof(PrivilegeEmbedding))
    {
        _weight = new Parameter(zeros(Levels, hidden, dtype: dtype, device: device));
        RegisterComponents();
    }

    /// <summary>The table <c>[4, hidden]</c>.</summary>
    public Parameter Weight => _weight;

    /// <summary>
    /// <paramref name="embeddings"/> <c>[B, T, hidden]</c> plus the row of each token's label; <paramref name="labels"/> is
    /// <c>[B, T]</c> of <see cref="Privilege"/> values (any integer dtype, any device).
    /// </summary>
    /// <exception cref="ArgumentException">The labels' shape differs from the embeddings' first two dimensions.</exception>
    public Tensor Apply(Tensor embeddings, Tensor labels)
    {
        if (labels.dim() != 2 || labels.shape[0] != embeddings.shape[0] || labels.shape[1] != embeddings.shape[1])
            throw new ArgumentException(
                $"privilege labels must be [{embeddings.shape[0]}, {embeddings.shape[1]}] like the input ids, got [{string.Join(", ", labels.shape)}]",
                nameof(labels));
        using var scope = NewDisposeScope();
        var idx = labels.to(ScalarType.Int64, _weight.device).reshape(-1);
        var rows = _weight.index_select(0, idx).view(embeddings.shape[0], embeddings.shape[1], _weight.shape[1]);
        return (embeddings + rows.to(embeddings.dtype)).MoveToOuterDisposeScope();
    }
}
