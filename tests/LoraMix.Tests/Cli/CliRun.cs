using LoraMix.Cli;

namespace LoraMix.Tests.Cli;

/// <summary>Runs the CLI in-process with captured output, as the CLI tests need it.</summary>
internal static class CliRun
{
    /// <summary>Exit code, stdout and stderr of <c>loramix ARGS</c>.</summary>
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = CliApp.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }
}
