using System.Text;
using LoraMix.Modeling;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Training;

/// <summary>Tiny models with a byte-level tokenizer and small datasets and recipes for the recipe and train-CLI tests.</summary>
internal static class RecipeFixtures
{
    /// <summary>The `tiny` preset with the byte-level vocabulary, random weights, and the tokenizer files beside it.</summary>
    public static string TinyByteModel(string dir, long seed = 3)
    {
        var cfg = ModelPresets.Get("tiny") with
        {
            VocabSize = ByteLevelTokenizerFiles.VocabSize(), BosTokenId = null, EosTokenIds = [258], PadTokenId = 256,
        };
        using (var m = new LlamaForCausalLM(cfg))
        {
            ModelPresets.InitializeRandom(m, seed);
            m.SavePretrained(dir);
        }
        ByteLevelTokenizerFiles.Write(dir);
        return dir;
    }

    /// <summary>A chat JSONL file of <paramref name="count"/> short conversations (answer = the input reversed), with families.</summary>
    public static string ChatJsonl(string path, int count = 12, string? badLineAt3 = null)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < count; i++)
        {
            if (i == 2 && badLineAt3 is not null) { sb.Append(badLineAt3).Append('\n'); continue; }
            string input = $"ab{i % 10}c";
            string answer = new(input.Reverse().ToArray());
            string family = i % 2 == 0 ? "even" : "odd";
            sb.Append($$"""{"messages":[{"role":"system","content":"Reverse it."},{"role":"user","content":"{{input}}"},{"role":"assistant","content":"{{answer}}"}],"family":"{{family}}"}""").Append('\n');
        }
        File.WriteAllText(path, sb.ToString());
        return path;
    }

    /// <summary>A small LoRA recipe (YAML) on <paramref name="model"/> and <paramref name="dataset"/>.</summary>
    public static string LoraYaml(string path, string model, string dataset, string outputDir, string extra = "")
    {
        File.WriteAllText(path, $"""
            model: {model}
            dataset: {dataset}
            output_dir: {outputDir}
            cutoff_len: 64
            adapter:
              type: lora
              r: 4
              lora_alpha: 8
              target_modules: all-linear
            learning_rate: 5.0e-3
            max_steps: 3
            batch_size: 4
            logging_steps: 1
            lr_scheduler: constant
            seed: 7
            {extra}
            """);
        return path;
    }
}
