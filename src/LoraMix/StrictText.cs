using System.Buffers;
using System.Text;
using System.Text.Json;

namespace LoraMix;

/// <summary>
/// Strict text checks shared by the readers of user files (datasets, chat files, configurations): bytes must be valid
/// UTF-8 (never silently replaced by U+FFFD) and JSON strings must not decode to an unpaired UTF-16 surrogate (which no
/// tokenizer can encode). Each check reports where the problem is, so the caller can name the file and the line.
/// </summary>
internal static class StrictText
{
    /// <summary>A UTF-8 encoding that throws on invalid bytes (decoding) and on unpaired surrogates (encoding).</summary>
    public static readonly UTF8Encoding Utf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The byte offset of the first invalid UTF-8 sequence in <paramref name="bytes"/>, or -1 when it is valid.</summary>
    public static int FindInvalidUtf8(ReadOnlySpan<byte> bytes)
    {
        if (System.Text.Unicode.Utf8.IsValid(bytes)) return -1;
        int i = 0;
        while (i < bytes.Length)
        {
            if (Rune.DecodeFromUtf8(bytes[i..], out _, out int consumed) != OperationStatus.Done) return i;
            i += consumed;
        }
        return -1;
    }

    /// <summary>The index of the first unpaired UTF-16 surrogate in <paramref name="text"/>, or -1.</summary>
    public static int FindUnpairedSurrogate(string text)
    {
        for (int i = 0; i < text.Length; i++)
        {
            if (!char.IsSurrogate(text[i])) continue;
            if (char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1])) { i++; continue; }
            return i;
        }
        return -1;
    }

    /// <summary>
    /// The byte offset (in <paramref name="json"/>) of the first string or property name whose <c>\u</c> escapes decode to
    /// an unpaired UTF-16 surrogate (e.g. <c>"\ud800"</c>), or -1. Only escaped strings are decoded; the bytes must
    /// already be valid UTF-8 and valid JSON (a syntax error ends the scan, returning -1).
    /// </summary>
    public static long FindUnpairedSurrogateEscape(ReadOnlySpan<byte> json, JsonReaderOptions options)
    {
        var reader = new Utf8JsonReader(json, options);
        try
        {
            while (reader.Read())
            {
                if (reader.TokenType is not (JsonTokenType.String or JsonTokenType.PropertyName) || !reader.ValueIsEscaped) continue;
                try
                {
                    reader.GetString();
                }
                catch (InvalidOperationException)
                {
                    return reader.TokenStartIndex;
                }
            }
        }
        catch (JsonException)
        {
            // The caller parses the same bytes and reports syntax errors itself.
        }
        return -1;
    }

    /// <summary>The 1-based line of byte <paramref name="offset"/> in <paramref name="bytes"/>.</summary>
    public static int LineAt(ReadOnlySpan<byte> bytes, long offset)
    {
        int end = (int)Math.Clamp(offset, 0, bytes.Length);
        return 1 + bytes[..end].Count((byte)'\n');
    }

    /// <summary>The 1-based column (in bytes) of byte <paramref name="offset"/> within its line.</summary>
    public static int ColumnAt(ReadOnlySpan<byte> bytes, long offset)
    {
        int end = (int)Math.Clamp(offset, 0, bytes.Length);
        int lineStart = bytes[..end].LastIndexOf((byte)'\n') + 1;
        return end - lineStart + 1;
    }

    /// <summary>"invalid UTF-8 (byte 0xFF at column 7)" for the bad byte at <paramref name="offset"/>, with what to do.</summary>
    public static string InvalidUtf8Message(ReadOnlySpan<byte> bytes, int offset) =>
        $"invalid UTF-8 (byte 0x{bytes[offset]:X2} at column {ColumnAt(bytes, offset)}); the file must be UTF-8 text: re-encode it (e.g. iconv -t UTF-8)";

    /// <summary>The message for a JSON string that decodes to an unpaired surrogate.</summary>
    public const string UnpairedSurrogateMessage =
        "a string holds an unpaired UTF-16 surrogate escape (e.g. \"\\ud800\" without its low half), which is not text and cannot be tokenized; fix or remove it";

    /// <summary>
    /// Reads a file line by line as raw bytes: lines end at <c>\n</c>, a trailing <c>\r</c> and a leading UTF-8 byte-order
    /// mark are dropped. A line longer than <paramref name="maxLineBytes"/> is not buffered: it comes back with null bytes
    /// (the caller reports it), so no line can exhaust memory.
    /// </summary>
    public static IEnumerable<(int Line, byte[]? Bytes)> ReadLines(string path, int maxLineBytes)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
        var buffer = new byte[1 << 16];
        var line = new ArrayBufferWriter<byte>();
        bool tooLong = false;
        int number = 0;

        void Append(int start, int count)
        {
            if (count == 0 || tooLong) return;
            if (line.WrittenCount + (long)count > maxLineBytes) tooLong = true;
            else line.Write(buffer.AsSpan(start, count));
        }

        (int, byte[]?) Emit()
        {
            if (number == int.MaxValue) throw new InvalidDataException($"more than {int.MaxValue} lines");
            number++;
            byte[]? bytes = null;
            if (!tooLong)
            {
                var span = line.WrittenSpan;
                if (number == 1 && span.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) span = span[3..];
                if (span.Length > 0 && span[^1] == (byte)'\r') span = span[..^1];
                bytes = span.ToArray();
            }
            line.ResetWrittenCount();
            tooLong = false;
            return (number, bytes);
        }

        while (true)
        {
            int n = stream.Read(buffer, 0, buffer.Length);
            if (n == 0)
            {
                if (line.WrittenCount > 0 || tooLong) yield return Emit();
                yield break;
            }
            int start = 0;
            while (start < n)
            {
                int newline = Array.IndexOf(buffer, (byte)'\n', start, n - start);
                Append(start, (newline < 0 ? n : newline) - start);
                if (newline < 0) break;
                yield return Emit();
                start = newline + 1;
            }
        }
    }
}
