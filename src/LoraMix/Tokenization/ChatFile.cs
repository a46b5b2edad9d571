using System.Text.Json;

namespace LoraMix.Tokenization;

/// <summary>
/// Chat files: a JSON array of <c>{"role": "system|user|assistant|tool|data", "content": "..."}</c> objects. An
/// object <c>{"messages": [...]}</c> (one line of the chat dataset format) is accepted too. The file must be UTF-8
/// (invalid bytes are an error, never replaced), at most <see cref="MaxFileBytes"/> and <see cref="MaxJsonDepth"/> deep,
/// and its strings must be text (no unpaired surrogate escapes); errors name the file and the line.
/// </summary>
public static class ChatFile
{
    /// <summary>The largest chat file accepted (64 MiB).</summary>
    public const long MaxFileBytes = 64L << 20;

    /// <summary>The deepest JSON nesting accepted (a chat needs 3 levels).</summary>
    public const int MaxJsonDepth = 64;

    private static readonly JsonDocumentOptions DocumentOptions = new()
    {
        CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, MaxDepth = MaxJsonDepth,
    };

    private static readonly JsonReaderOptions ReaderOptions = new()
    {
        CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, MaxDepth = MaxJsonDepth,
    };

    /// <summary>Reads a chat file.</summary>
    /// <exception cref="ChatFileException">The file is missing, too large, not UTF-8, not JSON, or not an array of
    /// role/content objects; the message names the file, the line, the message index and the expected roles.</exception>
    public static IReadOnlyList<ChatMessage> Load(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        InputFiles.RequireRegular(path, reason => new ChatFileException(path, null, reason));
        byte[] bytes;
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
            if (stream.Length > MaxFileBytes)
                throw new ChatFileException(path, null, $"the file is {stream.Length} bytes; a chat file may be at most {MaxFileBytes >> 20} MiB");
            bytes = new byte[stream.Length];
            stream.ReadExactly(bytes);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ChatFileException(path, null, $"cannot read the chat file: {e.Message}", e);
        }
        return ParseUtf8(bytes, path);
    }

    /// <summary>Parses chat-file JSON; <paramref name="source"/> names it in errors (a path, or "stdin").</summary>
    /// <exception cref="ChatFileException">Malformed; see <see cref="Load"/>.</exception>
    public static IReadOnlyList<ChatMessage> Parse(string json, string source = "<chat>")
    {
        ArgumentNullException.ThrowIfNull(json);
        int bad = StrictText.FindUnpairedSurrogate(json);
        if (bad >= 0)
            throw new ChatFileException(source, null, "the text holds an unpaired UTF-16 surrogate, which is not text", line: 1 + json.AsSpan(0, bad).Count('\n'));
        if (json.Length > MaxFileBytes)
            throw new ChatFileException(source, null, $"the text is {json.Length} characters; a chat may be at most {MaxFileBytes >> 20} MiB");
        return ParseUtf8(StrictText.Utf8.GetBytes(json), source);
    }

    private static IReadOnlyList<ChatMessage> ParseUtf8(byte[] bytes, string source)
    {
        ReadOnlySpan<byte> span = bytes;
        if (span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) span = span[3..];
        int bad = StrictText.FindInvalidUtf8(span);
        if (bad >= 0) throw new ChatFileException(source, null, StrictText.InvalidUtf8Message(span, bad), line: StrictText.LineAt(span, bad));
        var memory = new ReadOnlyMemory<byte>(bytes, bytes.Length - span.Length, span.Length);
        JsonDocument doc;
        try { doc = JsonDocument.Parse(memory, DocumentOptions); }
        catch (JsonException e)
        {
            throw new ChatFileException(source, null, $"not valid JSON: {e.Message}", e, e.LineNumber is long l ? (int)l + 1 : null);
        }
        using (doc)
        {
            long surrogate = StrictText.FindUnpairedSurrogateEscape(span, ReaderOptions);
            if (surrogate >= 0) throw new ChatFileException(source, null, StrictText.UnpairedSurrogateMessage, line: StrictText.LineAt(span, surrogate));
            var root = doc.RootElement;
            if (root.ValueKind == JsonValueKind.Object && root.TryGetProperty("messages", out var inner)) root = inner;
            if (root.ValueKind != JsonValueKind.Array)
                throw new ChatFileException(source, null,
                    $"expected a JSON array of {{\"role\", \"content\"}} objects, found {Describe(root.ValueKind)}");
            var messages = new List<ChatMessage>(root.GetArrayLength());
            int index = 0;
            foreach (var item in root.EnumerateArray())
            {
                int at = index;
                messages.Add(ParseMessage(item, source, index, () => MessageLine(memory.Span, at)));
                index++;
            }
            if (messages.Count == 0) throw new ChatFileException(source, null, "the chat has no messages");
            return messages;
        }
    }

    /// <summary>The line where message <paramref name="index"/> starts (in the top-level array or in the last
    /// <c>messages</c> key, the one <see cref="JsonElement.TryGetProperty(string, out JsonElement)"/> returns).</summary>
    private static int? MessageLine(ReadOnlySpan<byte> json, int index)
    {
        try
        {
            var reader = new Utf8JsonReader(json, ReaderOptions);
            if (!reader.Read()) return null;
            long arrayStart = reader.TokenStartIndex;
            if (reader.TokenType == JsonTokenType.StartObject)
            {
                arrayStart = -1;
                while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
                {
                    bool messages = reader.ValueTextEquals("messages");
                    reader.Read();
                    if (messages) arrayStart = reader.TokenStartIndex;
                    reader.Skip();
                }
                if (arrayStart < 0) return null;
            }
            var array = new Utf8JsonReader(json[(int)arrayStart..], ReaderOptions);
            if (!array.Read() || array.TokenType != JsonTokenType.StartArray) return null;
            for (int i = 0; array.Read() && array.TokenType != JsonTokenType.EndArray; i++)
            {
                if (i == index) return StrictText.LineAt(json, arrayStart + array.TokenStartIndex);
                array.Skip();
            }
        }
        catch (JsonException)
        {
            // The text parsed once already; the line is only a hint, so none is better than a wrong error.
        }
        return null;
    }

    private static ChatMessage ParseMessage(JsonElement item, string source, int index, Func<int?> line)
    {
        string roles = string.Join(", ", ChatRoles.Names);
        if (item.ValueKind != JsonValueKind.Object)
            throw new ChatFileException(source, index, $"expected an object {{\"role\", \"content\"}}, found {Describe(item.ValueKind)}", null, line());
        string? role = null, content = null;
        foreach (var p in item.EnumerateObject())
        {
            if ((p.Name == "role" && role is not null) || (p.Name == "content" && content is not null))
                throw new ChatFileException(source, index, $"'{p.Name}' is given twice; keep one", null, line());
            switch (p.Name)
            {
                case "role":
                    if (p.Value.ValueKind != JsonValueKind.String)
                        throw new ChatFileException(source, index, $"'role' must be a string (one of {roles}), found {Describe(p.Value.ValueKind)}", null, line());
                    role = p.Value.GetString();
                    break;
                case "content":
                    if (p.Value.ValueKind != JsonValueKind.String)
                        throw new ChatFileException(source, index, $"'content' must be a string, found {Describe(p.Value.ValueKind)}", null, line());
                    content = p.Value.GetString();
                    break;
                default:
                    throw new ChatFileException(source, index, $"unknown key '{p.Name}': a message has only 'role' ({roles}) and 'content'", null, line());
            }
        }
        if (role is null) throw new ChatFileException(source, index, $"missing 'role' (one of {roles})", null, line());
        if (content is null) throw new ChatFileException(source, index, "missing 'content'", null, line());
        if (!ChatRoles.TryParse(role, out var r))
            throw new ChatFileException(source, index, $"unknown role '{role}': expected one of {roles}", new UnknownChatRoleException(role), line());
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
