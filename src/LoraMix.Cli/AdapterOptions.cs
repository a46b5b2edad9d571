using System.CommandLine;
using System.Text.RegularExpressions;
using LoraMix.Inference;
using LoraMix.Modeling;

namespace LoraMix.Cli;

/// <summary>
/// <c>--adapter</c> (repeatable: <c>PATH</c>, or <c>NAME=PATH</c> to load it under a name) and <c>--use</c> (what to
/// run: <c>NAME</c>, <c>base</c>, or a weighted composition <c>a:0.7,b:0.3</c>), shared by generate, chat and eval.
/// </summary>
internal sealed partial class AdapterOptions
{
    public Option<string[]> Adapter { get; } = new("--adapter")
    {
        Description = "Adapter directory to load (PEFT LoRA or MoE-PEFT MixLoRA); repeatable. NAME=PATH loads it under NAME. " +
                      "Several unnamed LoRA adapters are summed unless --use says otherwise.",
        AllowMultipleArgumentsPerToken = false,
    };

    public Option<string?> Use { get; } = new("--use")
    {
        Description = "What to run: an adapter NAME (default: the only one given), 'base', or a composition NAME:WEIGHT,NAME:WEIGHT " +
                      "(LoRA updates summed with those weights; at most one MixLoRA, at weight 1).",
    };

    public IEnumerable<Option> All => [Adapter, Use];

    [GeneratedRegex(@"^([A-Za-z0-9_\-]+)=(.+)$", RegexOptions.CultureInvariant)]
    private static partial Regex NamedForm();

    /// <summary>The engine options the command line gives: unnamed and named adapter directories and <c>--use</c>.</summary>
    /// <exception cref="LoraMixException">--use is malformed.</exception>
    public EngineOptions Apply(ParseResult p, EngineOptions options)
    {
        var unnamed = new List<string>();
        var named = new List<KeyValuePair<string, string>>();
        foreach (var value in p.GetValue(Adapter) ?? [])
        {
            // NAME=PATH, unless the whole value is itself an existing path (a directory whose name contains '=')
            if (NamedForm().Match(value) is { Success: true } m && !Path.Exists(value)) named.Add(new(m.Groups[1].Value, m.Groups[2].Value));
            else unnamed.Add(value);
        }
        AdapterChoice? use = null;
        if (p.GetValue(Use) is { } text)
        {
            try { use = AdapterChoice.Parse(text); }
            catch (FormatException e) { throw new LoraMixException($"--use {text}: {e.Message}"); }
        }
        return options with { Adapters = unnamed, NamedAdapters = named, Use = use };
    }
}
