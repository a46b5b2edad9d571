
namespace LoraMix.Tokenization;

/// <summary>One message of a conversation. Its content tokens get <see cref="Privilege"/> (tool and data: untrusted).</summary>
public sealed record ChatMessage(ChatRole Role, string Content)
{
    /// <summary>The message text (never null).</summary>
    public string Content { get; init; } = Content ?? throw new ArgumentNullException(nameof(Content));

    /// <summary>The privilege of this message's content tokens.</summary>
    public Privilege Privilege => Role.PrivilegeOf();

    /// <summary>True for tool and data messages.</summary>
    public bool IsUntrusted => Role.IsUntrusted();

    /// <summary>A system (developer) message.</summary>
    public static ChatMessage System(string content) => new(ChatRole.System, content);

    /// <summary>A user message.</summary>
    public static ChatMessage User(string content) => new(ChatRole.User, content);

    /// <summary>An assistant message (an earlier model turn, or the training target).</summary>
    public static ChatMessage Assistant(string content) => new(ChatRole.Assistant, content);

    /// <summary>A tool / function result: untrusted.</summary>
    public static ChatMessage Tool(string content) => new(ChatRole.Tool, content);

    /// <summary>Retrieved or pasted data: untrusted.</summary>
    public static ChatMessage Data(string content) => new(ChatRole.Data, content);

    /// <summary>A message from a role name as written in chat files (<c>"system"</c>, ..., <c>"data"</c>).</summary>
    /// <exception cref="UnknownChatRoleException">The role name is unknown.</exception>
    public static ChatMessage Create(string role, string content) => new(ChatRoles.Parse(role), content);

    /// <summary>Converts <c>(role, content)</c> pairs, e.g. <c>TaskExample.ToChat</c>'s.</summary>
    /// <exception cref="UnknownChatRoleException">A role name is unknown.</exception>
    public static IReadOnlyList<ChatMessage> FromPairs(IEnumerable<(string Role, string Content)> messages) =>
        messages.Select(m => Create(m.Role, m.Content)).ToArray();

    public override string ToString() => $"{Role.ToName()}: {Content}";
}
