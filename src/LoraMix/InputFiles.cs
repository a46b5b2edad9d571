using System.Runtime.InteropServices;
using System.Text.Json;

namespace LoraMix;

/// <summary>What a path names, as far as reading it is concerned.</summary>
public enum InputFileKind
{
    /// <summary>Nothing is there.</summary>
    Missing,
    /// <summary>A regular file (after following symbolic links): the only kind LoraMix reads.</summary>
    Regular,
    /// <summary>A directory.</summary>
    Directory,
    /// <summary>A FIFO (named pipe): opening it blocks until a writer comes, reading it may never end.</summary>
    Fifo,
    /// <summary>A Unix domain socket.</summary>
    Socket,
    /// <summary>A character device (<c>/dev/zero</c>, <c>/dev/urandom</c>, a terminal): reading it may never end.</summary>
    CharacterDevice,
    /// <summary>A block device.</summary>
    BlockDevice,
    /// <summary>Anything else the operating system reports.</summary>
    Other,
}

/// <summary>
/// Guards shared by every loader of untrusted files (model, checkpoint, tokenizer and adapter files): the path must name a
/// regular file — never a FIFO, socket, device or directory, which could block forever or never end — of bounded size,
/// and JSON objects must not repeat a key (System.Text.Json keeps one of two duplicates silently).
/// </summary>
public static class InputFiles
{
    /// <summary>Largest small JSON configuration accepted (<c>config.json</c>, <c>adapter_config.json</c>,
    /// <c>tokenizer_config.json</c>, <c>model.safetensors.index.json</c> has its own 100 MB bound): 16 MiB. Real ones are
    /// a few KB (a tokenizer_config.json with chat templates and every added token, at most a few hundred KB).</summary>
    public const long MaxConfigJsonBytes = 16L << 20;

    /// <summary>Largest tokenizer file accepted (<c>tokenizer.json</c>, <c>tokenizer.model</c>): 512 MiB. Real ones are
    /// 0.5–35 MB.</summary>
    public const long MaxTokenizerFileBytes = 512L << 20;

    /// <summary>Deepest JSON nesting accepted in the files above (System.Text.Json's default): 64.</summary>
    public const int MaxJsonDepth = 64;

    /// <summary>What <paramref name="path"/> names, following symbolic links. On Linux and macOS FIFOs, sockets and
    /// devices are told apart from regular files; elsewhere only directories are (Windows has no such files in the
    /// file system).</summary>
    public static InputFileKind KindOf(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (System.IO.Directory.Exists(path)) return InputFileKind.Directory;
        if (!File.Exists(path)) return InputFileKind.Missing;
        int? mode = UnixFileType(path);
        return mode switch
        {
            null => InputFileKind.Regular,
            0x8000 => InputFileKind.Regular,
            0x4000 => InputFileKind.Directory,
            0x1000 => InputFileKind.Fifo,
            0xC000 => InputFileKind.Socket,
            0x2000 => InputFileKind.CharacterDevice,
            0x6000 => InputFileKind.BlockDevice,
            _ => InputFileKind.Other,
        };
    }

    /// <summary>
    /// Throws the exception <paramref name="error"/> builds from a reason when <paramref name="path"/> exists but is not a
    /// regular file. A missing path is left to the caller (which knows what the file was for).
    /// </summary>
    public static void RequireRegular(string path, Func<string, Exception> error)
    {
        var kind = KindOf(path);
        if (kind is InputFileKind.Missing or InputFileKind.Regular) return;
        throw error(NotRegularReason(kind));
    }

    /// <summary>The reason text for a path of the given (non-regular) kind.</summary>
    public static string NotRegularReason(InputFileKind kind)
    {
        string what = kind switch
        {
            InputFileKind.Directory => "a directory",
            InputFileKind.Fifo => "a FIFO (named pipe)",
            InputFileKind.Socket => "a socket",
            InputFileKind.CharacterDevice => "a character device",
            InputFileKind.BlockDevice => "a block device",
            _ => "not a regular file",
        };
        return $"is {what}, not a regular file; LoraMix reads model, tokenizer and adapter files only from regular files " +
               "(a pipe or device could block forever or never end). Copy the data into a regular file";
    }

    /// <summary>
    /// Reads a whole regular file of at most <paramref name="maxBytes"/> bytes. Non-regular files and larger files are
    /// refused with the exception <paramref name="error"/> builds from a reason, before anything is read.
    /// </summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    public static byte[] ReadAllBytes(string path, long maxBytes, Func<string, Exception> error)
    {
        RequireRegular(path, error);
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan);
        long length = stream.Length;
        if (length > maxBytes)
            throw error($"the file is {length} bytes, more than the {maxBytes}-byte limit for this kind of file");
        var data = new byte[length];
        int read = stream.ReadAtLeast(data, data.Length, throwOnEndOfStream: false);
        if (read < data.Length || stream.ReadByte() >= 0)
            throw error("the file changed size while it was read");
        return data;
    }

    /// <summary>
    /// Checks JSON text before it is parsed: no object has the same key twice (at any depth) — otherwise the exception
    /// <paramref name="duplicate"/> builds from the key's path (<c>rope_scaling.factor</c>, <c>added_tokens[3].id</c>) is
    /// thrown — and every string and key is valid Unicode (System.Text.Json accepts a lone surrogate escape such as
    /// <c>"\ud800"</c> syntactically, then fails when the value is read). Malformed JSON, nesting deeper than
    /// <paramref name="options"/> allows, and invalid strings raise <see cref="JsonException"/>, as the parsers do.
    /// </summary>
    public static void ValidateJson(ReadOnlySpan<byte> utf8, JsonReaderOptions options, Func<string, Exception> duplicate)
    {
        var reader = new Utf8JsonReader(utf8, options);
        var frames = new Stack<Frame>();
        string? pendingKey = null;
        while (reader.Read())
        {
            switch (reader.TokenType)
            {
                case JsonTokenType.StartObject:
                case JsonTokenType.StartArray:
                {
                    string path = frames.Count == 0 ? "" : ChildPath(frames.Peek(), pendingKey);
                    if (frames.Count > 0 && frames.Peek().Keys is null) frames.Peek().Index++;
                    frames.Push(new Frame(path, reader.TokenType == JsonTokenType.StartObject ? new HashSet<string>(StringComparer.Ordinal) : null));
                    pendingKey = null;
                    break;
                }
                case JsonTokenType.EndObject:
                case JsonTokenType.EndArray:
                    frames.Pop();
                    break;
                case JsonTokenType.PropertyName:
                {
                    string key = ReadString(ref reader);
                    var frame = frames.Peek();
                    if (!frame.Keys!.Add(key)) throw duplicate(Join(frame.Path, key));
                    pendingKey = key;
                    break;
                }
                default:
                    if (reader.TokenType == JsonTokenType.String) _ = ReadString(ref reader);
                    if (frames.Count > 0 && frames.Peek().Keys is null) frames.Peek().Index++;
                    pendingKey = null;
                    break;
            }
        }
    }

    private static string ReadString(ref Utf8JsonReader reader)
    {
        try
        {
            return reader.GetString()!;
        }
        catch (InvalidOperationException e)
        {
            throw new JsonException($"the string at byte {reader.TokenStartIndex} is not valid Unicode (a lone surrogate escape?): {e.Message}", e);
        }
    }

    private sealed class Frame(string path, HashSet<string>? keys)
    {
        public string Path { get; } = path;
        public HashSet<string>? Keys { get; } = keys;   // null for an array
        public int Index { get; set; }
    }

    private static string ChildPath(Frame parent, string? key) =>
        parent.Keys is null ? $"{parent.Path}[{parent.Index}]" : Join(parent.Path, key ?? "");

    private static string Join(string path, string key) => path.Length == 0 ? key : path + "." + key;

    /// <summary>A short, printable rendering of a JSON key or value for error messages.</summary>
    internal static string Shorten(string s) => s.Length <= 80 ? s : s[..80] + "...";

    // ------------------------------------------------------------------ file type (Unix)

    private const int AtFdCwd = -100;
    private const uint StatxType = 0x0001;
    private static int s_statxState; // 0 unknown, 1 available, -1 unavailable

    /// <summary>The S_IFMT bits of the file's mode (following links), or null when they cannot be had here.</summary>
    private static unsafe int? UnixFileType(string path)
    {
        try
        {
            if (OperatingSystem.IsLinux() && s_statxState >= 0)
            {
                // struct statx has one layout on every architecture; stx_mode is the u16 at offset 28.
                byte* buffer = stackalloc byte[256];
                new Span<byte>(buffer, 256).Clear();
                try
                {
                    if (statx(AtFdCwd, path, 0, StatxType, buffer) != 0) return null;
                    s_statxState = 1;
                    return *(ushort*)(buffer + 28) & 0xF000;
                }
                catch (EntryPointNotFoundException)
                {
                    s_statxState = -1;
                    return null;
                }
            }
            if (OperatingSystem.IsMacOS())
            {
                // 64-bit-inode struct stat: dev_t st_dev (int32), then mode_t st_mode (u16) at offset 4.
                byte* buffer = stackalloc byte[512];
                int rc = RuntimeInformation.ProcessArchitecture == Architecture.X64 ? stat_inode64(path, buffer) : stat_mac(path, buffer);
                return rc != 0 ? null : *(ushort*)(buffer + 4) & 0xF000;
            }
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
        return null;
    }

    [DllImport("libc", EntryPoint = "statx", SetLastError = true)]
    private static extern unsafe int statx(int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, uint mask, byte* buffer);

    [DllImport("libc", EntryPoint = "stat", SetLastError = true)]
    private static extern unsafe int stat_mac([MarshalAs(UnmanagedType.LPUTF8Str)] string path, byte* buffer);

    [DllImport("libc", EntryPoint = "stat$INODE64", SetLastError = true)]
    private static extern unsafe int stat_inode64([MarshalAs(UnmanagedType.LPUTF8Str)] string path, byte* buffer);
}
