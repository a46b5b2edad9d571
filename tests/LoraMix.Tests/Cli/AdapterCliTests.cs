using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Inference;
using LoraMix.Modeling;
using LoraMix.Tests.Adapters;
using LoraMix.Tests.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Cli;

/// <summary><c>--adapter NAME=PATH</c> (repeatable) and <c>--use</c> on generate and eval: each choice generates what an
/// engine running that choice generates, and bad choices fail with a message naming what is loaded.</summary>
public sealed class AdapterCliTests : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly string _model, _math, _code, _mix;

    public AdapterCliTests()
    {
        Directory.CreateDirectory(_dir.Path);
        _model = RecipeFixtures.TinyByteModel(_dir.Sub("base"));
        _math = _dir.Sub("math");
        _code = _dir.Sub("code");
        _mix = _dir.Sub("mix");
        using var scope = NewDisposeScope();
        using var m = LlamaForCausalLM.FromPretrained(_model);
        var math = new LoraConfig { R = 4, LoraAlpha = 8, AllLinear = true, TargetModules = null };
        var code = new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ["q_proj", "v_proj", "down_proj"] };
        LoraAdapters.Attach(m, math, "math", seed: 1);
        LoraAdapters.Attach(m, code, "code", seed: 2);
        using (no_grad())
            foreach (var (name, seed) in new[] { ("math", 5), ("code", 6) })
                foreach (var (key, t) in LoraAdapters.PeftStateDict(m, name))
                    if (key.Contains("lora_B", StringComparison.Ordinal)) t.copy_(randn(t.shape, generator: new TorchSharp.torch.Generator((ulong)seed)) * 0.3);
        LoraAdapters.Save(m, math, _math, "math");
        LoraAdapters.Save(m, code, _code, "code");
        var mix = MixLoraTestKit.Config() with { RouterPolicy = MixLoraConfig.FreePolicy };
        MixLoraAdapters.Attach(m, mix, "mix", seed: 3);
        MixLoraTestKit.Randomize(m, "mix", 7);
        MixLoraAdapters.Save(m, mix, _mix, "mix");
    }

    public void Dispose() => _dir.Dispose();

    private static readonly string[] Sampling = ["--prompt-ids", "60,61,62,257,10", "--max-new-tokens", "8", "--temperature", "0", "--print-ids", "--ignore-eos"];

    private string Generate(params string[] adapterArgs)
    {
        var r = CliRun.Run(["generate", "--model", _model, .. Sampling, .. adapterArgs]);
        Assert.True(r.Code == 0, r.Err + r.Out);
        return r.Out.Trim().Split('\n')[^1].Trim();
    }

    /// <summary>The independent path: an engine loading the same directories, running <paramref name="use"/>.</summary>
    private string Engine(string use, params (string Name, string Path)[] adapters)
    {
        using var engine = ChatEngine.Load(_model, new EngineOptions
        {
            NamedAdapters = [.. adapters.Select(a => new KeyValuePair<string, string>(a.Name, a.Path))], Use = AdapterChoice.Parse(use),
        });
        var ids = engine.Generate([60, 61, 62, 257, 10], new GenerationOptions { MaxNewTokens = 8, Temperature = 0, StopAtEos = false }).Ids;
        return string.Join(' ', ids);
    }

    [Fact]
    public void UseSelectsANamedAdapterACompositionOrTheBase()
    {
        string baseIds = Generate();
        string math = Generate("--adapter", _math);
        string code = Generate("--adapter", _code);
        Assert.NotEqual(baseIds, math);
        Assert.NotEqual(math, code);

        string[] both = ["--adapter", $"math={_math}", "--adapter", $"code={_code}"];
        Assert.Equal(math, Generate([.. both, "--use", "math"]));
        Assert.Equal(code, Generate([.. both, "--use", "code"]));
        Assert.Equal(baseIds, Generate([.. both, "--use", "base"]));
        // without --use several LoRA adapters are summed, as unnamed ones always were
        Assert.Equal(Generate("--adapter", _math, "--adapter", _code), Generate(both));
        Assert.Equal(Engine("math,code", ("math", _math), ("code", _code)), Generate(both));
        // a weighted composition generates what an engine running it generates
        string weighted = Generate([.. both, "--use", "math:0.5,code:-0.25"]);
        Assert.Equal(Engine("math:0.5,code:-0.25", ("math", _math), ("code", _code)), weighted);
        Assert.NotEqual(Generate(both), weighted);

        // a MixLoRA adapter beside a LoRA one: --use picks it, and it runs as when loaded alone
        Assert.Equal(Generate("--adapter", _mix), Generate("--adapter", $"mix={_mix}", "--adapter", $"math={_math}", "--use", "mix"));
    }

    [Fact]
    public void BadChoicesFailNamingWhatIsLoaded()
    {
        var unknown = CliRun.Run(["generate", "--model", _model, .. Sampling, "--adapter", $"math={_math}", "--use", "nope"]);
        Assert.NotEqual(0, unknown.Code);
        Assert.Contains("'nope'", unknown.Err);
        Assert.Contains("math", unknown.Err);

        var ambiguous = CliRun.Run(["generate", "--model", _model, .. Sampling, "--adapter", $"mix={_mix}", "--adapter", $"math={_math}"]);
        Assert.NotEqual(0, ambiguous.Code);
        Assert.Contains("--use", ambiguous.Err);

        var twice = CliRun.Run(["generate", "--model", _model, .. Sampling, "--adapter", $"a={_math}", "--adapter", $"a={_code}"]);
        Assert.NotEqual(0, twice.Code);
        Assert.Contains("'a'", twice.Err);

        var badWeight = CliRun.Run(["generate", "--model", _model, .. Sampling, "--adapter", $"math={_math}", "--use", "math:heavy"]);
        Assert.NotEqual(0, badWeight.Code);
        Assert.Contains("--use", badWeight.Err);

        var twoMixtures = CliRun.Run(["generate", "--model", _model, .. Sampling, "--adapter", $"m1={_mix}", "--adapter", $"m2={_mix}", "--use", "m1,m2"]);
        Assert.NotEqual(0, twoMixtures.Code);
        Assert.Contains("two MixLoRA", twoMixtures.Err);
    }

    [Fact]
    public void EvalTakesNamedAdaptersAndUse()
    {
        string data = RecipeFixtures.ChatJsonl(_dir.Sub("chat.jsonl"));
        var one = CliRun.Run(["eval", "--model", _model, "--dataset", data, "--no-exact-match", "--json", "--adapter", _code]);
        Assert.True(one.Code == 0, one.Err);
        var named = CliRun.Run(["eval", "--model", _model, "--dataset", data, "--no-exact-match", "--json",
            "--adapter", $"math={_math}", "--adapter", $"code={_code}", "--use", "code"]);
        Assert.True(named.Code == 0, named.Err);
        double Loss(string json) => System.Text.Json.Nodes.JsonNode.Parse(json)!["loss"]!.GetValue<double>();
        Assert.Equal(Loss(one.Out), Loss(named.Out), 9);
        var baseRun = CliRun.Run(["eval", "--model", _model, "--dataset", data, "--no-exact-match", "--json"]);
        Assert.NotEqual(Loss(baseRun.Out), Loss(named.Out), 6);
    }
}
