using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;

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

    /// <summary>Loads a YAML or JSON file and applies <paramref name="overrides"/> (<c>a.b=value</c>, value parsed as YAML).</summary>
    public static ConfigDocument Load(string path, IEnumerable<string>? overrides = null)
    {
        if (!File.Exists(path)) throw new ConfigFileException(path, "(file)", "not found");
        var doc = Parse(File.ReadAllText(path), path);
        foreach (var o in overrides ?? []) doc.Set(o);
        return doc;
    }

    /// <summary>Parses YAML/JSON text; <paramref name="source"/> names it in errors.</summary>
    public static ConfigDocument Parse(string text, string source)
    {
        var yaml = new YamlStream();
        try
        {
            yaml.Load(new StringReader(text));
        }
        catch (YamlException e)
        {
            throw new ConfigFileException(source, $"line {e.Start.Line}", $"not valid YAML/JSON: {e.Message}");
        }
        if (yaml.Documents.Count == 0) return new ConfigDocument(new JsonObject(), source);
        var node = Convert(yaml.Documents[0].RootNode, source, "(root)");
        return node is JsonObject o ? new ConfigDocument(o, source)
            : throw new ConfigFileException(source, "(root)", "expected a mapping of keys to values");
    }

    /// <summary>Applies one <c>key.path=value</c> override.</summary>
    public void Set(string assignment)
    {
        int eq = assignment.IndexOf('=');
        if (eq <= 0) throw new ConfigFileException("--set", assignment, "expected key=value (e.g. --set adapter.r=16)");
        string key = assignment[..eq].Trim();
        string valueText = assignment[(eq + 1)..];
        JsonNode? value;
        var yaml = new YamlStream();
        try
        {
            yaml.Load(new StringReader(valueText.Length == 0 ? "''" : valueText));
            value = yaml.Documents.Count == 0 ? null : Convert(yaml.Documents[0].RootNode, "--set", key);
        }
        catch (YamlException)
        {
            value = JsonValue.Create(valueText);
        }
        var parts = key.Split('.');
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

    private static JsonNode? Convert(YamlNode node, string source, string path)
    {
        switch (node)
        {
            case YamlMappingNode map:
                var o = new JsonObject();
                foreach (var (k, v) in map.Children)
                {
                    string key = (k as YamlScalarNode)?.Value ?? throw new ConfigFileException(source, path, "keys must be plain strings");
                    if (o.ContainsKey(key)) throw new ConfigFileException(source, key, "duplicate key");
                    o[key] = Convert(v, source, key);
                }
                return o;
            case YamlSequenceNode seq:
                return new JsonArray(seq.Children.Select(c => Convert(c, source, path)).ToArray());
            case YamlScalarNode scalar:
                string? s = scalar.Value;
                if (scalar.Style is ScalarStyle.SingleQuoted or ScalarStyle.DoubleQuoted) return JsonValue.Create(s);
                if (s is null || s is "~" or "null" or "Null" or "NULL" || s.Length == 0) return null;
                if (s is "true" or "True" or "TRUE") return JsonValue.Create(true);
                if (s is "false" or "False" or "FALSE") return JsonValue.Create(false);
                if (long.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out long l)) return JsonValue.Create(l);
                if (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double d)) return JsonValue.Create(d);
                return JsonValue.Create(s);
            default:
                throw new ConfigFileException(source, path, $"unsupported YAML node {node.NodeType}");
        }
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

    public double? Double(string key)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return null;
        if (n is JsonValue v && v.GetValueKind() == JsonValueKind.Number)
            return double.Parse(v.ToJsonString(), NumberStyles.Float, CultureInfo.InvariantCulture);
        if (n is JsonValue sv && sv.GetValueKind() == JsonValueKind.String &&
            double.TryParse(sv.GetValue<string>(), NumberStyles.Float, CultureInfo.InvariantCulture, out double d)) return d;
        throw Wrong(key, "a number", n);
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

    public bool Bool(string key, bool defaultValue)
    {
        var n = Lookup(key, out bool present);
        if (!present || n is null) return defaultValue;
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
