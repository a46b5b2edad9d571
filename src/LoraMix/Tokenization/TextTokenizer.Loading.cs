using System.Globalization;
using System.Text.Json;

namespace LoraMix.Tokenization;

public sealed partial class TextTokenizer
{
    private const string Supported =
        "supported: BPE tokenizer.json files that are byte-level (Llama-3, Qwen2/3: Split regex + ByteLevel) or " +
        "SentencePiece-style (Llama-2, Mistral: ▁ metaspace, byte_fallback), and SentencePiece BPE tokenizer.model files";

    /// <summary>
    /// Largest number of token ids a tokenizer may define (4,194,304 = 2^22; the largest released vocabularies have about
    /// 262,000). Every id — in <c>model.vocab</c>, <c>added_tokens</c> or <c>added_tokens_decoder</c> — must also be below
    /// the number of tokens the files define (vocabulary entries plus added tokens), since the tokenizer's tables are sized
    /// by the largest id: a single added token with id 10^9 would otherwise cost gigabytes.
    /// </summary>
    public const int MaxVocabSize = 1 << 22;

    /// <summary>Everything the constructor needs, filled by the loaders.</summary>
    private sealed class Definition
    {
        public required string Directory;
        public TokenizerKind Kind;
        public Dictionary<string, int> Vocab = new(StringComparer.Ordinal);
        public MergeTable Merges = new(0);
        public List<AddedToken> Added = new();
        public SplitPreTokenizer? Split;
        public bool Nfc;
        public bool IgnoreMerges;
        public PrependMode Prepend;
        public bool SplitOnMetaspace;
        public bool ByteFallback;
        public bool FuseUnk;
        public bool RemoveExtraWhitespaces;
        public string? BosToken, EosToken, PadToken, UnkToken;
        public bool AddBos, AddEos;
        public string? ChatTemplate;
    }

    /// <summary>
    /// Loads the tokenizer in <paramref name="directory"/>: tokenizer.json when present, else tokenizer.model, plus
    /// tokenizer_config.json when present (BOS/EOS/PAD tokens, add_bos_token/add_eos_token, added_tokens_decoder,
    /// chat_template).
    /// </summary>
    /// <exception cref="TokenizerFileException">The directory or files are missing, malformed or unsupported.</exception>
    public static TextTokenizer FromDirectory(string directory)
    {
        ArgumentNullException.ThrowIfNull(directory);
        string dir = Path.GetFullPath(directory);
        if (!System.IO.Directory.Exists(dir))
            throw new TokenizerFileException(dir, null, "the tokenizer directory does not exist");
        string json = Path.Combine(dir, "tokenizer.json");
        string model = Path.Combine(dir, "tokenizer.model");
        string config = Path.Combine(dir, "tokenizer_config.json");

        var d = new Definition { Directory = dir };
        bool? postProcessorBos = null, postProcessorEos = null;
        bool? configBos = null, configEos = null;
        // Path.Exists, not File.Exists: a directory, FIFO or device under a tokenizer file's name is refused, naming it.
        bool hasJson = Path.Exists(json);
        if (hasJson) Guard(json, () => LoadTokenizerJson(json, d, out postProcessorBos, out postProcessorEos));
        else if (Path.Exists(model)) Guard(model, () => LoadSentencePieceModel(model, d));
        else
            throw new TokenizerFileException(dir, null,
                "no tokenizer.json or tokenizer.model in the directory (" + Supported + ")");

        if (Path.Exists(config)) Guard(config, () => LoadConfig(config, d, out configBos, out configEos));

        // add_bos_token: tokenizer_config.json, else the tokenizer.json post-processor, else SentencePiece's
        // LlamaTokenizer default (true) for a bare tokenizer.model.
        d.AddBos = configBos ?? postProcessorBos ?? (d.Kind == TokenizerKind.SentencePiece && !hasJson);
        d.AddEos = configEos ?? postProcessorEos ?? false;
        return new TextTokenizer(d);
    }

    // ------------------------------------------------------------------ tokenizer.json

    /// <summary>Runs a loader, turning what a mistyped JSON value makes System.Text.Json throw (a number read as a string,
    /// a lone surrogate escape) into a <see cref="TokenizerFileException"/> naming the file.</summary>
    private delegate void Loader();

    private static void Guard(string path, Loader load)
    {
        try
        {
            load();
        }
        catch (InvalidOperationException e)
        {
            throw new TokenizerFileException(path, null, $"a JSON value has an unexpected type or is not valid Unicode: {e.Message}", e);
        }
        catch (FormatException e)
        {
            throw new TokenizerFileException(path, null, $"a JSON value is malformed: {e.Message}", e);
        }
    }

    /// <summary>Reads a JSON file: a regular file of bounded size, without duplicate keys at any depth.</summary>
    private static JsonDocument ParseJson(string path, long maxBytes)
    {
        try
        {
            byte[] bytes = InputFiles.ReadAllBytes(path, maxBytes, reason => new TokenizerFileException(path, null, reason));
            var reader = new JsonReaderOptions { AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip, MaxDepth = InputFiles.MaxJsonDepth };
            InputFiles.ValidateJson(bytes, reader,
                key => new TokenizerFileException(path, key, "appears twice; a key may be given once (which one counts is ambiguous)"));
            return JsonDocument.Parse(bytes, new JsonDocumentOptions
            {
                AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip, MaxDepth = InputFiles.MaxJsonDepth,
            });
        }
        catch (JsonException e)
        {
            throw new TokenizerFileException(path, null,
                $"malformed JSON at line {e.LineNumber + 1}, byte {e.BytePositionInLine + 1}: {e.Message}", e);
        }
        catch (IOException e)
        {
            throw new TokenizerFileException(path, null, $"cannot read the file: {e.Message}", e);
        }
    }

    private static void LoadTokenizerJson(string path, Definition d, out bool? addBos, out bool? addEos)
    {
        using JsonDocument doc = ParseJson(path, InputFiles.MaxTokenizerFileBytes);
        JsonElement root = doc.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
            throw new TokenizerFileException(path, null, $"expected a JSON object at the top level, found {root.ValueKind}");
        if (!root.TryGetProperty("model", out JsonElement model) || model.ValueKind != JsonValueKind.Object)
            throw new TokenizerFileException(path, "model", "expected an object describing the tokenizer model; " + Supported);

        string type = model.TryGetProperty("type", out JsonElement t) && t.ValueKind == JsonValueKind.String
            ? t.GetString()!
            : model.TryGetProperty("merges", out _) ? "BPE" : "(none)";
        if (type != "BPE")
            throw new TokenizerFileException(path, "model.type", $"model type '{type}' is not supported ({Supported})");

        foreach (string key in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
            if (model.TryGetProperty(key, out JsonElement v) && v.ValueKind == JsonValueKind.String && v.GetString()!.Length > 0)
                throw new TokenizerFileException(path, $"model.{key}", $"a non-empty {key} is not supported ({Supported})");
        if (model.TryGetProperty("dropout", out JsonElement dropout) && dropout.ValueKind == JsonValueKind.Number && dropout.GetDouble() > 0)
            throw new TokenizerFileException(path, "model.dropout", "BPE dropout is not supported for inference tokenization");

        // Vocabulary
        if (!model.TryGetProperty("vocab", out JsonElement vocab) || vocab.ValueKind != JsonValueKind.Object)
            throw new TokenizerFileException(path, "model.vocab", "expected an object mapping token strings to ids");
        foreach (JsonProperty p in vocab.EnumerateObject())
        {
            if (p.Value.ValueKind != JsonValueKind.Number || !p.Value.TryGetInt32(out int id) || id < 0)
                throw new TokenizerFileException(path, "model.vocab", $"the id of '{p.Name}' is not a non-negative integer");
            d.Vocab[p.Name] = id;
        }

        // Merges: "a b" strings or ["a", "b"] pairs; the rank is the position in the list.
        if (!model.TryGetProperty("merges", out JsonElement merges) || merges.ValueKind != JsonValueKind.Array)
            throw new TokenizerFileException(path, "model.merges", "expected an array of merges");
        d.Merges = new MergeTable(merges.GetArrayLength());
        int rank = 0;
        foreach (JsonElement m in merges.EnumerateArray())
        {
            string left, right;
            if (m.ValueKind == JsonValueKind.String)
            {
                string s = m.GetString()!;
                int sp = s.Length < 2 ? -1 : s.IndexOf(' ', 1);   // "" and one-character strings have no "left right" split
                if (sp < 0)
                    throw new TokenizerFileException(path, "model.merges", $"merge #{rank} '{s}' is not of the form \"left right\"");
                left = s[..sp];
                right = s[(sp + 1)..];
            }
            else if (m.ValueKind == JsonValueKind.Array && m.GetArrayLength() == 2
                     && m[0].ValueKind == JsonValueKind.String && m[1].ValueKind == JsonValueKind.String)
            {
                left = m[0].GetString()!;
                right = m[1].GetString()!;
            }
            else
                throw new TokenizerFileException(path, "model.merges", $"merge #{rank} is neither a \"left right\" string nor a pair");
            if (!d.Vocab.TryGetValue(left, out int l) || !d.Vocab.TryGetValue(right, out int r))
                throw new TokenizerFileException(path, "model.merges", $"merge #{rank} ('{left}' '{right}') uses a token missing from model.vocab");
            if (!d.Vocab.TryGetValue(left + right, out int merged))
                throw new TokenizerFileException(path, "model.merges", $"merge #{rank} makes '{left + right}', which is missing from model.vocab");
            d.Merges.TryAdd(l, r, rank, merged);
            rank++;
        }

        d.ByteFallback = Bool(model, "byte_fallback") ?? false;
        d.IgnoreMerges = Bool(model, "ignore_merges") ?? false;
        d.FuseUnk = Bool(model, "fuse_unk") ?? false;
        if (model.TryGetProperty("unk_token", out JsonElement unk) && unk.ValueKind == JsonValueKind.String)
            d.UnkToken = unk.GetString();

        // Added tokens
        if (root.TryGetProperty("added_tokens", out JsonElement added) && added.ValueKind == JsonValueKind.Array)
        {
            int i = 0;
            foreach (JsonElement a in added.EnumerateArray())
                d.Added.Add(ReadAddedToken(path, $"added_tokens[{i++}]", a, null));
        }
        else if (root.TryGetProperty("added_tokens", out added) && added.ValueKind != JsonValueKind.Null)
            throw new TokenizerFileException(path, "added_tokens", $"expected an array of added tokens, found {added.ValueKind}");

        // Every id must be below the number of tokens the file defines (and the cap) before any table is sized by ids.
        long defined = (long)d.Vocab.Count + d.Added.Count;
        if (defined > MaxVocabSize)
            throw new TokenizerFileException(path, "model.vocab",
                $"the file defines {defined} tokens (model.vocab and added_tokens), more than the {MaxVocabSize}-token limit");
        foreach (var (piece, id) in d.Vocab)
            if (id >= defined)
                throw new TokenizerFileException(path, "model.vocab",
                    $"the id of '{InputFiles.Shorten(piece)}' is {id}, but the file defines {defined} tokens (model.vocab entries plus added_tokens), so ids must be < {defined}");
        for (int i = 0; i < d.Added.Count; i++)
            if (d.Added[i].Id >= defined)
                throw new TokenizerFileException(path, $"added_tokens[{i}].id",
                    $"expected an id < {defined} (the number of tokens the file defines: model.vocab entries plus added_tokens), got {d.Added[i].Id}");

        // Normalizer / pre-tokenizer decide the kind.
        var normalizers = Flatten(root, "normalizer", "normalizers");
        var preTokenizers = Flatten(root, "pre_tokenizer", "pretokenizers");
        JsonElement? split = preTokenizers.FirstOrDefault(e => TypeOf(e) == "Split") is { ValueKind: JsonValueKind.Object } sp2 ? sp2 : null;
        bool byteLevel = preTokenizers.Any(e => TypeOf(e) == "ByteLevel");
        bool metaspacePre = preTokenizers.Any(e => TypeOf(e) == "Metaspace");
        bool metaspaceNorm = normalizers.Any(e => TypeOf(e) == "Replace" && Str(e, "content") == "\u2581");

        if (byteLevel)
        {
            d.Kind = TokenizerKind.ByteLevelBpe;
            foreach (JsonElement n in normalizers)
            {
                string nt = TypeOf(n);
                if (nt == "NFC") d.Nfc = true;
                else throw new TokenizerFileException(path, "normalizer", $"normalizer '{nt}' is not supported for byte-level BPE (supported: none, NFC)");
            }
            foreach (JsonElement p in preTokenizers)
            {
                string pt = TypeOf(p);
                if (pt == "ByteLevel")
                {
                    if (Bool(p, "use_regex") == true)
                        throw new TokenizerFileException(path, "pre_tokenizer", "ByteLevel with use_regex=true (the GPT-2 split) is not supported; " + Supported);
                    if (Bool(p, "add_prefix_space") == true)
                        throw new TokenizerFileException(path, "pre_tokenizer", "ByteLevel with add_prefix_space=true is not supported");
                }
                else if (pt != "Split")
                    throw new TokenizerFileException(path, "pre_tokenizer", $"pre-tokenizer '{pt}' is not supported with ByteLevel (supported: Split + ByteLevel)");
            }
            if (split is not JsonElement s)
                throw new TokenizerFileException(path, "pre_tokenizer", "a byte-level tokenizer needs a Split pre-tokenizer with a regex; none found");
            string behavior = Str(s, "behavior") ?? "";
            if (behavior != "Isolated" || Bool(s, "invert") == true)
                throw new TokenizerFileException(path, "pre_tokenizer.Split", $"only behavior 'Isolated' without invert is supported, found '{behavior}'");
            string? pattern = s.TryGetProperty("pattern", out JsonElement pat) && pat.ValueKind == JsonValueKind.Object ? Str(pat, "Regex") : null;
            if (pattern is null)
                throw new TokenizerFileException(path, "pre_tokenizer.Split.pattern", "expected {\"Regex\": ...}");
            d.Split = SplitPreTokenizer.TryCreate(pattern)
                ?? throw new TokenizerFileException(path, "pre_tokenizer.Split.pattern",
                    $"unsupported split regex '{pattern}' (supported: the Llama-3 / Qwen2 pattern family)");
            foreach (int b in Enumerable.Range(0, 256))
                if (!d.Vocab.ContainsKey(ByteLevelMap.ByteToChar[b].ToString()))
                    throw new TokenizerFileException(path, "model.vocab", $"the byte-level vocabulary lacks the symbol for byte 0x{b:X2}");
        }
        else if (metaspaceNorm || metaspacePre)
        {
            d.Kind = TokenizerKind.SentencePiece;
            foreach (JsonElement n in normalizers)
            {
                string nt = TypeOf(n);
                if (nt == "Prepend" && Str(n, "prepend") == "\u2581") d.Prepend = PrependMode.Always;
                else if (nt == "Replace" && Str(n, "content") == "\u2581"
                    && n.TryGetProperty("pattern", out JsonElement rp) && Str(rp, "String") == " ") { }
                else throw new TokenizerFileException(path, "normalizer", $"normalizer '{nt}' is not supported for SentencePiece-style BPE (supported: Prepend ▁, Replace ' ' → ▁)");
            }
            foreach (JsonElement p in preTokenizers)
            {
                string pt = TypeOf(p);
                if (pt != "Metaspace")
                    throw new TokenizerFileException(path, "pre_tokenizer", $"pre-tokenizer '{pt}' is not supported for SentencePiece-style BPE (supported: none, Metaspace)");
                if ((Str(p, "replacement") ?? "\u2581") != "\u2581")
                    throw new TokenizerFileException(path, "pre_tokenizer.Metaspace.replacement", "only '▁' is supported");
                string scheme = Str(p, "prepend_scheme") ?? (Bool(p, "add_prefix_space") == false ? "never" : "always");
                d.Prepend = scheme switch
                {
                    "always" => PrependMode.UnlessSpace,
                    "first" => PrependMode.First,
                    "never" => PrependMode.None,
                    _ => throw new TokenizerFileException(path, "pre_tokenizer.Metaspace.prepend_scheme", $"unknown prepend scheme '{scheme}' (always, first, never)"),
                };
                d.SplitOnMetaspace = Bool(p, "split") ?? true;
            }
            if (!metaspacePre && !metaspaceNorm)
                throw new TokenizerFileException(path, "normalizer", "expected a Replace ' ' → '▁' normalizer");
        }
        else
            throw new TokenizerFileException(path, "pre_tokenizer",
                "cannot tell the tokenizer style: no ByteLevel pre-tokenizer and no ▁ metaspace normalizer/pre-tokenizer; " + Supported);

        // BOS/EOS from a TemplateProcessing post-processor.
        addBos = addEos = null;
        foreach (JsonElement pp in Flatten(root, "post_processor", "processors"))
        {
            if (TypeOf(pp) != "TemplateProcessing" || !pp.TryGetProperty("single", out JsonElement single)
                || single.ValueKind != JsonValueKind.Array) continue;
            var items = single.EnumerateArray().ToList();
            string? first = items.Count > 0 ? SpecialIn(items[0]) : null;
            string? last = items.Count > 1 ? SpecialIn(items[^1]) : null;
            addBos = first is not null;
            addEos = last is not null;
            if (first is not null) d.BosToken ??= first;
            if (last is not null) d.EosToken ??= last;
        }
    }

    private static string? SpecialIn(JsonElement item) =>
        item.ValueKind == JsonValueKind.Object && item.TryGetProperty("SpecialToken", out JsonElement st) ? Str(st, "id") : null;

    /// <summary>The element at <paramref name="key"/>, expanded when it is a Sequence (its <paramref name="listKey"/>).</summary>
    private static List<JsonElement> Flatten(JsonElement root, string key, string listKey)
    {
        var list = new List<JsonElement>();
        if (!root.TryGetProperty(key, out JsonElement e) || e.ValueKind != JsonValueKind.Object) return list;
        void Add(JsonElement x)
        {
            if (TypeOf(x) == "Sequence" && x.TryGetProperty(listKey, out JsonElement items) && items.ValueKind == JsonValueKind.Array)
                foreach (JsonElement i in items.EnumerateArray()) Add(i);
            else list.Add(x);
        }
        Add(e);
        return list;
    }

    private static string TypeOf(JsonElement e) => Str(e, "type") ?? "";

    private static string? Str(JsonElement e, string key) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(key, out JsonElement v) && v.ValueKind == JsonValueKind.String
            ? v.GetString()
            : null;

    private static bool? Bool(JsonElement e, string key) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(key, out JsonElement v)
            ? v.ValueKind switch { JsonValueKind.True => true, JsonValueKind.False => false, _ => null }
            : null;

    private static AddedToken ReadAddedToken(string path, string key, JsonElement a, int? id)
    {
        if (a.ValueKind != JsonValueKind.Object)
            throw new TokenizerFileException(path, key, $"expected an object per added token, found {a.ValueKind}");
        string content = Str(a, "content") ?? throw new TokenizerFileException(path, key, "an added token has no 'content' string");
        if (id is null)
        {
            if (!a.TryGetProperty("id", out JsonElement idEl) || idEl.ValueKind != JsonValueKind.Number
                || !idEl.TryGetInt64(out long parsed) || parsed < 0 || parsed >= MaxVocabSize)
                throw new TokenizerFileException(path, key + ".id",
                    $"added token '{InputFiles.Shorten(content)}': expected an integer id in [0, {MaxVocabSize}), got " +
                    (a.TryGetProperty("id", out JsonElement got) ? InputFiles.Shorten(got.GetRawText()) : "none"));
            id = (int)parsed;
        }
        return new AddedToken(content, id.Value, Bool(a, "special") ?? false, Bool(a, "lstrip") ?? false,
            Bool(a, "rstrip") ?? false, Bool(a, "single_word") ?? false);
    }

    // ------------------------------------------------------------------ tokenizer.model

    private static void LoadSentencePieceModel(string path, Definition d)
    {
        SentencePieceModelFile m = SentencePieceModelFile.Read(path);
        if (m.ModelType != 2)
        {
            string name = m.ModelType switch { 1 => "Unigram", 3 => "Word", 4 => "Char", _ => $"type {m.ModelType}" };
            throw new TokenizerFileException(path, "trainer_spec.model_type", $"SentencePiece model type {name} is not supported ({Supported})");
        }
        if (m.NormalizerName != "identity" && m.HasPrecompiledCharsMap)
            throw new TokenizerFileException(path, "normalizer_spec.name",
                $"SentencePiece normalizer '{m.NormalizerName}' (a precompiled character map) is not supported; only 'identity'");
        if (!m.EscapeWhitespaces || m.TreatWhitespaceAsSuffix)
            throw new TokenizerFileException(path, "normalizer_spec", "only escape_whitespaces=true without treat_whitespace_as_suffix is supported");

        d.Kind = TokenizerKind.SentencePiece;
        d.ByteFallback = m.ByteFallback;
        d.FuseUnk = true;
        d.Prepend = m.AddDummyPrefix ? PrependMode.Always : PrependMode.None;
        d.RemoveExtraWhitespaces = m.RemoveExtraWhitespaces;
        var scores = new float[m.Pieces.Count];
        var mergeable = new bool[m.Pieces.Count];
        for (int id = 0; id < m.Pieces.Count; id++)
        {
            var p = m.Pieces[id];
            d.Vocab.TryAdd(p.Text, id);
            scores[id] = p.Score;
            mergeable[id] = p.Type is SentencePieceModelFile.PieceType.Normal or SentencePieceModelFile.PieceType.UserDefined;
            if (p.Type is SentencePieceModelFile.PieceType.Control or SentencePieceModelFile.PieceType.Unknown)
                d.Added.Add(new AddedToken(p.Text, id, Special: true));
            else if (p.Type == SentencePieceModelFile.PieceType.UserDefined)
                d.Added.Add(new AddedToken(p.Text, id, Special: false));
        }

        // SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece (leftmost on
        // ties). Rank the pieces by descending score and list every split of each piece into two pieces.
        int[] order = Enumerable.Range(0, scores.Length).Where(i => mergeable[i])
            .OrderByDescending(i => scores[i]).ThenBy(i => i).ToArray();
        var rankOf = new int[scores.Length];
        int rank = -1;
        float prev = float.NaN;
        foreach (int id in order)
        {
            if (scores[id] != prev) { rank++; prev = scores[id]; }
            rankOf[id] = rank;
        }
        d.Merges = new MergeTable(order.Length * 4);
        var lookup = d.Vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        foreach (int id in order)
        {
            string piece = m.Pieces[id].Text;
            for (int k = 1; k < piece.Length; k++)
            {
                if (char.IsLowSurrogate(piece[k])) continue;
                if (lookup.TryGetValue(piece.AsSpan(0, k), out int l) && lookup.TryGetValue(piece.AsSpan(k), out int r))
                    d.Merges.TryAdd(l, r, rankOf[id], id);
            }
        }

        if (m.UnkId >= 0 && m.UnkId < m.Pieces.Count) d.UnkToken = m.Pieces[m.UnkId].Text;
        if (m.BosId >= 0 && m.BosId < m.Pieces.Count) d.BosToken = m.Pieces[m.BosId].Text;
        if (m.EosId >= 0 && m.EosId < m.Pieces.Count) d.EosToken = m.Pieces[m.EosId].Text;
        if (m.PadId >= 0 && m.PadId < m.Pieces.Count) d.PadToken = m.Pieces[m.PadId].Text;
    }

    // ------------------------------------------------------------------ tokenizer_config.json

    private static void LoadConfig(string path, Definition d, out bool? addBos, out bool? addEos)
    {
        using JsonDocument doc = ParseJson(path, InputFiles.MaxConfigJsonBytes);
        JsonElement root = doc.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
            throw new TokenizerFileException(path, null, $"expected a JSON object at the top level, found {root.ValueKind}");
        addBos = Bool(root, "add_bos_token");
        addEos = Bool(root, "add_eos_token");

        if (root.TryGetProperty("added_tokens_decoder", out JsonElement dec) && dec.ValueKind == JsonValueKind.Object)
        {
            // Ids must be below the number of tokens the files define (tokenizer file plus these entries) and the cap.
            long defined = (long)d.Vocab.Count + d.Added.Count + dec.EnumerateObject().Count();
            foreach (JsonProperty p in dec.EnumerateObject())
            {
                if (!int.TryParse(p.Name, NumberStyles.None, CultureInfo.InvariantCulture, out int id))
                    throw new TokenizerFileException(path, $"added_tokens_decoder.{InputFiles.Shorten(p.Name)}", "keys must be non-negative integer ids");
                if (id >= defined || id >= MaxVocabSize)
                    throw new TokenizerFileException(path, $"added_tokens_decoder.{p.Name}",
                        $"expected an id < {Math.Min(defined, MaxVocabSize)} (the number of tokens the tokenizer files define, at most {MaxVocabSize}), got {id}");
                AddedToken t = ReadAddedToken(path, $"added_tokens_decoder.{p.Name}", p.Value, id);
                int existing = d.Added.FindIndex(a => a.Id == id);
                if (existing >= 0)
                {
                    if (d.Added[existing].Content != t.Content)
                        throw new TokenizerFileException(path, $"added_tokens_decoder.{p.Name}",
                            $"id {id} is '{t.Content}' here but '{d.Added[existing].Content}' in the tokenizer file");
                    d.Added[existing] = t;
                }
                else d.Added.Add(t);
            }
        }

        d.BosToken = TokenString(path, root, "bos_token") ?? (root.TryGetProperty("bos_token", out _) ? null : d.BosToken);
        d.EosToken = TokenString(path, root, "eos_token") ?? (root.TryGetProperty("eos_token", out _) ? null : d.EosToken);
        d.PadToken = TokenString(path, root, "pad_token") ?? (root.TryGetProperty("pad_token", out _) ? null : d.PadToken);
        d.UnkToken = TokenString(path, root, "unk_token") ?? (root.TryGetProperty("unk_token", out _) ? null : d.UnkToken);

        if (root.TryGetProperty("chat_template", out JsonElement ct))
        {
            if (ct.ValueKind == JsonValueKind.String) d.ChatTemplate = ct.GetString();
            else if (ct.ValueKind == JsonValueKind.Array)
            {
                foreach (JsonElement e in ct.EnumerateArray())
                    if (Str(e, "name") == "default") d.ChatTemplate = Str(e, "template");
            }
            else if (ct.ValueKind != JsonValueKind.Null)
                throw new TokenizerFileException(path, "chat_template", $"expected a string or a list of {{name, template}}, found {ct.ValueKind}");
        }
    }

    /// <summary>A special-token setting: a string, an object with "content", or null.</summary>
    private static string? TokenString(string path, JsonElement root, string key)
    {
        if (!root.TryGetProperty(key, out JsonElement v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.String => v.GetString(),
            JsonValueKind.Null => null,
            JsonValueKind.Object => Str(v, "content")
                ?? throw new TokenizerFileException(path, key, "expected a string or an object with a 'content' string"),
            _ => throw new TokenizerFileException(path, key, $"expected a string, an object with 'content' or null, found {v.ValueKind}"),
        };
    }
}
