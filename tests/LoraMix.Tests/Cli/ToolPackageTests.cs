using System.Diagnostics;
using System.IO.Compression;
using System.Text.Json.Nodes;
using LoraMix.Tests.Tokenization;
using LoraMix.Tests.Training;

namespace LoraMix.Tests.Cli;

/// <summary>The README's "Install as a .NET tool" path, run as a new user would: pack the CLI, install the package with
/// <c>dotnet tool install --tool-path</c>, and run the installed <c>loramix</c> from a directory outside the repository
/// (so the embedded model must come from the package, not from a checkout above the working directory).</summary>
public sealed class ToolPackageTests : IDisposable
{
    private readonly TempDir _dir = new();

    public ToolPackageTests() => Directory.CreateDirectory(_dir.Path);

    public void Dispose() => _dir.Dispose();

    private static (int Code, string Out, string Err) Exec(string file, string workDir, IDictionary<string, string>? env, TimeSpan timeout, params string[] args)
    {
        var psi = new ProcessStartInfo(file)
        {
            WorkingDirectory = workDir,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        if (env is not null)
            foreach (var (k, v) in env) psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish within {timeout}");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    [Fact]
    public void PackedToolInstallsAndRunsOutsideTheRepository()
    {
        string? root = TokenizerFixtures.RepoRoot();
        Assert.True(root is not null, "repository root not found above " + AppContext.BaseDirectory);
        string nupkg = _dir.Sub("nupkg"), tools = _dir.Sub("tools"), work = _dir.Sub("work");
        Directory.CreateDirectory(work);

        // the README's pack command, into a temporary folder
        var pack = Exec("dotnet", root!, null, TimeSpan.FromMinutes(8),
            "pack", Path.Combine(root!, "src", "LoraMix.Cli"), "-c", "Release", "-o", nupkg, "--nologo", "-v", "quiet");
        Assert.True(pack.Code == 0, "dotnet pack failed:\n" + pack.Out + pack.Err);
        string package = Assert.Single(Directory.GetFiles(nupkg, "LoraMix.Cli.*.nupkg"));

        // the embedded model is inside the package exactly once, next to the tool's entry point
        using (var zip = ZipFile.OpenRead(package))
        {
            string modelDir = Path.Combine(root!, "models", "loramix-tiny");
            var shipped = Directory.GetFiles(modelDir, "*.json").Concat(Directory.GetFiles(modelDir, "*.safetensors"))
                .Select(Path.GetFileName).ToArray();
            Assert.Contains("model.safetensors", shipped);
            foreach (var name in shipped)
            {
                var entries = zip.Entries.Where(e => e.FullName.EndsWith("/models/loramix-tiny/" + name, StringComparison.Ordinal)).ToArray();
                var entry = Assert.Single(entries);
                Assert.Equal("tools/net10.0/any/models/loramix-tiny/" + name, entry.FullName);
                Assert.Equal(new FileInfo(Path.Combine(modelDir, name!)).Length, entry.Length);
            }
            Assert.Contains(zip.Entries, e => e.FullName == "tools/net10.0/any/LoraMix.Cli.dll");
        }

        // install from that folder only; a private package cache, so an earlier install of the same version is never reused
        var env = new Dictionary<string, string> { ["NUGET_PACKAGES"] = _dir.Sub("nuget-cache") };
        var install = Exec("dotnet", work, env, TimeSpan.FromMinutes(5),
            "tool", "install", "--tool-path", tools, "LoraMix.Cli", "--add-source", nupkg);
        Assert.True(install.Code == 0, "dotnet tool install failed:\n" + install.Out + install.Err);
        string exe = Path.Combine(tools, OperatingSystem.IsWindows() ? "loramix.exe" : "loramix");
        Assert.True(File.Exists(exe), exe);

        // the root command introduces itself as loramix
        var help = Exec(exe, work, null, TimeSpan.FromMinutes(2), "--help");
        Assert.True(help.Code == 0, help.Out + help.Err);
        Assert.Contains("loramix [command] [options]", help.Out);
        Assert.DoesNotContain("LoraMix.Cli", help.Out);
        Assert.Contains("quickstart", help.Out);
        var verbHelp = Exec(exe, work, null, TimeSpan.FromMinutes(2), "quickstart", "--help");
        Assert.Contains("loramix quickstart [options]", verbHelp.Out);

        // a tiny LoRA quickstart from outside the repository: the model comes from the installed package
        string outDir = Path.Combine(work, "qs");
        var qs = Exec(exe, work, null, TimeSpan.FromMinutes(8),
            "quickstart", "--method", "lora", "--steps", "2", "--batch-size", "2", "--eval-examples", "2", "--out", outDir, "--json");
        Assert.True(qs.Code == 0, "installed quickstart failed:\n" + qs.Out + qs.Err);
        var summary = JsonNode.Parse(qs.Out.Trim())!.AsObject();
        string model = summary["model_dir"]!.GetValue<string>();
        Assert.StartsWith(Path.GetFullPath(tools), Path.GetFullPath(model));
        Assert.Equal(2, summary["steps"]!.GetValue<int>());
        Assert.True(File.Exists(Path.Combine(outDir, "adapter_config.json")));
        Assert.True(File.Exists(Path.Combine(outDir, "adapter_model.safetensors")));
    }
}
