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

/// <summary>
/// Reads alpaca, chat and plain-text datasets from JSON (an array), JSON lines or .txt files. Input is never trusted:
/// text must be valid UTF-8, JSON strings must not hold unpaired surrogate escapes, nesting and record sizes are bounded
/// (<see cref="MaxJsonDepth"/>, <see cref="MaxRecordBytes"/>, <see cref="MaxJsonArrayFileBytes"/>), and every violation is a
/// <see cref="DatasetFileException"/> naming the file and line (skipped and counted under <c>skip_bad</c> when it concerns
/// one record).
/// </summary>
public static class DatasetReader
{
    /// <summary>The deepest JSON nesting accepted in a record (a record needs 4 levels; deeper input is refused before it
    /// can exhaust the stack).</summary>
    public const int MaxJsonDepth = 64;

    /// <summary>The largest record accepted: a .jsonl line, a .txt document or one element of a .json array (64 MiB).</summary>
    public const int MaxRecordBytes = 64 << 20;

    /// <summary>The largest .json (array) file accepted, since it is read whole (1 GiB); use .jsonl for larger data.</summary>
    public const long MaxJsonArrayFileBytes = 1L << 30;

    private static readonly JsonDocumentOptions DocumentOptions = new() { MaxDepth = MaxJsonDepth };

    private static readonly JsonReaderOptions ReaderOptions = new()
    {
        CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, MaxDepth = MaxJsonDepth,
    };

    /// <summary>
    /// Reads <paramref name="path"/>. Every bad record fails with its file and line, or, with <paramref name="skipBad"/>,
    /// is skipped and listed in <see cref="Dataset.Skipped"/>. A file with no usable record fails.
    /// </summary>
    /// <exception cref="DatasetFileException">The file cannot be read, is not valid UTF-8 / JSON, or a record is bad
    /// (without <paramref name="skipBad"/>); the message names the file and the line.</exception>
    public static Dataset Load(string path, DatasetFormat format = DatasetFormat.Auto, bool skipBad = false)
    {
        ArgumentNullException.ThrowIfNull(path);
        InputFiles.RequireRegular(path, reason => new DatasetFileException(path, 0, reason));
        if (!File.Exists(path)) throw new DatasetFileException(path, 0, "file not found");
        var skipped = new List<string>();
        var records = new List<DatasetRecord>();
        string ext = Path.GetExtension(path).ToLowerInvariant();
        if (ext == ".txt" && format is not (DatasetFormat.Auto or DatasetFormat.Text))
            throw new DatasetFileException(path, 0, $"a .txt file holds plain text, not {format.ToString().ToLowerInvariant()} records");
        try
        {
            if (ext == ".txt")
            {
                foreach (var (line, text, error) in TextDocuments(path))
                {
                    try
                    {
                        if (error is not null) throw new DatasetFileException(path, line, error);
                        records.Add(new DatasetRecord(line, null, text));
                    }
                    catch (DatasetFileException e) when (skipBad)
                    {
                        skipped.Add(e.Message);
                    }
                }
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
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new DatasetFileException(path, 0, $"cannot read the file: {e.Message}", e);
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

    private static string TooLong(string what) =>
        $"{what} is longer than {MaxRecordBytes >> 20} MiB (the limit for one record); split it or shorten it";

    /// <summary>The blank-line-separated documents of a .txt file, each with its first line, or the error that makes
    /// it unusable (invalid UTF-8, longer than <see cref="MaxRecordBytes"/>) with the line of the problem.</summary>
    private static IEnumerable<(int Line, string? Text, string? Error)> TextDocuments(string path)
    {
        var doc = new StringBuilder();
        int start = 0, errorLine = 0;
        long bytes = 0;
        string? error = null;
        foreach (var (line, raw) in WithLineLimit(StrictText.ReadLines(path, MaxRecordBytes), path))
        {
            string? text = null;
            int bad = raw is null ? -1 : StrictText.FindInvalidUtf8(raw);
            if (raw is not null && bad < 0)
            {
                text = StrictText.Utf8.GetString(raw);
                if (text.Trim().Length == 0)
                {
                    if (start > 0) yield return error is null ? (start, doc.ToString(), null) : (errorLine, null, error);
                    doc.Clear();
                    (start, bytes, error) = (0, 0, null);
                    continue;
                }
            }
            if (start == 0) start = line;
            if (error is not null) continue;   // the rest of a bad document goes with it
            if (raw is null || (bytes += raw.Length + 1) > MaxRecordBytes)
                (error, errorLine) = (TooLong(raw is null ? "the line" : $"the document starting at line {start}"), line);
            else if (bad >= 0)
                (error, errorLine) = (StrictText.InvalidUtf8Message(raw, bad), line);
            else
            {
                if (doc.Length > 0) doc.Append('\n');
                doc.Append(text);
            }
        }
        if (start > 0) yield return error is null ? (start, doc.ToString(), null) : (errorLine, null, error);
    }

    private static bool IsBlank(byte[] line)
    {
        foreach (byte b in line)
            if (b is not ((byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n')) return false;
        return true;
    }

    /// <summary>Turns the reader's line-count overflow into a typed error.</summary>
    private static IEnumerable<(int Line, byte[]? Bytes)> WithLineLimit(IEnumerable<(int Line, byte[]? Bytes)> lines, string path)
    {
        using var e = lines.GetEnumerator();
        while (true)
        {
            try
            {
                if (!e.MoveNext()) yield break;
            }
            catch (InvalidDataException x)
            {
                throw new DatasetFileException(path, 0, $"{x.Message}; split the file");
            }
            yield return e.Current;
        }
    }

    private static IEnumerable<(int Line, JsonElement Element, string? Error)> JsonLines(string path)
    {
        foreach (var (line, raw) in WithLineLimit(StrictText.ReadLines(path, MaxRecordBytes), path))
        {
            if (raw is null)
            {
                yield return (line, default, TooLong("the line"));
                continue;
            }
            if (IsBlank(raw)) continue;
            yield return (line, ParseRecord(raw, out string? error), error);
        }
    }

    /// <summary>One record's JSON, checked strictly: valid UTF-8, nesting within <see cref="MaxJsonDepth"/>, one value,
    /// no unpaired surrogate escapes. On failure <paramref name="error"/> says why (the element is then default).</summary>
    private static JsonElement ParseRecord(byte[] raw, out string? error)
    {
        int bad = StrictText.FindInvalidUtf8(raw);
        if (bad >= 0)
        {
            error = StrictText.InvalidUtf8Message(raw, bad);
            return default;
        }
        try
        {
            using var doc = JsonDocument.Parse(raw, DocumentOptions);
            if (StrictText.FindUnpairedSurrogateEscape(raw, ReaderOptions) >= 0)
            {
                error = StrictText.UnpairedSurrogateMessage;
                return default;
            }
            error = null;
            return doc.RootElement.Clone();
        }
        catch (JsonException e)
        {
            error = $"invalid JSON ({e.Message})";
            return default;
        }
    }

    private static IEnumerable<(int Line, JsonElement Element, string? Error)> JsonArray(string path)
    {
        long length = new FileInfo(path).Length;
        if (length > MaxJsonArrayFileBytes)
            throw new DatasetFileException(path, 0,
                $"the file is {length} bytes; a .json dataset is read whole and may be at most {MaxJsonArrayFileBytes >> 30} GiB: use JSON lines (.jsonl) for larger data");
        byte[] bytes = File.ReadAllBytes(path);
        var items = new List<(int, JsonElement, string?)>();
        try
        {
            var reader = new Utf8JsonReader(bytes, ReaderOptions);
            if (!reader.Read()) throw new DatasetFileException(path, 0, "the file is empty");
            if (reader.TokenType != JsonTokenType.StartArray)
                throw new DatasetFileException(path, 1, "a .json dataset must be an array of records (use .jsonl for one record per line)");
            int line = 1;
            long counted = 0;
            while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            {
                long start = reader.TokenStartIndex;
                line += bytes.AsSpan((int)counted, (int)(start - counted)).Count((byte)'\n');
                counted = start;
                using var doc = JsonDocument.ParseValue(ref reader);
                var raw = bytes.AsSpan((int)start, (int)(reader.BytesConsumed - start));
                if (raw.Length > MaxRecordBytes)
                {
                    items.Add((line, default, TooLong("the record")));
                    continue;
                }
                int bad = StrictText.FindInvalidUtf8(raw);
                long surrogate = bad >= 0 ? -1 : StrictText.FindUnpairedSurrogateEscape(raw, ReaderOptions);
                if (bad >= 0) items.Add((line + StrictText.LineAt(raw, bad) - 1, default, StrictText.InvalidUtf8Message(raw, bad)));
                else if (surrogate >= 0) items.Add((line + StrictText.LineAt(raw, surrogate) - 1, default, StrictText.UnpairedSurrogateMessage));
                else items.Add((line, doc.RootElement.Clone(), null));
            }
            // Reading past ']' makes anything but whitespace or comments after the array a JsonException.
            if (reader.TokenType == JsonTokenType.EndArray) reader.Read();
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
