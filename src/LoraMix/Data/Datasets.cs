using System.Text;
using System.Text.Json;
using LoraMix.Tokenization;

namespace LoraMix.Data;

/// <summary>The record formats a dataset file may hold.</summary>
public enum DatasetFormat
{
    /// <summary>Detect from the first record's keys (<c>messages</c>/<c>conversations</c>, <c>instruction</c>, <c>text</c>).</summary>
    Auto,

    /// <summary>Alpaca: <c>instruction</c>, optional <c>input</c>, <c>output</c>, optional <c>system</c> and <c>history</c>.</summary>
    Alpaca,

    /// <summary>Chat: <c>messages</c> (role/content) or ShareGPT <c>conversations</c> (from/value).</summary>
    Chat,

    /// <summary>Plain text: <c>{"text": ...}</c> records, or a .txt file of blank-line-separated documents.</summary>
    Text,
}

/// <summary>One dataset record: a conversation (alpaca and chat) or a plain text, with the line it came from.</summary>
/// <param name="Line">1-based line of the record in its file.</param>
/// <param name="Messages">The conversation (null for plain text).</param>
/// <param name="Text">The plain text (null for conversations).</param>
/// <param name="Family">An optional <c>family</c> label (the task world writes one), for per-family scores.</param>
/// <param name="Answer">An optional reference <c>answer</c>; when absent the last assistant message is the answer.</param>
public sealed record DatasetRecord(int Line, IReadOnlyList<ChatMessage>? Messages, string? Text, string? Family = null, string? Answer = null)
{
    /// <summary>The expected answer for exact-match scoring: <see cref="Answer"/>, else the last assistant message.</summary>
    public string? ExpectedAnswer =>
        Answer ?? (Messages is { Count: > 0 } m && m[^1].Role == ChatRole.Assistant ? m[^1].Content : null);

    /// <summary>The conversation without its final assistant message (the prompt to generate from).</summary>
    public IReadOnlyList<ChatMessage> PromptMessages =>
        Messages is { Count: > 0 } m && m[^1].Role == ChatRole.Assistant ? m.Take(m.Count - 1).ToList() : Messages ?? [];
}

/// <summary>A dataset file's records, with what was skipped under <c>skipBad</c>.</summary>
public sealed record Dataset(string FilePath, DatasetFormat Format, IReadOnlyList<DatasetRecord> Records, IReadOnlyList<string> Skipped);

/// <summary>A dataset record is malformed; the message names the file and line.</summary>
public sealed class DatasetFileException : LoraMixException
{
    public DatasetFileException(string file, int line, string message, Exception? inner = null)
        : base(line > 0 ? $"{file}:{line}: {message}" : $"{file}: {message}", inner)
    {
        FilePath = file;
        Line = line;
    }

    /// <summary>The dataset file.</summary>
    public string FilePath { get; }

    /// <summary>The 1-based line of the bad record (0 when the problem is the whole file).</summary>
    public int Line { get; }
}

/// <summary>Reads alpaca, chat and plain-text datasets from JSON (an array), JSON lines or .txt files.</summary>
public static class DatasetReader
{
    /// <summary>
    /// Reads <paramref name="path"/>. Every bad record fails with its file and line, or, with <paramref name="skipBad"/>,
    /// is skipped and listed in <see cref="Dataset.Skipped"/>. A file with no usable record fails.
    /// </summary>
    public static Dataset Load(string path, DatasetFormat format = DatasetFormat.Auto, bool skipBad = false)
    {
        if (!File.Exists(path)) throw new DatasetFileException(path, 0, "file not found");
        var skipped = new List<string>();
        var records = new List<DatasetRecord>();
        string ext = Path.GetExtension(path).ToLowerInvariant();
        if (ext == ".txt")
        {
            if (format is not (DatasetFormat.Auto or DatasetFormat.Text))
                throw new DatasetFileException(path, 0, $"a .txt file holds plain text, not {format.ToString().ToLowerInvariant()} records");
            ReadText(path, records);
            format = DatasetFormat.Text;
        }
        else
        {
            foreach (var (line, element, error) in ext == ".jsonl" ? JsonLines(path) : JsonArray(path))
            {
                try
                {
                    if (error is not null) throw new DatasetFileException(path, line, error);
                    var f = format == DatasetFormat.Auto ? Detect(element, path, line) : format;
                    var record = Parse(element, f, path, line);
                    if (format == DatasetFormat.Auto) format = f;
                    records.Add(record);
                }
                catch (DatasetFileException e) when (skipBad)
                {
                    skipped.Add(e.Message);
                }
            }
        }
        if (records.Count == 0)
            throw new DatasetFileException(path, 0, skipped.Count > 0
                ? $"no usable record ({skipped.Count} skipped; the first: {skipped[0]})"
                : "the file has no records");
        return new Dataset(path, format, records, skipped);
    }

    /// <summary>Splits off a validation set: a deterministic shuffle by <paramref name="seed"/>, then the last fraction.</summary>
    public static (IReadOnlyList<T> Train, IReadOnlyList<T> Validation) Split<T>(IReadOnlyList<T> items, double validationFraction, int seed)
    {
        if (validationFraction is < 0 or >= 1 || double.IsNaN(validationFraction))
            throw new ArgumentOutOfRangeException(nameof(validationFraction), validationFraction, "val_size must be in [0, 1)");
        int nVal = (int)Math.Round(items.Count * validationFraction);
        if (validationFraction > 0 && nVal == 0 && items.Count > 1) nVal = 1;
        var order = Enumerable.Range(0, items.Count).ToArray();
        new Random(seed).Shuffle(order);
        var val = order.Take(nVal).Order().Select(i => items[i]).ToList();
        var train = order.Skip(nVal).Order().Select(i => items[i]).ToList();
        return (train, val);
    }

    private static void ReadText(string path, List<DatasetRecord> records)
    {
        var lines = File.ReadAllLines(path, Encoding.UTF8);
        var doc = new StringBuilder();
        int start = 0;
        for (int i = 0; i <= lines.Length; i++)
        {
            bool blank = i == lines.Length || lines[i].Trim().Length == 0;
            if (blank)
            {
                if (doc.Length > 0) records.Add(new DatasetRecord(start, null, doc.ToString()));
                doc.Clear();
                continue;
            }
            if (doc.Length == 0) start = i + 1;
            else doc.Append('\n');
            doc.Append(lines[i]);
        }
    }

    private static IEnumerable<(int Line, JsonElement Element, string? Error)> JsonLines(string path)
    {
        int line = 0;
        foreach (string text in File.ReadLines(path, Encoding.UTF8))
        {
            line++;
            if (text.Trim().Length == 0) continue;
            JsonElement element;
            string? error = null;
            try
            {
                using var doc = JsonDocument.Parse(text);
                element = doc.RootElement.Clone();
            }
            catch (JsonException e)
            {
                element = default;
                error = $"invalid JSON ({e.Message})";
            }
            yield return (line, element, error);
        }
    }

    private static IEnumerable<(int Line, JsonElement Element, string? Error)> JsonArray(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        var items = new List<(int, JsonElement, string?)>();
        try
        {
            var reader = new Utf8JsonReader(bytes, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
            if (!reader.Read()) throw new DatasetFileException(path, 0, "the file is empty");
            if (reader.TokenType != JsonTokenType.StartArray)
                throw new DatasetFileException(path, 1, "a .json dataset must be an array of records (use .jsonl for one record per line)");
            int line = 1;
            long counted = 0;
            while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            {
                long start = reader.TokenStartIndex;
                for (long i = counted; i < start; i++) if (bytes[i] == (byte)'\n') line++;
                counted = start;
                using var doc = JsonDocument.ParseValue(ref reader);
                items.Add((line, doc.RootElement.Clone(), null));
            }
        }
        catch (JsonException e)
        {
            throw new DatasetFileException(path, (int)(e.LineNumber ?? -1) + 1, $"invalid JSON ({e.Message})", e);
        }
        return items;
    }

    private static DatasetFormat Detect(JsonElement e, string path, int line)
    {
        if (e.ValueKind != JsonValueKind.Object) throw new DatasetFileException(path, line, $"expected a JSON object, found {e.ValueKind}");
        if (e.TryGetProperty("messages", out _) || e.TryGetProperty("conversations", out _)) return DatasetFormat.Chat;
        if (e.TryGetProperty("instruction", out _)) return DatasetFormat.Alpaca;
        if (e.TryGetProperty("text", out _)) return DatasetFormat.Text;
        throw new DatasetFileException(path, line,
            "cannot tell the record's format: expected 'messages' or 'conversations' (chat), 'instruction' (alpaca) or 'text'");
    }

    private static DatasetRecord Parse(JsonElement e, DatasetFormat format, string path, int line)
    {
        if (e.ValueKind != JsonValueKind.Object) throw new DatasetFileException(path, line, $"expected a JSON object, found {e.ValueKind}");
        string? family = OptionalString(e, "family", path, line);
        string? answer = OptionalString(e, "answer", path, line);
        switch (format)
        {
            case DatasetFormat.Text:
                return new DatasetRecord(line, null, RequiredString(e, "text", path, line), family, answer);
            case DatasetFormat.Alpaca:
            {
                var messages = new List<ChatMessage>();
                if (OptionalString(e, "system", path, line) is { Length: > 0 } system) messages.Add(ChatMessage.System(system));
                if (e.TryGetProperty("history", out var history) && history.ValueKind != JsonValueKind.Null)
                {
                    if (history.ValueKind != JsonValueKind.Array)
                        throw new DatasetFileException(path, line, "'history' must be a list of [user, assistant] pairs");
                    foreach (var pair in history.EnumerateArray())
                    {
                        if (pair.ValueKind != JsonValueKind.Array || pair.GetArrayLength() != 2
                            || pair[0].ValueKind != JsonValueKind.String || pair[1].ValueKind != JsonValueKind.String)
                            throw new DatasetFileException(path, line, "'history' must be a list of [user, assistant] string pairs");
                        messages.Add(ChatMessage.User(pair[0].GetString()!));
                        messages.Add(ChatMessage.Assistant(pair[1].GetString()!));
                    }
                }
                string instruction = RequiredString(e, "instruction", path, line);
                string? input = OptionalString(e, "input", path, line);
                messages.Add(ChatMessage.User(string.IsNullOrEmpty(input) ? instruction : instruction + "\n" + input));
                messages.Add(ChatMessage.Assistant(RequiredString(e, "output", path, line)));
                return new DatasetRecord(line, messages, null, family, answer);
            }
            case DatasetFormat.Chat:
                return new DatasetRecord(line, ParseMessages(e, path, line), null, family, answer);
            default:
                throw new ArgumentOutOfRangeException(nameof(format), format, "unknown dataset format");
        }
    }

    private static List<ChatMessage> ParseMessages(JsonElement e, string path, int line)
    {
        bool shareGpt = !e.TryGetProperty("messages", out var list);
        if (shareGpt && !e.TryGetProperty("conversations", out list))
            throw new DatasetFileException(path, line, "missing 'messages'");
        string key = shareGpt ? "conversations" : "messages";
        if (list.ValueKind != JsonValueKind.Array || list.GetArrayLength() == 0)
            throw new DatasetFileException(path, line, $"'{key}' must be a non-empty list");
        var messages = new List<ChatMessage>();
        int i = 0;
        foreach (var m in list.EnumerateArray())
        {
            if (m.ValueKind != JsonValueKind.Object) throw new DatasetFileException(path, line, $"{key}[{i}] must be an object");
            string roleKey = shareGpt ? "from" : "role", contentKey = shareGpt ? "value" : "content";
            string role = RequiredString(m, roleKey, path, line, $"{key}[{i}].");
            string content = RequiredString(m, contentKey, path, line, $"{key}[{i}].");
            if (shareGpt)
                role = role switch
                {
                    "human" => "user", "gpt" => "assistant", "observation" or "function" => "tool", _ => role,
                };
            ChatRole parsed;
            try
            {
                parsed = ChatRoles.Parse(role);
            }
            catch (UnknownChatRoleException ex)
            {
                throw new DatasetFileException(path, line,
                    $"{key}[{i}].{roleKey}: unknown role '{role}'; expected one of {string.Join(", ", ChatRoles.Names)}" +
                    (shareGpt ? " (or human, gpt, observation)" : ""), ex);
            }
            messages.Add(new ChatMessage(parsed, content));
            i++;
        }
        return messages;
    }

    private static string RequiredString(JsonElement e, string key, string path, int line, string prefix = "")
    {
        if (!e.TryGetProperty(key, out var v)) throw new DatasetFileException(path, line, $"missing '{prefix}{key}'");
        if (v.ValueKind != JsonValueKind.String)
            throw new DatasetFileException(path, line, $"'{prefix}{key}' must be a string, found {v.ValueKind}");
        return v.GetString()!;
    }

    private static string? OptionalString(JsonElement e, string key, string path, int line)
    {
        if (!e.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind != JsonValueKind.String)
            throw new DatasetFileException(path, line, $"'{key}' must be a string, found {v.ValueKind}");
        return v.GetString();
    }
}

/// <summary>Conversions from the task world to dataset records.</summary>
public static class TaskWorldRecords
{
    /// <summary>The example as a chat record (instruction, data message, answer) with its family and answer.</summary>
    public static DatasetRecord ToRecord(TaskExample example, bool includeAnswer = true, int line = 0)
    {
        ArgumentNullException.ThrowIfNull(example);
        return new DatasetRecord(line, example.ToChatMessages(includeAnswer), null, example.Family, example.Answer);
    }
}
