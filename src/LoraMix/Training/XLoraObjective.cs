using LoraMix.Modeling;
using LoraMix.Routing;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>
/// X-LoRA's objective: next-token cross-entropy on the scaled pass (the scaling pass runs without gradients inside the
/// model's forward; gradients reach the head through the scalings), as PEFT and the xlora package train it — no auxiliary
/// loss. It logs, per step, the mean scaling of each expert over the target positions (<c>scaling_e{i}</c>) and the mean
/// entropy of the per-token expert distribution (<c>scaling_entropy</c>), read from detached copies: the log keeps no
/// tensor of the graph.
/// </summary>
public sealed class XLoraObjective : ITrainingObjective
{
    public ObjectiveOutput Compute(LlamaForCausalLM model, CollatedBatch batch, bool training)
    {
        var metrics = new Dictionary<string, double>(StringComparer.Ordinal);
        // the position that predicts each target token (labels[t] is predicted at t - 1)
        var targetMask = batch.Labels.narrow(1, 1, batch.Labels.shape[1] - 1).ne(CollatedBatch.IgnoreIndex);
        void Observe(string name, Tensor scalings)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var s = scalings.narrow(1, 0, scalings.shape[1] - 1).to(ScalarType.Float64);       // [B, T-1, L, N]
            var m = targetMask.to(ScalarType.Float64).to(s.device);                              // [B, T-1]
            double count = m.sum().item<double>() * s.shape[2];
            if (count == 0) return;
            var w = m.unsqueeze(-1).unsqueeze(-1);
            var mean = (s * w).sum([0L, 1L, 2L]) / count;                                        // [N]
            var means = mean.cpu().data<double>().ToArray();
            for (int i = 0; i < means.Length; i++) metrics[$"scaling_e{i}"] = means[i];
            var p = s.clamp_min(1e-12) / s.clamp_min(1e-12).sum(-1, keepdim: true);
            metrics["scaling_entropy"] = ((-(p * p.log()).sum(-1)) * w.squeeze(-1)).sum().item<double>() / count;
        }
        using var routing = new RoutingContext { OnScalings = Observe };
        if (batch.Privileges is not null) batch.ApplyPrivileges(routing);
        var logits = model.Forward(batch.InputIds, routing: routing, adapters: batch.Adapters);
        return new(CausalLmObjective.ShiftedCrossEntropySum(logits, batch.Labels), Metrics: metrics);
    }
}
