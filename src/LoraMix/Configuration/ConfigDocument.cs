using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using YamlDotNet.Core;
using YamlDotNet.Core.Events;

namespace LoraMix.Configuration;

/// <summary>A run configuration file (YAML or JSON) or one of its keys is invalid.</summary>
public sealed class ConfigFileException : LoraMixException
{
    public ConfigFileException(string file, string key, string message) : base($"{file}: '{key}': {message}")
    {
        FilePath = file;
        Key = key;
    }

    public string FilePath { get; }
    public string Key { get; }
}

/// <summary>
/// A configuration tree read from YAML (or JSON, which is YAML) with <c>--set key.path=value</c> overrides applied, and
/// strict typed accessors: every key must be consumed by the command, so a misspelt key is an error naming it and the
/// keys that are understood — never silently ignored.
/// </summary>
public sealed class ConfigDocument
{
    private readonly JsonObject _root;
    private readonly HashSet<string> _consumed = new(StringComparer.Ordinal);

    private ConfigDocument(JsonObject root, string source)
    {
        _root = root;
        Source = source;
    }

    /// <summary>The file name (or "--set") used in error messages.</summary>
    public string Source { get; }

    /// <summary>The largest configuration accepted, in bytes of the file or characters of the text (1 MiB).</summary>
    public const int MaxDocumentSize = 1 << 20;

    /// <summary>The deepest nesting of mappings and lists accepted (after alias expansion; key paths of <c>--set</c>
    /// count too). Checked while parsing, before any recursion can get deep.</summary>
    public const int MaxDepth = 64;

    /// <summary>The most nodes (keys, values, mappings, lists) a configuration may expand to, aliases counted at their
    /// full expanded size, so that "billion laughs" alias nesting is refused before anything large is built.</summary>
    public const int MaxNodes = 100_000;

    /// <summary>Loads a YAML or JSON file and applies <paramref name="overrides"/> (<c>a.b=value</c>, value parsed as YAML).</summary>
    /// <exception cref="ConfigFileException">The file is missing, unreadable, over <see cref="MaxDocumentSize"/>, not
    /// UTF-8, not YAML/JSON, or over a limit (<see cref="MaxDepth"/>, <see cref="MaxNodes"/>); the message names the file
    /// and the line or key.</exception>
    public static ConfigDocument Load(string path, IEnumerable<string>? overrides = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        InputFiles.RequireRegular(path, reason => new ConfigFileException(path, "(file)", reason));
        if (!File.Exists(path)) throw new ConfigFileException(path, "(file)", "not found");
        byte[] bytes;
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
            if (stream.Length > MaxDocumentSize)
                throw new ConfigFileException(path, "(file)", $"is {stream.Length} bytes; a configuration may be at most {MaxDocumentSize >> 20} MiB");
            bytes = new byte[stream.Length];
            stream.ReadExactly(bytes);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ConfigFileException(path, "(file)", $"cannot be read: {e.Message}");
        }
        ReadOnlySpan<byte> span = bytes;
        if (span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) span = span[3..];
        int bad = StrictText.FindInvalidUtf8(span);
        if (bad >= 0) throw new ConfigFileException(path, $"line {StrictText.LineAt(span, bad)}", StrictText.InvalidUtf8Message(span, bad));
        var doc = Parse(StrictText.Utf8.GetString(span), path);
        foreach (var o in overrides ?? []) doc.Set(o);
        return doc;
    }

    /// <summary>Parses YAML/JSON text; <paramref name="source"/> names it in errors.</summary>
    /// <exception cref="ConfigFileException">Not YAML/JSON, not a mapping, or over a limit; see <see cref="Load"/>.</exception>
    public static ConfigDocument Parse(string text, string source)
    {
        ArgumentNullException.ThrowIfNull(text);
        JsonNode? node;
        try
        {
            node = Build(text, source, "(root)", 0, out bool empty);
            if (empty) return new ConfigDocument(new JsonObject(), source);
        }
        catch (YamlException e)
        {
            throw new ConfigFileException(source, $"line {e.Start.Line}", $"not valid YAML/JSON: {e.Message}");
        }
        return node is JsonObject o ? new ConfigDocument(o, source)
            : throw new ConfigFileException(source, "(root)", "expected a mapping of keys to values");
    }

    /// <summary>Applies one <c>key.path=value</c> override.</summary>
    public void Set(string assignment)
    {
        ArgumentNullException.ThrowIfNull(assignment);
        int eq = assignment.IndexOf('=');
        if (eq <= 0) throw new ConfigFileException("--set", assignment, "expected key=value (e.g. --set adapter.r=16)");
        string key = assignment[..eq].Trim();
        string valueText = assignment[(eq + 1)..];
        var parts = key.Split('.');
        if (parts.Length > MaxDepth)
            throw new ConfigFileException("--set", key, $"the key path has {parts.Length} parts; at most {MaxDepth} are accepted");
        JsonNode? value;
        try
        {
            value = Build(valueText.Length == 0 ? "''" : valueText, "--set", key, parts.Length, out bool empty);
            if (empty) value = null;
        }
        catch (YamlException)
        {
            if (StrictText.FindUnpairedSurrogate(valueText) >= 0) throw new ConfigFileException("--set", key, UnpairedSurrogate);
            if (valueText.Length > MaxDocumentSize) throw TooLarge("--set", valueText.Length);
            value = JsonValue.Create(valueText);
        }
        JsonObject parent = _root;
        for (int i = 0; i < parts.Length - 1; i++)
        {
            if (parent[parts[i]] is not JsonObject child)
            {
                child = new JsonObject();
                parent[parts[i]] = child;
            }
            parent = child;
        }
        parent[parts[^1]] = value;
    }

    private const string UnpairedSurrogate = "holds an unpaired UTF-16 surrogate (e.g. \"\\ud800\"), which is not text; fix or remove it";

    private static ConfigFileException TooLarge(string source, int length) =>
        new(source, "(file)", $"is {length} characters; a configuration may be at most {MaxDocumentSize >> 20} MiB");

    /// <summary>A node whose anchor aliases may repeat: its tree (or the key text of a scalar), node count and height.</summary>
    private sealed record Anchored(JsonNode? Node, string? KeyText, int Nodes, int Height);

    /// <summary>An open mapping or list while building.</summary>
    private sealed class Frame(JsonNode container, string path, string? anchor)
    {
        public JsonNode Container { get; } = container;
        public string Path { get; } = path;
        public string? Anchor { get; } = anchor;
        /// <summary>For a mapping: the key read, waiting for its value.</summary>
        public string? PendingKey { get; set; }
        /// <summary>Nodes in the subtree, the container itself included.</summary>
        public int Nodes { get; set; } = 1;
        /// <summary>Levels of containers in the subtree, the container itself included.</summary>
        public int Height { get; set; } = 1;
    }

    /// <summary>
    /// Builds the JSON tree of the first (only) YAML document from parser events, without recursion: nesting deeper than
    /// <see cref="MaxDepth"/> (counting <paramref name="baseDepth"/> levels above the root), more than
    /// <see cref="MaxNodes"/> nodes (aliases counted at their expanded size, checked before copying), unknown aliases,
    /// duplicate or non-scalar keys, a second document and unpaired surrogates are <see cref="ConfigFileException"/>s
    /// naming the line. Syntax errors stay <see cref="YamlException"/>s for the caller.
    /// </summary>
    private static JsonNode? Build(string text, string source, string rootPath, int baseDepth, out bool empty)
    {
        if (text.Length > MaxDocumentSize) throw TooLarge(source, text.Length);
        var parser = new Parser(new StringReader(text));
        var anchors = new Dictionary<string, Anchored>(StringComparer.Ordinal);
        var stack = new Stack<Frame>();
        JsonNode? root = null;
        bool haveRoot = false;
        int documents = 0, nodes = 0;

        ConfigFileException Error(ParsingEvent at, string key, string message) =>
            new(source, key, $"{message} (line {at.Start.Line})");

        string PathOf(Frame? parent) => parent is null ? rootPath
            : parent.Container is JsonObject ? (parent.Path == rootPath && baseDepth == 0 ? parent.PendingKey! : parent.Path + "." + parent.PendingKey)
            : parent.Path;

        // Checks the budget for `added` nodes of height `height` placed under the open containers, and credits them to
        // the innermost one (a closed container credits its totals to its parent when it ends).
        void Count(ParsingEvent at, Frame? parent, int added, int height, bool credit = true)
        {
            if (nodes + (long)added > MaxNodes)
                throw Error(at, PathOf(parent), $"the configuration expands to more than {MaxNodes} values (aliases count at their full size); it is refused before it is built");
            if (baseDepth + stack.Count + height > MaxDepth)
                throw Error(at, PathOf(parent), $"nesting deeper than {MaxDepth} levels (aliases count at their full depth); flatten the configuration");
            nodes += added;
            if (parent is null || !credit) return;
            parent.Nodes += added;
            parent.Height = Math.Max(parent.Height, height + 1);
        }

        void Attach(Frame? parent, JsonNode? node)
        {
            if (parent is null)
            {
                root = node;
                haveRoot = true;
            }
            else if (parent.Container is JsonArray array) array.Add(node);
            else
            {
                ((JsonObject)parent.Container)[parent.PendingKey!] = node;
                parent.PendingKey = null;
            }
        }

        bool IsKeyPosition(Frame? parent) => parent is { Container: JsonObject, PendingKey: null };

        void SetKey(ParsingEvent at, Frame parent, string key)
        {
            var map = (JsonObject)parent.Container;
            if (StrictText.FindUnpairedSurrogate(key) >= 0) throw Error(at, parent.Path, "a key " + UnpairedSurrogate);
            if (map.ContainsKey(key))
                throw Error(at, parent.Path == rootPath && baseDepth == 0 ? key : parent.Path + "." + key, "duplicate key; keep one");
            parent.PendingKey = key;
        }

        while (Next(parser))
        {
            var e = parser.Current!;
            var parent = stack.Count > 0 ? stack.Peek() : null;
            switch (e)
            {
                case StreamStart or StreamEnd or DocumentEnd:
                    break;
                case DocumentStart:
                    if (++documents > 1)
                        throw Error(e, "(file)", "a second YAML document ('---'); a configuration is one document");
                    break;
                case Scalar scalar:
                    if (IsKeyPosition(parent))
                    {
                        Count(e, parent, 1, 0);
                        SetKey(e, parent!, scalar.Value);
                        break;
                    }
                    if (StrictText.FindUnpairedSurrogate(scalar.Value) >= 0) throw Error(e, PathOf(parent), "the value " + UnpairedSurrogate);
                    Count(e, parent, 1, 0);
                    var value = ScalarToJson(scalar);
                    if (!scalar.Anchor.IsEmpty) anchors[scalar.Anchor.Value] = new Anchored(value, scalar.Value, 1, 0);
                    Attach(parent, value?.DeepClone());
                    break;
                case AnchorAlias alias:
                    if (!anchors.TryGetValue(alias.Value.Value, out var anchored))
                        throw Error(e, PathOf(parent), $"alias *{alias.Value.Value} refers to no anchor defined before it (&{alias.Value.Value})");
                    if (IsKeyPosition(parent))
                    {
                        if (anchored.KeyText is null) throw Error(e, parent!.Path, "keys must be plain strings");
                        Count(e, parent, 1, 0);
                        SetKey(e, parent!, anchored.KeyText);
                        break;
                    }
                    Count(e, parent, anchored.Nodes, anchored.Height);
                    Attach(parent, anchored.Node?.DeepClone());
                    break;
                case NodeEvent start and (MappingStart or SequenceStart):
                    if (IsKeyPosition(parent)) throw Error(e, parent!.Path, "keys must be plain strings");
                    string path = PathOf(parent);
                    Count(e, parent, 1, 1, credit: false);   // credited to the parent, with its subtree, when it ends
                    var container = start is MappingStart ? (JsonNode)new JsonObject() : new JsonArray();
                    Attach(parent, container);
                    stack.Push(new Frame(container, path, start.Anchor.IsEmpty ? null : start.Anchor.Value));
                    break;
                case MappingEnd or SequenceEnd:
                    var done = stack.Pop();
                    if (stack.TryPeek(out var outer))
                    {
                        outer.Nodes += done.Nodes;
                        outer.Height = Math.Max(outer.Height, done.Height + 1);
                    }
                    if (done.Anchor is not null) anchors[done.Anchor] = new Anchored(done.Container, null, done.Nodes, done.Height);
                    break;
                default:
                    throw Error(e, PathOf(parent), $"unsupported YAML event {e.GetType().Name}");
            }
        }
        empty = !haveRoot;
        return root;
    }

    /// <summary>
    /// Advances the parser. YamlDotNet reports most malformed input as <see cref="YamlException"/>, but some (e.g. a
    /// plain scalar like <c>[a-</c> in a block mapping) as <see cref="InvalidOperationException"/> or other exception
    /// types; those become a <see cref="YamlException"/> at the last good position, so every parse failure is one type.
    /// </summary>
    private static bool Next(Parser parser)
    {
        try
        {
            return parser.MoveNext();
        }
        catch (Exception e) when (e is not (YamlException or OutOfMemoryException or ConfigFileException))
        {
            var at = parser.Current?.End ?? Mark.Empty;
            throw new YamlException(at, at, $"the YAML parser failed after line {at.Line} ({e.Message})", e);
        }
    }

    private static JsonNode? ScalarToJson(Scalar scalar)
    {
        string s = scalar.Value;
        if (scalar.Style is ScalarStyle.SingleQuoted or ScalarStyle.DoubleQuoted or ScalarStyle.Literal or ScalarStyle.Folded)
            return JsonValue.Create(s);
        if (s is "~" or "null" or "Null" or "NULL" || s.Length == 0) return null;
        if (s is "true" or "True" or "TRUE") return JsonValue.Create(true);
        if (s is "false" or "False" or "FALSE") return JsonValue.Create(false);
        if (long.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out long l)) return JsonValue.Create(l);
        // Infinity and NaN (1e400, .inf, nan) have no JSON form: they stay text, and the typed accessors refuse them.
        if (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double d) && double.IsFinite(d)) return JsonValue.Create(d);
        return JsonValue.Create(s);
    }

    private JsonNode? Lookup(string key, out bool present)
    {
        var parts = key.Split('.');
        JsonNode? node = _root;
        for (int i = 0; i < parts.Length; i++)
        {
            if (node is not JsonObject o || !o.TryGetPropertyValue(parts[i], out node))
            {
                present = false;
                return null;
            }
        }
        present = true;
        _consumed.Add(key);
        return node;
    }

    /// <summary>True when the key is present (even if null).</summary>
    public bool Has(string key)
    {
        var parts = key.Split('.');
        JsonNode? node = _root;
        foreach (var p in parts)
            if (node is not JsonObject o || !o.TryGetPropertyValue(p, out node)) return false;
        return true;
    }

    public string? String(string key, string? defaultValue = null)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return defaultValue;
        return n is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>()
            : n is JsonValue nv ? nv.ToJsonString().Trim('"')
            : throw Wrong(key, "a string", n);
    }

    /// <summary>Like <see cref="String(string, string?)"/>, but an explicit null (<c>key:</c> or <c>key: null</c>) is an
    /// error instead of the default: for keys whose silent default would weaken a guarantee (<c>router_policy</c>).</summary>
    public string NonNullString(string key, string defaultValue)
    {
        RejectNull(key);
        return String(key, defaultValue)!;
    }

    /// <summary>Like <see cref="Bool(string, bool)"/>, but an explicit null is an error.</summary>
    public bool NonNullBool(string key, bool defaultValue)
    {
        RejectNull(key);
        return Bool(key, defaultValue);
    }

    private void RejectNull(string key)
    {
        if (Has(key) && Lookup(key, out _) is null)
            throw new ConfigFileException(Source, key, "is null; give a value or leave the key out for the default");
    }

    public string RequiredString(string key) =>
        String(key) ?? throw new ConfigFileException(Source, key, "missing (required)");

    /// <summary>A number (a numeric string is accepted); infinity and NaN are refused, since no setting means them.</summary>
    public double? Double(string key)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return null;
        double d;
        if (n is JsonValue v && v.GetValueKind() == JsonValueKind.Number)
            d = double.Parse(v.ToJsonString(), NumberStyles.Float, CultureInfo.InvariantCulture);
        else if (!(n is JsonValue sv && sv.GetValueKind() == JsonValueKind.String &&
            double.TryParse(sv.GetValue<string>(), NumberStyles.Float, CultureInfo.InvariantCulture, out d)))
            throw Wrong(key, "a number", n);
        if (!double.IsFinite(d))
            throw new ConfigFileException(Source, key, $"expected a finite number, got {n.ToJsonString()} (out of the range of a double, or NaN)");
        return d;
    }

    public double Double(string key, double defaultValue) => Double(key) ?? defaultValue;

    public int? Int(string key)
    {
        double? d = Double(key);
        if (d is null) return null;
        if (d != Math.Floor(d.Value) || d > int.MaxValue || d < int.MinValue)
            throw new ConfigFileException(Source, key, $"expected an integer, got {d.Value.ToString(CultureInfo.InvariantCulture)}");
        return (int)d.Value;
    }

    public int Int(string key, int defaultValue) => Int(key) ?? defaultValue;

    public bool Bool(string key, bool defaultValue) => Bool(key) ?? defaultValue;

    /// <summary>true or false, or null when the key is absent or null.</summary>
    public bool? Bool(string key)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return null;
        return n is JsonValue v && v.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? v.GetValue<bool>() : throw Wrong(key, "true or false", n);
    }

    /// <summary>A list of strings; a single string is accepted as a one-element list.</summary>
    public IReadOnlyList<string>? StringList(string key)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return null;
        if (n is JsonArray a) return a.Select(e => e is JsonValue ev ? ev.ToJsonString().Trim('"') : throw Wrong(key, "a list of strings", n)).ToList();
        if (n is JsonValue v) return [v.ToJsonString().Trim('"')];
        throw Wrong(key, "a list of strings", n);
    }

    /// <summary>A mapping of names to strings (<c>adapters: {math: path/a, code: path/b}</c>), in the file's order; every
    /// entry counts as read. Names may not contain '.' (they would read as nesting).</summary>
    public IReadOnlyList<(string Name, string Value)>? StringMap(string key)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return null;
        if (n is not JsonObject o) throw Wrong(key, "a mapping of names to strings", n);
        var list = new List<(string, string)>();
        foreach (var (name, value) in o)
        {
            if (name.Contains('.')) throw new ConfigFileException(Source, key, $"the name '{name}' contains '.'; choose a name without it");
            _consumed.Add(key + "." + name);
            list.Add((name, value is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>()
                : throw Wrong(key + "." + name, "a string", value)));
        }
        return list;
    }

    /// <summary>
    /// Throws when the document has keys no accessor asked for, listing them and the understood keys.
    /// Call after reading every key the command supports.
    /// </summary>
    public void RejectUnknownKeys(IEnumerable<string> supported)
    {
        var known = new HashSet<string>(supported, StringComparer.Ordinal);
        foreach (var key in Leaves(_root, ""))
            if (!known.Contains(key) && !_consumed.Contains(key))
                throw new ConfigFileException(Source, key, $"unknown key; supported: {string.Join(", ", known.Order())}");
    }

    /// <summary>
    /// Throws for the first key no accessor asked for — also keys of a known name that the command did not read in this
    /// configuration (e.g. <c>adapter.r</c> with <c>adapter.type: full</c>) — naming it and listing <paramref name="understood"/>.
    /// </summary>
    public void RejectUnread(IEnumerable<string> understood)
    {
        foreach (var key in Leaves(_root, ""))
            if (!_consumed.Contains(key))
            {
                var known = understood.ToList();
                throw new ConfigFileException(Source, key, known.Contains(key)
                    ? "is not used by this configuration (check the adapter type or the other keys it depends on)"
                    : $"unknown key; supported: {string.Join(", ", known)}");
            }
    }

    /// <summary>True when the key holds a list.</summary>
    public bool IsList(string key) => Peek(key) is JsonArray;

    /// <summary>True when the key holds a mapping.</summary>
    public bool IsMapping(string key) => Peek(key) is JsonObject;

    private JsonNode? Peek(string key)
    {
        JsonNode? node = _root;
        foreach (var p in key.Split('.'))
            if (node is not JsonObject o || !o.TryGetPropertyValue(p, out node)) return null;
        return node;
    }

    private static IEnumerable<string> Leaves(JsonObject o, string prefix)
    {
        foreach (var (k, v) in o)
        {
            string key = prefix.Length == 0 ? k : prefix + "." + k;
            if (v is JsonObject child && child.Count > 0)
                foreach (var leaf in Leaves(child, key)) yield return leaf;
            else yield return key;
        }
    }

    private ConfigFileException Wrong(string key, string expected, JsonNode? n) =>
        new(Source, key, $"expected {expected}, got {(n is null ? "null" : n.ToJsonString())}");
}
