using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Routing;
using LoraMix.Tokenization;

namespace LoraMix.Inference;

/// <summary>One token of a <see cref="ScalingsInspection"/>: its scalings flattened <c>[module · N + expert]</c>.</summary>
public sealed record ScalingsToken(int Id, string Piece, Privilege Privilege, bool Generated, float[] Scalings);

/// <summary>
/// The result of <see cref="ChatEngine.TraceScalings"/>: every prompt token and then every generated token with the X-LoRA
/// scalings its scaled pass used, per wrapped module (<see cref="Modules"/>, PEFT's order) and expert.
/// </summary>
public sealed record ScalingsInspection(IReadOnlyList<ScalingsToken> Tokens, int PromptTokens, int FirstUntrustedPosition,
    IRouterPolicy Policy, IReadOnlyList<string> Modules, IReadOnlyList<string> Experts, FinishReason? FinishReason)
{
    /// <summary>Number of generated tokens.</summary>
    public int GeneratedTokens => Tokens.Count - PromptTokens;

    /// <summary>The scaling of <paramref name="expert"/> at <paramref name="module"/> for token <paramref name="token"/>.</summary>
    public float Scaling(int token, int module, int expert) => Tokens[token].Scalings[module * Experts.Count + expert];

    /// <summary>Expert <paramref name="expert"/>'s scalings as <c>[module, token]</c>: the input of
    /// <see cref="Evaluation.RoutingHeatmap.WriteValues"/>.</summary>
    public double[,] ExpertMap(int expert)
    {
        var map = new double[Modules.Count, Tokens.Count];
        for (int t = 0; t < Tokens.Count; t++)
            for (int l = 0; l < Modules.Count; l++) map[l, t] = Scaling(t, l, expert);
        return map;
    }

    /// <summary>
    /// UTF-8 JSON: <c>{"tokens": [{"id", "piece", "privilege", "generated", "scalings": [[per expert] per module]}],
    /// "modules", "experts", "router_policy", "privileged_snapshot" (privileged only), "first_untrusted" (null when none),
    /// "prompt_tokens"}</c>.
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
                w.WriteBoolean("generated", token.Generated);
                w.WriteStartArray("scalings");
                for (int l = 0; l < Modules.Count; l++)
                {
                    w.WriteStartArray();
                    for (int i = 0; i < Experts.Count; i++) w.WriteNumberValue(token.Scalings[l * Experts.Count + i]);
                    w.WriteEndArray();
                }
                w.WriteEndArray();
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteStartArray("modules");
            foreach (var m in Modules) w.WriteStringValue(m);
            w.WriteEndArray();
            w.WriteStartArray("experts");
            foreach (var e in Experts) w.WriteStringValue(e);
            w.WriteEndArray();
            w.WriteString("router_policy", Policy.Name);
            if (Policy is PrivilegedRouterPolicy p) w.WriteString("privileged_snapshot", p.Snapshot.ToString().ToLowerInvariant());
            if (FirstUntrustedPosition >= 0) w.WriteNumber("first_untrusted", FirstUntrustedPosition);
            else w.WriteNull("first_untrusted");
            w.WriteNumber("prompt_tokens", PromptTokens);
            w.WriteEndObject();
        }
        return buffer.ToArray();
    }
}
