using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraMix;

/// <summary>
/// Whole-directory outputs (a merged model, a training checkpoint) written atomically: the directory is built in a hidden
/// sibling (<c>.NAME.PID.GUID.tmp</c>) and renamed into place only once complete, so a failure (a full disk, an exception,
/// a kill) never leaves a partial directory under the final name.
/// </summary>
public static class AtomicDirectory
{
    /// <summary>
    /// Builds <paramref name="directory"/> through <paramref name="build"/> (which receives the empty temporary directory
    /// to fill) and renames it into place. An existing non-empty <paramref name="directory"/> is refused unless
    /// <paramref name="overwrite"/> is true; then it is swapped out (renamed aside, the new directory renamed in, the old
    /// one deleted) only after <paramref name="build"/> has succeeded, and put back if the final rename fails. Stale
    /// temporaries of an earlier killed write of the same target are removed first (see <see cref="StaleTemporaries"/>).
    /// </summary>
    /// <exception cref="LoraMixException">The target is a file, or a non-empty directory and overwriting is not allowed.</exception>
    public static void Write(string directory, Action<string> build, bool overwrite)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentNullException.ThrowIfNull(build);
        string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory));
        string parent = Path.GetDirectoryName(full)
                        ?? throw new LoraMixException($"output directory '{full}' is a file-system root; choose a directory inside it");
        string name = Path.GetFileName(full);
        if (File.Exists(full))
            throw new LoraMixException($"output directory '{full}' is an existing file; remove it or choose another directory");
        if (!overwrite && Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any())
            throw new LoraMixException($"output directory '{full}' already exists and is not empty; allow overwriting it, or choose another directory");
        Directory.CreateDirectory(parent);
        StaleTemporaries.Remove(parent, name);
        string temp = Path.Combine(parent, StaleTemporaries.NameFor(name, StaleTemporaries.TempSuffix));
        Directory.CreateDirectory(temp);
        try
        {
            build(temp);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
        Replace(temp, full);
    }

    /// <summary>
    /// Moves the complete directory <paramref name="temp"/> to <paramref name="final"/> (same parent). An existing
    /// <paramref name="final"/> is renamed aside first and deleted after the move, or restored if the move fails;
    /// <paramref name="temp"/> is deleted on failure.
    /// </summary>
    internal static void Replace(string temp, string final)
    {
        if (!Directory.Exists(final))
        {
            try
            {
                Directory.Move(temp, final);
            }
            catch
            {
                TryDelete(temp);
                throw;
            }
            return;
        }
        string old = Path.Combine(Path.GetDirectoryName(final)!, StaleTemporaries.NameFor(Path.GetFileName(final), StaleTemporaries.OldSuffix));
        try
        {
            Directory.Move(final, old);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
        try
        {
            Directory.Move(temp, final);
        }
        catch
        {
            try { Directory.Move(old, final); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            TryDelete(temp);
            throw;
        }
        // best effort: a .old directory that cannot be deleted now is removed by the next StaleTemporaries.Remove
        TryDelete(old);
    }

    internal static void TryDelete(string directory)
    {
        try { if (Directory.Exists(directory)) Directory.Delete(directory, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }
}

/// <summary>
/// The hidden temporary entries LoraMix itself creates next to its outputs, and their cleanup after a crash or a kill.
/// Names are <c>.FINAL.PID.GUID.KIND</c>: FINAL the name of the output, PID the writing process, GUID 32 lower-case hex
/// digits, KIND <c>tmp</c> (a file or directory being written: <see cref="AtomicFile"/>, checkpoints,
/// <see cref="AtomicDirectory"/>), <c>partial</c> (a staged safetensors shard) or <c>old</c> (a directory being replaced).
/// Checkpoint directories of earlier versions were named <c>.checkpoint-STEP.GUID.tmp</c> (no PID).
/// </summary>
public static partial class StaleTemporaries
{
    internal const string TempSuffix = "tmp";
    internal const string PartialSuffix = "partial";
    internal const string OldSuffix = "old";

    /// <summary>The hidden temporary name of <paramref name="finalName"/> for this process.</summary>
    internal static string NameFor(string finalName, string kind) =>
        string.Create(CultureInfo.InvariantCulture, $".{finalName}.{Environment.ProcessId}.{Guid.NewGuid():N}.{kind}");

    /// <summary>
    /// Removes the stale LoraMix temporaries directly inside <paramref name="directory"/> (not below it): entries whose name
    /// matches the patterns above and whose writing process is no longer running (entries of this process and of any
    /// other running process are kept, as they may still be in use; pre-PID checkpoint directories are always stale).
    /// Nothing else is touched: not other hidden files, not symbolic links, not entries of other names. A stale
    /// <c>.old</c> directory whose final directory is missing (a kill between the two renames of a swap) is renamed back
    /// instead of deleted. Entries that cannot be removed are left alone (best effort, never throws for them).
    /// </summary>
    /// <param name="directory">The folder to clean; nothing happens when it does not exist.</param>
    /// <param name="finalName">Only temporaries of this output name, or all when null.</param>
    /// <returns>The full paths removed (or restored), in name order.</returns>
    public static IReadOnlyList<string> Remove(string directory, string? finalName = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        var removed = new List<string>();
        if (!Directory.Exists(directory)) return removed;
        IEnumerable<FileSystemInfo> entries;
        try
        {
            entries = new DirectoryInfo(directory).EnumerateFileSystemInfos().OrderBy(e => e.Name, StringComparer.Ordinal).ToList();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return removed;
        }
        foreach (var entry in entries)
        {
            if (!IsStale(entry.Name, out string name, out string kind) || (finalName is not null && name != finalName)) continue;
            if (entry.LinkTarget is not null) continue;
            try
            {
                if (entry is DirectoryInfo dir)
                {
                    string final = Path.Combine(directory, name);
                    if (kind == OldSuffix && !Path.Exists(final)) dir.MoveTo(final);
                    else dir.Delete(recursive: true);
                }
                else entry.Delete();
                removed.Add(entry.FullName);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
        return removed;
    }

    /// <summary>True when <paramref name="entryName"/> is a LoraMix temporary whose writer is gone.</summary>
    internal static bool IsStale(string entryName, out string finalName, out string kind)
    {
        var m = Pattern().Match(entryName);
        if (m.Success)
        {
            finalName = m.Groups["name"].Value;
            kind = m.Groups["kind"].Value;
            return !int.TryParse(m.Groups["pid"].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture, out int pid) || !IsRunning(pid);
        }
        m = LegacyCheckpointPattern().Match(entryName);
        finalName = m.Success ? m.Groups["name"].Value : "";
        kind = m.Success ? TempSuffix : "";
        return m.Success;
    }

    private static bool IsRunning(int pid)
    {
        if (pid == Environment.ProcessId) return true;
        if (pid <= 0) return false;
        if (OperatingSystem.IsLinux()) return Directory.Exists(string.Create(CultureInfo.InvariantCulture, $"/proc/{pid}"));
        try
        {
            using var p = Process.GetProcessById(pid);
            return true;
        }
        catch (ArgumentException)
        {
            return false;          // no process with that id
        }
        catch (Exception)
        {
            return true;           // cannot tell: keep the entry
        }
    }

    [GeneratedRegex(@"^\.(?<name>[^/\\]+)\.(?<pid>[0-9]{1,10})\.(?<guid>[0-9a-f]{32})\.(?<kind>tmp|partial|old)$", RegexOptions.CultureInvariant)]
    private static partial Regex Pattern();

    [GeneratedRegex(@"^\.(?<name>checkpoint-[0-9]+)\.(?<guid>[0-9a-f]{32})\.tmp$", RegexOptions.CultureInvariant)]
    private static partial Regex LegacyCheckpointPattern();
}
