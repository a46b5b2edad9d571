using System.Text.Json;

namespace LoraMix.Tokenization;

/// <summary>
/// Chat files: a JSON array of <c>{"role": "system|user|assistant|tool|data", "content": "..."}</c> objects. An
/// object <c>{"messages": [...]}</c> (one line of the chat dataset format) is accepted too.
/// </summary>
public static class ChatFile
{
    /// <summary>Reads a chat file.</summary>
    /// <exception cref="ChatFileException">The file is missing, not JSON, or not an array of role/content objects; the
    /// message names the file, the message index and the expected roles.</exception>
    public static IReadOnlyList<ChatMessage> Load(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        string json;
        try { json = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ChatFileException(path, null, $"cannot read the chat file: {e.Message}", e);
        }
        return Parse(json, path);
    }

    /// <summary>Parses chat-file JSON; <paramref name="source"/> names it in errors (a path, or "stdin").</summary>
    /// <exception cref="ChatFileException">Malformed; see <see cref="Load"/>.</exception>
    public static IReadOnlyList<ChatMessage> Parse(string json, string source = "<chat>")
    {
        ArgumentNullException.ThrowIfNull(json);
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true }); }
        catch (JsonException e)
        {
            throw new ChatFileException(source, null, $"not valid JSON: {e.Message}", e);
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind == JsonValueKind.Object && root.TryGetProperty("messages", out var inner)) root = inner;
            if (root.ValueKind != JsonValueKind.Array)
                throw new ChatFileException(source, null,
                    $"expected a JSON array of {{\"role\", \"content\"}} objects, found {Describe(root.ValueKind)}");
            var messages = new List<ChatMessage>(root.GetArrayLength());
            int index = 0;
            foreach (var item in root.EnumerateArray())
            {
                messages.Add(ParseMessage(item, source, index));
                index++;
            }
            if (messages.Count == 0) throw new ChatFileException(source, null, "the chat has no messages");
            return messages;
        }
    }

    private static ChatMessage ParseMessage(JsonElement item, string source, int index)
    {
        string roles = string.Join(", ", ChatRoles.Names);
        if (item.ValueKind != JsonValueKind.Object)
            throw new ChatFileException(source, index, $"expected an object {{\"role\", \"content\"}}, found {Describe(item.ValueKind)}");
        string? role = null, content = null;
        foreach (var p in item.EnumerateObject())
        {
            switch (p.Name)
            {
                case "role":
                    if (p.Value.ValueKind != JsonValueKind.String)
                        throw new ChatFileException(source, index, $"'role' must be a string (one of {roles}), found {Describe(p.Value.ValueKind)}");
                    role = p.Value.GetString();
                    break;
                case "content":
                    if (p.Value.ValueKind != JsonValueKind.String)
                        throw new ChatFileException(source, index, $"'content' must be a string, found {Describe(p.Value.ValueKind)}");
                    content = p.Value.GetString();
                    break;
                default:
                    throw new ChatFileException(source, index, $"unknown key '{p.Name}': a message has only 'role' ({roles}) and 'content'");
            }
        }
        if (role is null) throw new ChatFileException(source, index, $"missing 'role' (one of {roles})");
        if (content is null) throw new ChatFileException(source, index, "missing 'content'");
        if (!ChatRoles.TryParse(role, out var r))
            throw new ChatFileException(source, index, $"unknown role '{role}': expected one of {roles}", new UnknownChatRoleException(role));
        return new ChatMessage(r, content);
    }

    private static string Describe(JsonValueKind kind) => kind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => kind.ToString(),
    };
}
