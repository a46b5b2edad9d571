namespace LoraMix.Tokenization;

/// <summary>A role name is not one of <c>system</c>, <c>user</c>, <c>assistant</c>, <c>tool</c>, <c>data</c>.</summary>
public sealed class UnknownChatRoleException : LoraMixException
{
    public UnknownChatRoleException(string? role)
        : base($"unknown chat role {(role is null ? "null" : $"'{role}'")}: expected one of {string.Join(", ", ChatRoles.Names)}")
    {
        Role = role;
    }

    /// <summary>The role name as given.</summary>
    public string? Role { get; }

    /// <summary>The accepted role names.</summary>
    public IReadOnlyList<string> ExpectedRoles => ChatRoles.Names;
}

/// <summary>A chat file is malformed: not UTF-8 JSON, too large or too deeply nested, not a JSON array of
/// <c>{"role", "content"}</c> objects, or a bad role.</summary>
public sealed class ChatFileException : LoraMixException
{
    public ChatFileException(string file, int? messageIndex, string message, Exception? inner = null, int? line = null)
        : base(Compose(file, messageIndex, message, line), inner)
    {
        FilePath = file;
        MessageIndex = messageIndex;
        Line = line;
    }

    /// <summary>The offending file.</summary>
    public string FilePath { get; }

    /// <summary>The 0-based index of the offending message; null when the problem is the file as a whole.</summary>
    public int? MessageIndex { get; }

    /// <summary>The 1-based line of the problem in the file, when known.</summary>
    public int? Line { get; }

    /// <summary>The accepted role names.</summary>
    public IReadOnlyList<string> ExpectedRoles => ChatRoles.Names;

    private static string Compose(string file, int? index, string message, int? line)
    {
        string where = line is null ? file : $"{file}:{line}";
        return index is null ? $"{where}: {message}" : $"{where}: message {index}: {message}";
    }
}

/// <summary>A conversation does not fit the chat template (e.g. roles that do not alternate in an <c>[INST]</c>
/// family), or the tokenizer lacks a token the template needs, or no template could be chosen.</summary>
public sealed class ChatTemplateException : LoraMixException
{
    public ChatTemplateException(string? template, int? messageIndex, string message)
        : base(Compose(template, messageIndex, message))
    {
        Template = template;
        MessageIndex = messageIndex;
    }

    /// <summary>The template family name, when one was chosen.</summary>
    public string? Template { get; }

    /// <summary>The 0-based index of the offending message, when the problem is tied to one.</summary>
    public int? MessageIndex { get; }

    private static string Compose(string? template, int? index, string message)
    {
        string where = template is null ? "chat template" : $"chat template '{template}'";
        return index is null ? $"{where}: {message}" : $"{where}: message {index}: {message}";
    }
}
