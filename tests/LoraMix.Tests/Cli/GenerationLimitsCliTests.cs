using LoraMix.Cli;
using LoraMix.Modeling;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Cli;

/// <summary>generate and chat against a model with a 64-token context: refusals, clamping, truncation, NaN weights.</summary>
public sealed class GenerationLimitsCliTests : IDisposable
{
    private const int Context = 64;
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-genlimits-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A tiny random model with the byte-level tokenizer (one token per ASCII character, ChatML template) and a
    /// 64-token context. With <paramref name="nanOutput"/>, one output-projection weight is NaN.</summary>
    private string Model(bool nanOutput = false)
    {
        string dir = Path.Combine(_dir, nanOutput ? "nan" : "ok");
        var cfg = ModelPresets.Get("tiny") with
        {
            VocabSize = ByteLevelTokenizerFiles.VocabSize(), BosTokenId = null, EosTokenIds = [258], PadTokenId = 256,
            MaxPositionEmbeddings = Context,
        };
        using (var m = new LlamaForCausalLM(cfg))
        {
            ModelPresets.InitializeRandom(m, 7);
            if (nanOutput)
                using (TorchSharp.torch.no_grad()) m.OutputWeight[65][0].fill_(double.NaN);
            m.SavePretrained(dir);
        }
        ByteLevelTokenizerFiles.Write(dir, modelMaxLength: Context);
        return dir;
    }

    private static (int Code, string Out, string Err) Run(string? stdin, params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = CliApp.Run(args, o, e, stdin is null ? null : new StringReader(stdin));
        return (code, o.ToString(), e.ToString());
    }

    private static string[] Lines(string text) => text.Split('\n', StringSplitOptions.RemoveEmptyEntries);

    /// <summary>stderr lines with the chat's "> " prompts taken off.</summary>
    private static string[] ChatLines(string text) => Lines(text.Replace("> ", "", StringComparison.Ordinal));

    [Fact]
    public void GenerateRefusesAPromptLongerThanTheContextAndClampsAHugeBudget()
    {
        string model = Model();
        var tooLong = Run(null, "generate", "--model", model, "--prompt", new string('a', 100), "--temperature", "0");
        Assert.Equal(CliApp.ExitError, tooLong.Code);
        Assert.Equal("", tooLong.Out);
        var error = Assert.Single(Lines(tooLong.Err));
        Assert.StartsWith("error: the prompt has 100 tokens", error);
        Assert.Contains($"context is {Context} tokens", error);

        var huge = Run(null, "generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "2000000000", "--temperature", "0",
            "--ignore-eos", "--print-ids");
        Assert.Equal(0, huge.Code);
        Assert.Equal(Context - 5, huge.Out.Trim().Split(' ').Length);
        var note = Assert.Single(Lines(huge.Err));
        Assert.Equal($"note: the prompt's 5 tokens + --max-new-tokens 2000000000 exceed the model's context of {Context} tokens " +
                     $"(max_position_embeddings); generation stops at the context end, after at most {Context - 5} new tokens", note);

        var text = Run(null, "generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "5000000", "--temperature", "0", "--ignore-eos");
        Assert.Equal(0, text.Code);
        Assert.EndsWith($"[5 prompt tokens, {Context - 5} generated, finish: length]", text.Err.Trim());

        var overLimit = Run(null, "generate", "--model", model, "--prompt", "hello", "--max-kv-cache-gib", "0.0000001");
        Assert.Equal(CliApp.ExitError, overLimit.Code);
        Assert.Contains("KV cache", overLimit.Err);
        Assert.Equal(CliApp.ExitError, Run(null, "generate", "--model", model, "--prompt", "hello", "--max-kv-cache-gib", "0").Code);
    }

    [Fact]
    public void ChatDropsTheOldestTurnsKeepsTheSystemMessageAndRefusesAMessageThatCannotFit()
    {
        string model = Model();
        string[] sampling = ["--max-new-tokens", "4", "--temperature", "0", "--ignore-eos"];
        // ChatML, one token per character: system "S" is 11 tokens, a user message of n characters n + 8, the generation
        // prompt 11, a reply of r tokens at least r + 13. Room for the prompt: 64 - 4 = 60 tokens.
        string final = new('q', 25);   // 11 + 33 + 11 = 55: fits only without any earlier turn
        string input = $"hello there\nhello again\n{new string('x', 100)}\n{final}\n";
        var r = Run(input, ["chat", "--model", model, "--system", "S", .. sampling]);
        Assert.Equal(0, r.Code);

        // Turn 2 (73 + reply tokens) drops turn 1; the 100-character message is refused and the session goes on; the
        // last message drops turn 2: two drops, each of a user message and its reply, and the system message stays.
        var drops = ChatLines(r.Err).Where(l => l.StartsWith("[context full: dropped the oldest turn", StringComparison.Ordinal)).ToList();
        Assert.Equal(2, drops.Count);
        Assert.All(drops, d => Assert.Contains("(2 messages,", d));
        Assert.All(drops, d => Assert.Contains($"of {Context} tokens, 4 kept for the reply]", d));
        var refused = Assert.Single(ChatLines(r.Err), l => l.StartsWith("error: message not sent", StringComparison.Ordinal));
        Assert.Contains("with the system message, it renders to 130 tokens", refused);
        Assert.Contains($"context of {Context} tokens", refused);
        Assert.Equal(3, ChatLines(r.Err).Count(l => l.StartsWith("[stopped at --max-new-tokens 4]", StringComparison.Ordinal)));

        // The last reply is the reply to [system, last message]: the system message was kept, every older turn dropped.
        string chat = Path.Combine(_dir, "last.json");
        File.WriteAllText(chat, $$"""[{"role": "system", "content": "S"}, {"role": "user", "content": "{{final}}"}]""");
        var direct = Run(null, ["generate", "--model", model, "--chat", chat, .. sampling]);
        Assert.Equal(0, direct.Code);
        Assert.EndsWith(direct.Out, r.Out);
        string noSystem = Path.Combine(_dir, "nosystem.json");
        File.WriteAllText(noSystem, $$"""[{"role": "user", "content": "{{final}}"}]""");
        Assert.NotEqual(direct.Out, Run(null, ["generate", "--model", model, "--chat", noSystem, .. sampling]).Out);
    }

    [Fact]
    public void ChatCapsAReplyBudgetOverHalfTheContext()
    {
        string model = Model();
        var r = Run("hi\n", "chat", "--model", model, "--max-new-tokens", "1000", "--temperature", "0", "--ignore-eos");
        Assert.Equal(0, r.Code);
        Assert.Contains($"note: --max-new-tokens 1000 is more than half the model's context of {Context} tokens; each reply is capped at {Context / 2} tokens", r.Err);
        Assert.Contains($"[stopped at the reply cap of {Context / 2} tokens]", r.Err);
    }

    [Fact]
    public void NaNWeightsEndGenerateWithExitCodeOneAndAMessageSayingWhereToLook()
    {
        string model = Model(nanOutput: true);
        foreach (string temperature in new[] { "0", "1" })
        {
            var r = Run(null, "generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "8", "--temperature", temperature, "--seed", "1");
            Assert.Equal(CliApp.ExitError, r.Code);
            var line = Assert.Single(Lines(r.Err));
            Assert.StartsWith("error: the model produced non-finite logits (NaN or infinity) on the prompt (prefill)", line);
            Assert.Contains("adapter weights", line);
        }
    }
}
