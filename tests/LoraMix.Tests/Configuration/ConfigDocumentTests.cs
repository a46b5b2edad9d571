using LoraMix.Configuration;

namespace LoraMix.Tests.Configuration;

public sealed class ConfigDocumentTests
{
    private const string Yaml = """
        model: models/loramix-tiny
        dataset: data/train.jsonl
        cutoff_len: 256
        learning_rate: 2.0e-4
        adapter:
          type: lora
          r: 8
          lora_alpha: 16
          target_modules: [q_proj, v_proj]
        bf16: false
        """;

    [Fact]
    public void ReadsTypedValuesAndNestedKeys()
    {
        var d = ConfigDocument.Parse(Yaml, "train.yaml");
        Assert.Equal("models/loramix-tiny", d.RequiredString("model"));
        Assert.Equal(256, d.Int("cutoff_len", 0));
        Assert.Equal(2e-4, d.Double("learning_rate", 0));
        Assert.Equal(8, d.Int("adapter.r"));
        Assert.Equal(["q_proj", "v_proj"], d.StringList("adapter.target_modules"));
        Assert.False(d.Bool("bf16", true));
        Assert.Equal(7, d.Int("missing", 7));
    }

    [Fact]
    public void JsonIsAccepted()
    {
        var d = ConfigDocument.Parse("""{"model": "m", "adapter": {"r": 4, "target_modules": "all-linear"}}""", "c.json");
        Assert.Equal(4, d.Int("adapter.r"));
        Assert.Equal(["all-linear"], d.StringList("adapter.target_modules"));
    }

    [Fact]
    public void OverridesReplaceAndCreateKeys()
    {
        var d = ConfigDocument.Parse(Yaml, "train.yaml");
        d.Set("adapter.r=32");
        d.Set("max_steps=100");
        d.Set("adapter.target_modules=[gate_proj, up_proj]");
        d.Set("output_dir=out/run 1");
        Assert.Equal(32, d.Int("adapter.r"));
        Assert.Equal(100, d.Int("max_steps"));
        Assert.Equal(["gate_proj", "up_proj"], d.StringList("adapter.target_modules"));
        Assert.Equal("out/run 1", d.String("output_dir"));
        Assert.Throws<ConfigFileException>(() => d.Set("no-equals-sign"));
    }

    [Fact]
    public void UnknownAndMistypedKeysAreNamed()
    {
        var d = ConfigDocument.Parse(Yaml + "\nlearnig_rate: 1\n", "train.yaml");
        d.RequiredString("model");
        var e = Assert.Throws<ConfigFileException>(() => d.RejectUnknownKeys(["model", "dataset", "cutoff_len", "learning_rate", "adapter.type", "adapter.r", "adapter.lora_alpha", "adapter.target_modules", "bf16"]));
        Assert.Equal("learnig_rate", e.Key);
        Assert.Contains("supported:", e.Message);

        var bad = ConfigDocument.Parse("cutoff_len: lots\nr: 1.5\n", "x.yaml");
        Assert.Contains("expected a number", Assert.Throws<ConfigFileException>(() => bad.Int("cutoff_len")).Message);
        Assert.Contains("expected an integer", Assert.Throws<ConfigFileException>(() => bad.Int("r")).Message);
        Assert.Throws<ConfigFileException>(() => ConfigDocument.Parse("a: [1, 2\n", "broken.yaml"));
        Assert.Throws<ConfigFileException>(() => ConfigDocument.Parse("a: 1\na: 2\n", "dup.yaml"));
        Assert.Throws<ConfigFileException>(() => ConfigDocument.Parse("- 1\n- 2\n", "list.yaml"));
    }
}
