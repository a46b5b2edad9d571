using LoraMix.Cli;
using LoraMix.Modeling;

namespace LoraMix.Tests.Cli;

public sealed class CliTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loramix-cli-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private static (int Code, string Out, string Err) Run(params string[] args) => CliRun.Run(args);

    [Fact]
    public void InitModelInspectAndGenerate()
    {
        string model = Path.Combine(_dir, "tiny");
        var init = Run("init-model", "--preset", "tiny", "--out", model, "--seed", "3");
        Assert.Equal(0, init.Code);
        Assert.True(File.Exists(Path.Combine(model, "config.json")));
        Assert.True(File.Exists(Path.Combine(model, "model.safetensors")));

        var inspect = Run("inspect", "--model", model);
        Assert.Equal(0, inspect.Code);
        Assert.Contains($"{ModelPresets.Get("tiny").ParameterCount():N0}", inspect.Out);
        Assert.Contains("llama", inspect.Out);

        var a = Run("generate", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--temperature", "0", "--print-ids", "--ignore-eos");
        Assert.Equal(0, a.Code);
        var ids = a.Out.Trim().Split(' ');
        Assert.Equal(12, ids.Length);
        Assert.All(ids, s => Assert.InRange(int.Parse(s, System.Globalization.CultureInfo.InvariantCulture), 0, 511));

        // init-model is a pure function of (preset, seed): a second model with the same seed generates the same ids
        string again = Path.Combine(_dir, "tiny2");
        Assert.Equal(0, Run("init-model", "--preset", "tiny", "--out", again, "--seed", "3").Code);
        var b = Run("generate", "--model", again, "--prompt-ids", "1 2 3", "--max-new-tokens", "12", "--temperature", "0", "--print-ids", "--ignore-eos");
        Assert.Equal(a.Out, b.Out);

        var sampled1 = Run("generate", "--model", model, "--prompt-ids", "1", "--max-new-tokens", "16", "--seed", "9", "--top-p", "0.9", "--print-ids", "--ignore-eos");
        var sampled2 = Run("generate", "--model", model, "--prompt-ids", "1", "--max-new-tokens", "16", "--seed", "9", "--top-p", "0.9", "--print-ids", "--ignore-eos");
        Assert.Equal(sampled1.Out, sampled2.Out);
    }

    [Fact]
    public void BadInputIsOneLineOnStderrWithExitCode1()
    {
        var missing = Run("generate", "--model", Path.Combine(_dir, "nope"), "--prompt-ids", "1");
        Assert.Equal(CliApp.ExitError, missing.Code);
        Assert.StartsWith("error: ", missing.Err);
        Assert.Single(missing.Err.Trim().Split('\n'));

        var badIds = Run("generate", "--model", _dir, "--prompt-ids", "1,x");
        Assert.Equal(CliApp.ExitError, badIds.Code);
        Assert.Contains("'x'", badIds.Err);

        var preset = Run("init-model", "--preset", "nonexistent", "--out", _dir);
        Assert.Equal(CliApp.ExitError, preset.Code);
        Assert.Contains("available: ", preset.Err);

        var device = Run("generate", "--model", _dir, "--prompt-ids", "1", "--device", "tpu");
        Assert.Equal(CliApp.ExitError, device.Code);
    }

    [Fact]
    public void UsageErrorsExitWith2()
    {
        Assert.Equal(CliApp.ExitUsage, Run("generate", "--prompt-ids", "1").Code);      // missing --model
        Assert.Equal(CliApp.ExitUsage, Run("no-such-verb").Code);
        Assert.Equal(CliApp.ExitUsage, Run("generate", "--model", "m", "--prompt-ids", "1", "--top-k", "lots").Code);
    }

    [Theory]
    [InlineData("generate")]
    [InlineData("inspect")]
    [InlineData("init-model")]
    [InlineData("import-llama2c")]
    [InlineData("quickstart")]
    [InlineData("inspect-routing")]
    public void EveryVerbHasHelp(string verb)
    {
        var r = Run(verb, "--help");
        Assert.Equal(0, r.Code);
        Assert.Contains("Usage:", r.Out);
    }
}
