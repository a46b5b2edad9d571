namespace LoraMix.Tokenization;

/// <summary>The tokenizer-side files of a Hugging Face model directory, copied alongside weights written elsewhere
/// (merged checkpoints, fully fine-tuned models) so the result is a complete model directory.</summary>
public static class TokenizerFiles
{
    /// <summary>The file names copied by <see cref="CopyTo"/>, when present.</summary>
    public static IReadOnlyList<string> Names { get; } =
        ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

    /// <summary>Copies every present file of <see cref="Names"/> from <paramref name="source"/> into
    /// <paramref name="destination"/> (overwriting); returns the names copied.</summary>
    public static IReadOnlyList<string> CopyTo(string source, string destination)
    {
        Directory.CreateDirectory(destination);
        var copied = new List<string>();
        foreach (var name in Names)
        {
            string from = Path.Combine(source, name);
            if (!File.Exists(from)) continue;
            if (Path.GetFullPath(from) != Path.GetFullPath(Path.Combine(destination, name)))
                File.Copy(from, Path.Combine(destination, name), overwrite: true);
            copied.Add(name);
        }
        return copied;
    }
}
