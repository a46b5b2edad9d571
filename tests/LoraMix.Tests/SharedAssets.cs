namespace LoraMix.Tests;

/// <summary>
/// Locates large read-only assets (model checkpoints) that live in a "shared" folder next to, or inside, the
/// repository checkout rather than in git, and files committed to the test project itself.
/// </summary>
internal static class SharedAssets
{
    /// <summary>
    /// Walks up from <see cref="AppContext.BaseDirectory"/> and returns the first existing
    /// <c>&lt;dir&gt;/shared/&lt;relativePath&gt;</c> or <c>&lt;dir&gt;/../shared/&lt;relativePath&gt;</c>,
    /// or null when there is none.
    /// </summary>
    public static string? Find(string relativePath)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string inside = Path.Combine(dir.FullName, "shared", relativePath);
            if (File.Exists(inside)) return Path.GetFullPath(inside);
            string beside = Path.Combine(dir.FullName, "..", "shared", relativePath);
            if (File.Exists(beside)) return Path.GetFullPath(beside);
        }
        return null;
    }

    /// <summary>
    /// Finds a file committed under tests/LoraMix.Tests (e.g. "Golden/x.txt") by walking up from
    /// <see cref="AppContext.BaseDirectory"/> (the bin folder) to the project folder; null when absent.
    /// </summary>
    public static string? FindTestFile(string relativePath)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string direct = Path.Combine(dir.FullName, relativePath);
            if (File.Exists(direct)) return direct;
            string fromRoot = Path.Combine(dir.FullName, "tests", "LoraMix.Tests", relativePath);
            if (File.Exists(fromRoot)) return fromRoot;
        }
        return null;
    }
}

/// <summary>
/// A <see cref="FactAttribute"/> that is skipped (with a reason) when the shared asset is absent. xunit 2.x has no
/// runtime skip (Assert.Skip / SkipException only work in v3), so the decision is made at discovery time.
/// </summary>
internal sealed class SharedAssetFactAttribute : FactAttribute
{
    public SharedAssetFactAttribute(string relativePath)
    {
        RelativePath = relativePath;
        if (SharedAssets.Find(relativePath) is null)
            Skip = $"needs ../shared/{relativePath} (absent)";
    }

    public string RelativePath { get; }
}
