using System.Text.Json.Serialization;

namespace LoraMix.Tokenization;

/// <summary>The role of a chat message. JSON / chat-file names are lowercase: <c>system</c>, <c>user</c>, ...</summary>
[JsonConverter(typeof(JsonStringEnumConverter<ChatRole>))]
public enum ChatRole
{
    /// <summary>The developer's instructions (privilege <see cref="Privilege.System"/>).</summary>
    [JsonStringEnumMemberName("system")] System,

    /// <summary>The user (privilege <see cref="Privilege.User"/>).</summary>
    [JsonStringEnumMemberName("user")] User,

    /// <summary>The model's earlier turns (privilege <see cref="Privilege.Assistant"/>).</summary>
    [JsonStringEnumMemberName("assistant")] Assistant,

    /// <summary>Tool / function results (privilege <see cref="Privilege.Untrusted"/>).</summary>
    [JsonStringEnumMemberName("tool")] Tool,

    /// <summary>Retrieved documents, pasted content, web pages (privilege <see cref="Privilege.Untrusted"/>).</summary>
    [JsonStringEnumMemberName("data")] Data,
}

/// <summary>Names and conversions of <see cref="ChatRole"/> (a privilege's own names: <see cref="Privileges"/>).</summary>
public static class ChatRoles
{
    /// <summary>The role names a chat file may use, in order.</summary>
    public static IReadOnlyList<string> Names { get; } = ["system", "user", "assistant", "tool", "data"];

    /// <summary>The privilege names, lowest first (<see cref="Privileges.Names"/>).</summary>
    public static IReadOnlyList<string> PrivilegeNames => Privileges.Names;

    /// <summary>The lowercase name of a role (<c>"tool"</c>).</summary>
    public static string ToName(this ChatRole role) => role switch
    {
        ChatRole.System => "system",
        ChatRole.User => "user",
        ChatRole.Assistant => "assistant",
        ChatRole.Tool => "tool",
        ChatRole.Data => "data",
        _ => throw new ArgumentOutOfRangeException(nameof(role), role, null),
    };

    /// <summary>The privilege of a role's content tokens: tool and data are <see cref="Privilege.Untrusted"/>.</summary>
    public static Privilege PrivilegeOf(this ChatRole role) => role switch
    {
        ChatRole.System => Privilege.System,
        ChatRole.User => Privilege.User,
        ChatRole.Assistant => Privilege.Assistant,
        ChatRole.Tool or ChatRole.Data => Privilege.Untrusted,
        _ => throw new ArgumentOutOfRangeException(nameof(role), role, null),
    };

    /// <summary>True for the roles whose content is untrusted (tool, data).</summary>
    public static bool IsUntrusted(this ChatRole role) => role.PrivilegeOf() == Privilege.Untrusted;

    /// <summary>Parses a role name exactly as written in chat files (lowercase; surrounding whitespace is not allowed).</summary>
    /// <exception cref="UnknownChatRoleException">The name is not one of <see cref="Names"/>.</exception>
    public static ChatRole Parse(string role) =>
        TryParse(role, out var r) ? r : throw new UnknownChatRoleException(role);

    /// <summary>Parses a role name; false when it is not one of <see cref="Names"/>.</summary>
    public static bool TryParse(string? role, out ChatRole result)
    {
        switch (role)
        {
            case "system": result = ChatRole.System; return true;
            case "user": result = ChatRole.User; return true;
            case "assistant": result = ChatRole.Assistant; return true;
            case "tool": result = ChatRole.Tool; return true;
            case "data": result = ChatRole.Data; return true;
            default: result = default; return false;
        }
    }

    /// <summary>Parses a privilege name (<c>untrusted|assistant|user|system</c>; <see cref="Privileges.Parse"/>).</summary>
    public static Privilege ParsePrivilege(string name) => Privileges.Parse(name);
}
