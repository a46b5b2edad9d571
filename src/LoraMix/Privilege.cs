using System.Text.Json.Serialization;

namespace LoraMix;

/// <summary>
/// The privilege of one token. The numbers compare like the privileges:
/// <c>Untrusted &lt; Assistant &lt; User &lt; System</c>. JSON / CLI names are lowercase.
/// </summary>
[JsonConverter(typeof(JsonStringEnumConverter<Privilege>))]
public enum Privilege : byte
{
    /// <summary>Tool results and data: may never steer the router.</summary>
    [JsonStringEnumMemberName("untrusted")] Untrusted = 0,

    /// <summary>The model's own earlier turns.</summary>
    [JsonStringEnumMemberName("assistant")] Assistant = 1,

    /// <summary>The user's text.</summary>
    [JsonStringEnumMemberName("user")] User = 2,

    /// <summary>The developer's system message and all renderer-owned template tokens.</summary>
    [JsonStringEnumMemberName("system")] System = 3,
}

/// <summary>Names of <see cref="Privilege"/> (JSON, CLI, traces).</summary>
public static class Privileges
{
    /// <summary>The privilege names, lowest first.</summary>
    public static IReadOnlyList<string> Names { get; } = ["untrusted", "assistant", "user", "system"];

    /// <summary>The lowercase name of a privilege (<c>"untrusted"</c>).</summary>
    public static string ToName(this Privilege privilege) => privilege switch
    {
        Privilege.Untrusted => "untrusted",
        Privilege.Assistant => "assistant",
        Privilege.User => "user",
        Privilege.System => "system",
        _ => throw new ArgumentOutOfRangeException(nameof(privilege), privilege, null),
    };

    /// <summary>Parses a privilege name (<c>untrusted|assistant|user|system</c>).</summary>
    public static Privilege Parse(string name) => name switch
    {
        "untrusted" => Privilege.Untrusted,
        "assistant" => Privilege.Assistant,
        "user" => Privilege.User,
        "system" => Privilege.System,
        _ => throw new LoraMixException(
            $"unknown privilege '{name}': expected one of {string.Join(", ", Names)}"),
    };
}
