using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>
/// Locates the tokenizer fixture cache that scripts/fetch-tokenizers fills: $LORAMIX_TOKENIZER_CACHE, else the
/// repository root's .cache/tokenizers found by walking up from <see cref="AppContext.BaseDirectory"/>.
/// </summary>
internal static class TokenizerFixtures
{
    public static readonly string[] Families = ["llama3", "qwen", "llama2", "mistral"];

    private static readonly Lazy<string?> s_cache = new(Locate);
    private static readonly ConcurrentDictionary<string, TextTokenizer> s_loaded = new();

    public static string? CacheDir => s_cache.Value;

    private static string? Locate()
    {
        string? env = Environment.GetEnvironmentVariable("LORAMIX_TOKENIZER_CACHE");
        if (!string.IsNullOrEmpty(env)) return Complete(env) ? Path.GetFullPath(env) : null;
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, ".cache", "tokenizers");
            if (Complete(candidate)) return candidate;
        }
        return null;
    }

    private static bool Complete(string dir) =>
        File.Exists(Path.Combine(dir, "llama3", "tokenizer.json"))
        && File.Exists(Path.Combine(dir, "qwen", "tokenizer.json"))
        && File.Exists(Path.Combine(dir, "llama2", "tokenizer.model"))
        && File.Exists(Path.Combine(dir, "mistral", "tokenizer.json"));

    public static string FamilyDir(string family) =>
        Path.Combine(CacheDir ?? throw new InvalidOperationException("no tokenizer cache (run scripts/fetch-tokenizers)"), family);

    /// <summary>The tokenizer of a family, loaded once per test run.</summary>
    public static TextTokenizer Load(string family) => s_loaded.GetOrAdd(family, f => TextTokenizer.FromDirectory(FamilyDir(f)));

    /// <summary>The node_modules folder with the JS reference encoders, or null.</summary>
    public static string? NodeModules
    {
        get
        {
            string? env = Environment.GetEnvironmentVariable("LORAMIX_TOKENIZER_NODE_MODULES");
            if (!string.IsNullOrEmpty(env)) return System.IO.Directory.Exists(env) ? env : null;
            if (CacheDir is null) return null;
            string nm = Path.Combine(CacheDir, "node_modules");
            return System.IO.Directory.Exists(Path.Combine(nm, "@lenml", "tokenizers")) ? nm : null;
        }
    }

    private static readonly Lazy<bool> s_node = new(() =>
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo("node", "--version")
                { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false });
            if (p is null) return false;
            p.WaitForExit(10_000);
            return p.HasExited && p.ExitCode == 0;
        }
        catch (Exception) { return false; }
    });

    public static bool NodeAvailable => s_node.Value;

    public static string? RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "scripts", "tokenizer-reference.mjs"))) return dir.FullName;
        return null;
    }

    /// <summary>One row of reference output.</summary>
    public sealed record Reference(string Text, int[] Ids, bool ParseSpecial);

    public static List<Reference> ReadReferences(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var list = new List<Reference>();
        foreach (JsonElement e in doc.RootElement.EnumerateArray())
            list.Add(new Reference(e.GetProperty("text").GetString()!,
                e.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray(),
                e.GetProperty("parse_special").GetBoolean()));
        return list;
    }

    /// <summary>Runs scripts/tokenizer-reference.mjs on the strings and returns its rows.</summary>
    public static List<Reference> RunReference(string family, IReadOnlyList<string> strings, string? tokenizerDir = null)
    {
        string root = RepoRoot() ?? throw new InvalidOperationException("repository root not found");
        string input = Path.Combine(Path.GetTempPath(), $"loramix-tok-{Environment.ProcessId}-{Guid.NewGuid():N}.json");
        File.WriteAllText(input, JsonSerializer.Serialize(strings));
        try
        {
            var psi = new ProcessStartInfo("node")
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
                StandardOutputEncoding = System.Text.Encoding.UTF8,
            };
            psi.ArgumentList.Add(Path.Combine(root, "scripts", "tokenizer-reference.mjs"));
            psi.ArgumentList.Add(family);
            psi.ArgumentList.Add(input);
            psi.ArgumentList.Add("--modules");
            psi.ArgumentList.Add(NodeModules!);
            if (tokenizerDir is not null)
            {
                psi.ArgumentList.Add("--tokenizer-dir");
                psi.ArgumentList.Add(tokenizerDir);
            }
            using var p = Process.Start(psi)!;
            Task<string> stderr = p.StandardError.ReadToEndAsync();
            string stdout = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            if (p.ExitCode != 0) throw new InvalidOperationException($"tokenizer-reference.mjs {family} failed: {stderr.Result}");
            return ReadReferences(stdout);
        }
        finally
        {
            File.Delete(input);
        }
    }

    public const string SkipReason = "needs the tokenizer fixture cache (.cache/tokenizers or $LORAMIX_TOKENIZER_CACHE): run scripts/fetch-tokenizers";
}

/// <summary>A fact skipped (with a reason) when the tokenizer fixture cache is absent.</summary>
internal sealed class TokenizerFactAttribute : FactAttribute
{
    public TokenizerFactAttribute(bool needsNode = false)
    {
        if (TokenizerFixtures.CacheDir is null) Skip = TokenizerFixtures.SkipReason;
        else if (needsNode && (TokenizerFixtures.NodeModules is null || !TokenizerFixtures.NodeAvailable))
            Skip = "needs node and the reference encoders in .cache/tokenizers/node_modules: run scripts/fetch-tokenizers";
    }
}

/// <summary>A theory skipped (with a reason) when the tokenizer fixture cache is absent.</summary>
internal sealed class TokenizerTheoryAttribute : TheoryAttribute
{
    public TokenizerTheoryAttribute(bool needsNode = false)
    {
        if (TokenizerFixtures.CacheDir is null) Skip = TokenizerFixtures.SkipReason;
        else if (needsNode && (TokenizerFixtures.NodeModules is null || !TokenizerFixtures.NodeAvailable))
            Skip = "needs node and the reference encoders in .cache/tokenizers/node_modules: run scripts/fetch-tokenizers";
    }
}
