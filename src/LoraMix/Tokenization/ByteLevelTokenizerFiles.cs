using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraMix.Tokenization;

/// <summary>
/// Writes a byte-level tokenizer in Hugging Face layout (<c>tokenizer.json</c> + <c>tokenizer_config.json</c>): the
/// 256 bytes as ids 0–255 (GPT-2's byte-to-character map), optional merges, and ChatML's special tokens
/// <c>&lt;|endoftext|&gt;</c>, <c>&lt;|im_start|&gt;</c>, <c>&lt;|im_end|&gt;</c> after them; the chat template is
/// plain ChatML. <c>models/loramix-tiny</c> uses it: every character is learnable by a small model, and Hugging Face
/// <c>PreTrainedTokenizerFast</c> loads the files as they are.
/// </summary>
public static class ByteLevelTokenizerFiles
{
    /// <summary>The special tokens, in id order after the bytes (and any merges).</summary>
    public static IReadOnlyList<string> SpecialTokens { get; } = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

    /// <summary>Plain ChatML (the template <see cref="ChatTemplate.Detect"/> maps to <c>chatml</c>).</summary>
    public const string ChatMLTemplate =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}" +
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// <summary>The split regex written into tokenizer.json (Qwen2's: digits one by one).</summary>
    public const string SplitPattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>The vocabulary size of the files written with <paramref name="mergeCount"/> merges.</summary>
    public static int VocabSize(int mergeCount = 0) => 256 + mergeCount + SpecialTokens.Count;

    /// <summary>
    /// Writes the two files into <paramref name="directory"/> (created if needed), atomically each. Merges are pairs of
    /// vocabulary strings (byte-level characters); each adds the concatenation as the next id.
    /// </summary>
    public static void Write(string directory, IReadOnlyList<(string Left, string Right)>? merges = null, int modelMaxLength = 512)
    {
        merges ??= [];
        Directory.CreateDirectory(directory);
        var vocab = new JsonObject();
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int b = 0; b < 256; b++)
        {
            string piece = ByteLevelMap.ByteToChar[b].ToString();
            ids[piece] = b;
        }
        foreach (var (l, r) in merges)
        {
            if (!ids.ContainsKey(l) || !ids.ContainsKey(r))
                throw new ArgumentException($"merge ('{l}', '{r}') uses a piece that is not in the vocabulary yet", nameof(merges));
            if (!ids.TryAdd(l + r, ids.Count))
                throw new ArgumentException($"merge ('{l}', '{r}') produces '{l + r}', which is already in the vocabulary", nameof(merges));
        }
        foreach (var (piece, id) in ids.OrderBy(kv => kv.Value)) vocab[piece] = id;

        var added = new JsonArray();
        var decoder = new JsonObject();
        for (int i = 0; i < SpecialTokens.Count; i++)
        {
            int id = ids.Count + i;
            added.Add(new JsonObject
            {
                ["id"] = id, ["content"] = SpecialTokens[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            });
            decoder[id.ToString(System.Globalization.CultureInfo.InvariantCulture)] = new JsonObject
            {
                ["content"] = SpecialTokens[i], ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false,
                ["single_word"] = false, ["special"] = true,
            };
        }
        JsonObject ByteLevel() => new() { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = false };
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray
                {
                    new JsonObject
                    {
                        ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = SplitPattern },
                        ["behavior"] = "Isolated", ["invert"] = false,
                    },
                    ByteLevel(),
                },
            },
            ["post_processor"] = ByteLevel(),
            ["decoder"] = ByteLevel(),
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = "",
                ["end_of_word_suffix"] = "", ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray([.. merges.Select(m => (JsonNode)new JsonArray(m.Left, m.Right))]),
            },
        };
        var config = new JsonObject
        {
            ["add_bos_token"] = false,
            ["add_eos_token"] = false,
            ["added_tokens_decoder"] = decoder,
            ["bos_token"] = null,
            ["chat_template"] = ChatMLTemplate,
            ["clean_up_tokenization_spaces"] = false,
            ["eos_token"] = "<|im_end|>",
            ["model_max_length"] = modelMaxLength,
            ["pad_token"] = "<|endoftext|>",
            ["tokenizer_class"] = "PreTrainedTokenizerFast",
            ["unk_token"] = null,
        };
        var options = new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        AtomicFile.WriteAllText(Path.Combine(directory, "tokenizer.json"), tokenizer.ToJsonString(options) + "\n");
        AtomicFile.WriteAllText(Path.Combine(directory, "tokenizer_config.json"), config.ToJsonString(options) + "\n");
    }
}
