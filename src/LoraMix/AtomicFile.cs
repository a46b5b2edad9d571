using System.Text;

namespace LoraMix;

/// <summary>Atomic file writes: write to a temp file in the same folder, flush, then rename over the target.</summary>
public static class AtomicFile
{
    /// <summary>Writes text (UTF-8, no BOM) atomically.</summary>
    public static void WriteAllText(string path, string text) =>
        Write(path, s => s.Write(new UTF8Encoding(false).GetBytes(text)));

    /// <summary>Writes through <paramref name="write"/> into a temp file, then renames it to <paramref name="path"/>.
    /// If <paramref name="write"/> throws, the temp file is deleted and <paramref name="path"/> is untouched.</summary>
    public static void Write(string path, Action<FileStream> write)
    {
        string full = Path.GetFullPath(path);
        string dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        string temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(fs);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }
}
