namespace LoraMix.Modeling;

/// <summary>
/// The embedded base model <c>models/loramix-tiny</c>: a ~3 M-parameter Llama pre-trained by LoraMix on part of the task
/// world (examples/pretrain-tiny.yaml). The CLI ships it beside its assembly; a checkout has it at the repository root.
/// </summary>
public static class EmbeddedModel
{
    /// <summary>The directory name under <c>models/</c>.</summary>
    public const string Name = "loramix-tiny";

    /// <summary>Finds the model: <c>models/loramix-tiny</c> in the current directory or one of its parents (a checkout),
    /// else beside the application (the CLI and its tool package ship a copy). Throws <see cref="LoraMixException"/> (saying where it looked and how to rebuild it) when absent.</summary>
    public static string Locate()
    {
        var candidates = new List<string>();
        for (var d = new DirectoryInfo(Directory.GetCurrentDirectory()); d is not null; d = d.Parent)
            candidates.Add(Path.Combine(d.FullName, "models", Name));
        candidates.Add(Path.Combine(AppContext.BaseDirectory, "models", Name));
        return candidates.FirstOrDefault(c => File.Exists(Path.Combine(c, "config.json")) && File.Exists(Path.Combine(c, "model.safetensors")))
               ?? throw new LoraMixException($"the embedded model models/{Name} was not found beside the application " +
                                             $"({AppContext.BaseDirectory}) or above the current directory; pass a model directory, or rebuild it with " +
                                             "'./loramix pretrain --config examples/pretrain-tiny.yaml'");
    }
}
