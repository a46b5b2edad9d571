using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Routing;
using LoraMix.Tokenization;

namespace LoraMix.Inference;

/// <summary>One token of a routing inspection: its id and piece, its privilege label, and each MoE layer's route.</summary>
/// <param name="Id">Token id.</param>
/// <param name="Piece">Vocabulary piece (<see cref="TextTokenizer.TokenPiece"/>).</param>
/// <param name="Privilege">The renderer's label for prompt tokens; <see cref="Privilege.Assistant"/> for generated tokens
/// (as <see cref="TokenGenerator"/> labels them).</param>
/// <param name="Generated">True for a token produced by greedy decoding (fed back through the KV cache).</param>
/// <param name="Layers">The experts and weights of every MoE layer, in layer order.</param>
public sealed record InspectedToken(int Id, string Piece, Privilege Privilege, bool Generated, IReadOnlyList<LayerRoute> Layers);

/// <summary>
/// The result of <see cref="ChatEngine.TraceRouting"/>: every prompt token and then every generated token with its
/// routing, and what produced it.
/// </summary>
/// <param name="Tokens">Prompt tokens, then generated tokens, in order.</param>
/// <param name="PromptTokens">Number of prompt tokens (the index of the first generated token).</param>
/// <param name="FirstUntrustedPosition">The renderer's first untrusted position, or -1 when there is none.</param>
/// <param name="Policy">The router policy that routed (the override, or the adapter's configured one).</param>
/// <param name="NumExperts">Experts per layer.</param>
/// <param name="LayerIndices">The decoder layers that routed, in order.</param>
/// <param name="FinishReason">Why decoding ended (<see cref="Inference.FinishReason.Length"/> when all requested tokens
/// were generated, <see cref="Inference.FinishReason.Stop"/> at a stop token); null when nothing was generated.</param>
public sealed record RoutingInspection(IReadOnlyList<InspectedToken> Tokens, int PromptTokens, int FirstUntrustedPosition,
    IRouterPolicy Policy, int NumExperts, IReadOnlyList<int> LayerIndices, FinishReason? FinishReason)
{
    /// <summary>Number of generated tokens.</summary>
    public int GeneratedTokens => Tokens.Count - PromptTokens;

    /// <summary>The policy as written in traces: <c>free</c>, or <c>privileged</c> with its snapshot.</summary>
    public string PolicyDescription => Policy.Describe();

    /// <summary>The top (first) expert of each layer for each token, <c>[layer, token]</c>, −1 where a token ran no
    /// expert: the input of <see cref="Evaluation.RoutingHeatmap.Write"/>.</summary>
    public int[,] TopExperts()
    {
        var top = new int[LayerIndices.Count, Tokens.Count];
        for (int t = 0; t < Tokens.Count; t++)
            for (int l = 0; l < LayerIndices.Count; l++)
                top[l, t] = Tokens[t].Layers[l].Experts is [int first, ..] ? first : -1;
        return top;
    }

    /// <summary>
    /// The trace as UTF-8 JSON: <c>{"tokens": [{"id", "piece", "privilege", "layers": [{"experts", "weights"}],
    /// "generated"}], "router_policy", "privileged_snapshot" (privileged only), "first_untrusted" (null when none),
    /// "generated_from", "num_experts", "layer_indices"}</c>.
    /// </summary>
    public byte[] ToJson(bool indented = false)
    {
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = indented, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            w.WriteStartArray("tokens");
            foreach (var token in Tokens)
            {
                w.WriteStartObject();
                w.WriteNumber("id", token.Id);
                w.WriteString("piece", token.Piece);
                w.WriteString("privilege", token.Privilege.ToName());
                w.WriteStartArray("layers");
                foreach (var layer in token.Layers)
                {
                    w.WriteStartObject();
                    w.WriteStartArray("experts");
                    foreach (int e in layer.Experts) w.WriteNumberValue(e);
                    w.WriteEndArray();
                    w.WriteStartArray("weights");
                    foreach (float x in layer.Weights) w.WriteNumberValue(x);
                    w.WriteEndArray();
                    w.WriteEndObject();
                }
                w.WriteEndArray();
                w.WriteBoolean("generated", token.Generated);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteString("router_policy", Policy.Name);
            if (Policy is PrivilegedRouterPolicy p) w.WriteString("privileged_snapshot", p.Snapshot.ToString().ToLowerInvariant());
            if (FirstUntrustedPosition >= 0) w.WriteNumber("first_untrusted", FirstUntrustedPosition);
            else w.WriteNull("first_untrusted");
            w.WriteNumber("generated_from", PromptTokens);
            w.WriteNumber("num_experts", NumExperts);
            w.WriteStartArray("layer_indices");
            foreach (int l in LayerIndices) w.WriteNumberValue(l);
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return buffer.ToArray();
    }
}
