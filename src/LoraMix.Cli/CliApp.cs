using System.CommandLine;
using System.CommandLine.Help;

namespace LoraMix.Cli;

/// <summary>The <c>loramix</c> command: thin verbs over the library.</summary>
public static class CliApp
{
    /// <summary>Exit code for bad input or a failed run.</summary>
    public const int ExitError = 1;
    /// <summary>Exit code for a command line that does not parse.</summary>
    public const int ExitUsage = 2;

    /// <summary>The name the tool is installed as and that usage and help text show, whatever the entry assembly is called
    /// (System.CommandLine's <see cref="RootCommand"/> takes the name of the executable, here <c>LoraMix.Cli</c>).</summary>
    public const string CommandName = "loramix";

    /// <summary>How to call the CLI again in a printed hint: <c>./loramix</c> inside a checkout (the script at the
    /// repository root), else <c>loramix</c> (the installed tool).</summary>
    public static string Invocation => File.Exists(Path.Combine(Directory.GetCurrentDirectory(), CommandName)) ? "./" + CommandName : CommandName;

    public static Command BuildRoot(TextReader? stdin = null)
    {
        var root = new Command(CommandName, "LoraMix: run, fine-tune and serve mixtures of LoRA experts on Llama-family models.")
        {
            Options = { new HelpOption(), new VersionOption() },
        };
        root.Subcommands.Add(TextCommands.Generate());
        root.Subcommands.Add(TextCommands.Chat(stdin ?? Console.In));
        root.Subcommands.Add(TextCommands.Tokenize());
        root.Subcommands.Add(TextCommands.Render());
        root.Subcommands.Add(ModelCommands.Inspect());
        root.Subcommands.Add(ModelCommands.InitModel());
        root.Subcommands.Add(ModelCommands.ImportLlama2c());
        root.Subcommands.Add(QuickstartCommand.Create());
        root.Subcommands.Add(TrainCommands.Train());
        root.Subcommands.Add(TrainCommands.Pretrain());
        root.Subcommands.Add(TrainCommands.Eval());
        root.Subcommands.Add(TrainCommands.Merge());
        root.Subcommands.Add(RoutingCommands.InspectRouting());
        root.Subcommands.Add(RoutingCommands.InspectScalings());
        root.Subcommands.Add(SecurityEvalCommand.Create());
        return root;
    }

    /// <summary>Parses and runs; returns the process exit code. Output goes to the given writers (default: console).</summary>
    public static int Run(string[] args, TextWriter? stdout = null, TextWriter? stderr = null, TextReader? stdin = null)
    {
        stdout ??= Console.Out;
        stderr ??= Console.Error;
        Torch.TorchRuntime.TuneNativeAllocator();
        Torch.TorchRuntime.ConfigureOpenMP();   // before libtorch loads: OpenMP threads sleep while they wait
        var root = BuildRoot(stdin);
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            foreach (var e in parsed.Errors) stderr.WriteLine($"error: {e.Message}");
            stderr.WriteLine("Run 'loramix --help' (or 'loramix <verb> --help') for usage.");
            return ExitUsage;
        }
        var config = new InvocationConfiguration { EnableDefaultExceptionHandler = false, Output = stdout, Error = stderr };
        try
        {
            return parsed.Invoke(config);
        }
        catch (Exception e) when (e is LoraMixException or ArgumentException or IOException or UnauthorizedAccessException
                                       or InvalidOperationException or OperationCanceledException)
        {
            stderr.WriteLine($"error: {e.Message}");
            return ExitError;
        }
    }
}
