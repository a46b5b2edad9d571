namespace LoraMix;

/// <summary>Base class of every error LoraMix raises for bad input (files, configs, arguments).</summary>
/// <remarks>Messages name the file, the key and what was expected versus found, and say what to do.</remarks>
public class LoraMixException : Exception
{
    public LoraMixException(string message) : base(message) { }
    public LoraMixException(string message, Exception? inner) : base(message, inner) { }
}

/// <summary>A checkpoint or adapter file is malformed or does not match the model.</summary>
public class CheckpointFormatException : LoraMixException
{
    public CheckpointFormatException(string file, string? tensor, string message, Exception? inner = null)
        : base(Compose(file, tensor, message), inner)
    {
        FilePath = file;
        TensorName = tensor;
    }

    /// <summary>The offending file.</summary>
    public string FilePath { get; }

    /// <summary>The offending tensor, when the problem is tied to one.</summary>
    public string? TensorName { get; }

    private static string Compose(string file, string? tensor, string message) =>
        tensor is null ? $"{file}: {message}" : $"{file}: tensor '{tensor}': {message}";
}

/// <summary>
/// A training checkpoint cannot be resumed: one of its files is missing, malformed, of the wrong type or shape, or disagrees
/// with the checkpoint's other files or with the run being resumed. Raised before the file's content is used.
/// </summary>
public sealed class CheckpointResumeException : LoraMixException
{
    public CheckpointResumeException(string file, string? key, string message, Exception? inner = null)
        : base((key is null ? $"{file}: {message}" : $"{file}: '{key}': {message}") +
               "; resume from another checkpoint, or start the run again without resume_from_checkpoint", inner)
    {
        FilePath = file;
        Key = key;
    }

    /// <summary>The offending file (or the checkpoint directory when a file is missing).</summary>
    public string FilePath { get; }

    /// <summary>The offending JSON key, metadata key or tensor, when the problem is tied to one.</summary>
    public string? Key { get; }
}

/// <summary>A safetensors file is malformed (header, dtype, offsets, sizes).</summary>
public sealed class SafetensorsFormatException : CheckpointFormatException
{
    public SafetensorsFormatException(string file, string? tensor, string message, Exception? inner = null)
        : base(file, tensor, message, inner) { }
}

/// <summary>A model configuration (config.json or a LoraMix config) is invalid or unsupported.</summary>
public sealed class ModelConfigException : LoraMixException
{
    public ModelConfigException(string file, string key, string message)
        : base($"{file}: '{key}': {message}")
    {
        FilePath = file;
        Key = key;
    }

    public string FilePath { get; }
    public string Key { get; }
}

/// <summary>A state dict does not match the model: missing, unexpected or mis-shaped keys.</summary>
public sealed class StateDictMismatchException : LoraMixException
{
    public StateDictMismatchException(string source, IReadOnlyList<string> missing, IReadOnlyList<string> unexpected,
        IReadOnlyList<string> misshaped)
        : base(Compose(source, missing, unexpected, misshaped))
    {
        Missing = missing;
        Unexpected = unexpected;
        Misshaped = misshaped;
    }

    public IReadOnlyList<string> Missing { get; }
    public IReadOnlyList<string> Unexpected { get; }
    public IReadOnlyList<string> Misshaped { get; }

    private static string Compose(string source, IReadOnlyList<string> missing, IReadOnlyList<string> unexpected,
        IReadOnlyList<string> misshaped)
    {
        var parts = new List<string>();
        if (missing.Count > 0) parts.Add($"missing keys ({missing.Count}): {string.Join(", ", missing.Take(20))}{(missing.Count > 20 ? ", ..." : "")}");
        if (unexpected.Count > 0) parts.Add($"unexpected keys ({unexpected.Count}): {string.Join(", ", unexpected.Take(20))}{(unexpected.Count > 20 ? ", ..." : "")}");
        if (misshaped.Count > 0) parts.Add($"mis-shaped keys ({misshaped.Count}): {string.Join("; ", misshaped.Take(20))}{(misshaped.Count > 20 ? "; ..." : "")}");
        return $"{source}: the checkpoint does not match the model: {string.Join("; ", parts)}.";
    }
}

/// <summary>
/// A tokenizer file (tokenizer.json, tokenizer.model, tokenizer_config.json) or tokenizer directory is missing,
/// malformed or uses a feature LoraMix does not support.
/// </summary>
public sealed class TokenizerFileException : LoraMixException
{
    public TokenizerFileException(string file, string? key, string message, Exception? inner = null)
        : base(key is null ? $"{file}: {message}" : $"{file}: '{key}': {message}", inner)
    {
        FilePath = file;
        Key = key;
    }

    /// <summary>The offending file (or directory).</summary>
    public string FilePath { get; }

    /// <summary>The offending JSON key or field, when the problem is tied to one.</summary>
    public string? Key { get; }
}

/// <summary>An adapter configuration (<c>adapter_config.json</c> or a built config record) is invalid or unsupported.</summary>
public sealed class AdapterConfigException : LoraMixException
{
    public AdapterConfigException(string source, string key, string reason)
        : base($"{source}: '{key}': {reason}")
    {
        ConfigSource = source;
        Key = key;
        Reason = reason;
    }

    /// <summary>The file (or "adapter config" for an in-memory config).</summary>
    public string ConfigSource { get; }

    /// <summary>The offending key (or combination, e.g. <c>top_k</c> with <c>num_experts</c>).</summary>
    public string Key { get; }

    /// <summary>Why it was rejected, and what is accepted.</summary>
    public string Reason { get; }
}

/// <summary>
/// A prompt does not fit the model's context (<c>max_position_embeddings</c>): it is refused before any forward pass.
/// </summary>
public sealed class ContextLengthException : LoraMixException
{
    public ContextLengthException(int promptTokens, int contextLength, string message)
        : base(message)
    {
        PromptTokens = promptTokens;
        ContextLength = contextLength;
    }

    /// <summary>The prompt's length in tokens.</summary>
    public int PromptTokens { get; }

    /// <summary>The model's context in tokens (<c>max_position_embeddings</c>).</summary>
    public int ContextLength { get; }
}

/// <summary>A generation's KV cache would need more memory than the stated limit: refused before it is allocated.</summary>
public sealed class KvCacheLimitException : LoraMixException
{
    public KvCacheLimitException(long requiredBytes, long limitBytes, string message)
        : base(message)
    {
        RequiredBytes = requiredBytes;
        LimitBytes = limitBytes;
    }

    /// <summary>The estimated size of the cache.</summary>
    public long RequiredBytes { get; }

    /// <summary>The limit it exceeds.</summary>
    public long LimitBytes { get; }
}

/// <summary>
/// The model produced NaN or infinite logits at run time (broken model or adapter weights, or overflow in a 16-bit
/// dtype): generation stops instead of sampling garbage.
/// </summary>
public sealed class NonFiniteLogitsException : LoraMixException
{
    public NonFiniteLogitsException(int step, int row, string message)
        : base(message)
    {
        Step = step;
        Row = row;
    }

    /// <summary>The decoding step (0 = the prefill of the prompt).</summary>
    public int Step { get; }

    /// <summary>The prompt (batch row) whose logits are not finite.</summary>
    public int Row { get; }
}
