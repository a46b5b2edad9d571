using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using LoraMix.Inference;
using LoraMix.Tokenization;
using LoraMix.Torch;

namespace LoraMix.Cli;

/// <summary>Verbs that work with text: generate, tokenize, render, chat.</summary>
internal static class TextCommands
{
    private static readonly JsonSerializerOptions Json = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>The sampling options shared by generate and chat.</summary>
    private sealed class SamplingOptions
    {
        public Option<int> MaxNew { get; } = new("--max-new-tokens") { Description = "Maximum tokens to generate (default 256); prompt plus output stop at the model's context.", DefaultValueFactory = _ => 256 };
        public Option<double> Temperature { get; } = new("--temperature") { Description = "Sampling temperature; 0 is greedy.", DefaultValueFactory = _ => 1.0 };
        public Option<int> TopK { get; } = new("--top-k") { Description = "Keep the K most likely tokens (0 = off).", DefaultValueFactory = _ => 0 };
        public Option<double> TopP { get; } = new("--top-p") { Description = "Nucleus sampling mass (1 = off).", DefaultValueFactory = _ => 1.0 };
        public Option<double> Repetition { get; } = new("--repetition-penalty") { Description = "Repetition penalty (1 = off).", DefaultValueFactory = _ => 1.0 };
        public Option<long?> Seed { get; } = new("--seed") { Description = "Random seed (same seed, same output)." };
        public Option<string?> Stop { get; } = new("--stop-ids") { Description = "Extra stop token ids, comma-separated." };
        public Option<bool> IgnoreEos { get; } = new("--ignore-eos") { Description = "Do not stop at EOS or end-of-turn tokens." };
        public Option<int?> NonGranular { get; } = new("--xlora-non-granular") { Description = "X-LoRA: freeze each sequence's scalings after this many decode steps and skip the scaling pass from then on (mistral.rs's tgt_non_granular_index)." };
        public AdapterOptions Adapters { get; } = new();
        public Option<double> MaxKvCacheGib { get; } = new("--max-kv-cache-gib") { Description = "Refuse a generation whose KV cache would exceed this many GiB (default 8).", DefaultValueFactory = _ => GenerationOptions.DefaultMaxKvCacheBytes / (double)(1L << 30) };
        public Option<string?> Template { get; } = new("--template") { Description = $"Chat template: {string.Join(", ", ChatTemplate.Names)} (default: from tokenizer_config.json)." };
        public Option<string> Device { get; } = ModelCommands.DeviceOption();
        public Option<string> DType { get; } = ModelCommands.DTypeOption("f32");
        public RoutingCommands.RouterPolicyOptions Router { get; } = new();

        public IEnumerable<Option> All => [MaxNew, Temperature, TopK, TopP, Repetition, Seed, Stop, IgnoreEos, NonGranular, MaxKvCacheGib, .. Adapters.All, Template, Device, DType, .. Router.All];

        public GenerationOptions Generation(ParseResult p)
        {
            double gib = p.GetValue(MaxKvCacheGib);
            if (!(gib > 0) || double.IsInfinity(gib)) throw new ArgumentException($"--max-kv-cache-gib must be > 0 and finite, got {gib}");
            const double bytesPerGib = 1L << 30;
            var o = new GenerationOptions
            {
                MaxNewTokens = p.GetValue(MaxNew),
                Temperature = p.GetValue(Temperature),
                TopK = p.GetValue(TopK),
                TopP = p.GetValue(TopP),
                RepetitionPenalty = p.GetValue(Repetition),
                Seed = p.GetValue(Seed),
                StopTokenIds = p.GetValue(Stop) is { } s ? ModelCommands.ParseIds(s, "--stop-ids") : [],
                StopAtEos = !p.GetValue(IgnoreEos),
                MaxKvCacheBytes = gib >= long.MaxValue / bytesPerGib ? long.MaxValue : Math.Max(1, (long)(gib * bytesPerGib)),
                XLoraNonGranular = p.GetValue(NonGranular),
            };
            o.Validate();
            return o;
        }

        /// <summary>Loads the engine with the adapters and the router policy the command line gives, and says on stderr
        /// which policy a MixLoRA adapter routes with.</summary>
        public ChatEngine LoadEngine(ParseResult p, string model) =>
            Router.LoadEngine(p, model, Adapters, p.GetValue(Device)!, p.GetValue(DType)!, p.GetValue(Template));
    }

    public static Command Generate()
    {
        var model = ModelCommands.ModelOption();
        var promptIds = new Option<string?>("--prompt-ids") { Description = "Prompt token ids, comma- or space-separated (e.g. \"1,2,3\")." };
        var prompt = new Option<string?>("--prompt") { Description = "Prompt text (special-token text is recognised; BOS added as the tokenizer's config says)." };
        var chat = new Option<string?>("--chat") { Description = "A JSON file: a list of {\"role\", \"content\"} (roles system, user, assistant, tool, data)." };
        var printIds = new Option<bool>("--print-ids") { Description = "Print the generated ids (not the prompt's) space-separated on one line." };
        var sampling = new SamplingOptions();
        var cmd = new Command("generate", "Generate from a model: from token ids, a text prompt or a chat file; text is streamed.")
        {
            model, promptIds, prompt, chat, printIds,
        };
        foreach (var o in sampling.All) cmd.Options.Add(o);
        cmd.Validators.Add(r =>
        {
            int given = new[] { r.GetValue(promptIds) is not null, r.GetValue(prompt) is not null, r.GetValue(chat) is not null }.Count(b => b);
            if (given != 1) r.AddError("give exactly one of --prompt-ids, --prompt or --chat");
        });
        cmd.SetAction(p =>
        {
            var options = sampling.Generation(p);
            // Parse the ids and read the chat file before loading the model, so bad input fails fast.
            int[]? given = p.GetValue(promptIds) is { } idText ? ModelCommands.ParseIds(idText, "--prompt-ids") : null;
            var messages = p.GetValue(chat) is { } chatFile ? ChatFile.Load(chatFile) : null;
            using var engine = sampling.LoadEngine(p, p.GetValue(model)!);
            // A chat keeps its privilege labels (MixLoRA routing under router_policy); raw prompts are plain ids.
            var rendered = given is null && messages is not null ? engine.RenderForGeneration(messages) : null;
            int[] ids = given ?? rendered?.Ids ?? engine.EncodePrompt(p.GetValue(prompt)!);
            NoteContextClamp(p.InvocationConfiguration.Error, engine, ids.Length, options.MaxNewTokens);
            EngineResult Run(Action<string>? onText) =>
                rendered is not null ? engine.Generate(rendered, options, onText) : engine.Generate(ids, options, onText);
            var output = p.InvocationConfiguration.Output;
            var error = p.InvocationConfiguration.Error;
            EngineResult result;
            if (p.GetValue(printIds))
            {
                result = Run(null);
                output.WriteLine(string.Join(' ', result.Ids));
                return 0;
            }
            if (engine.HasTokenizer)
            {
                result = Run(text => { output.Write(text); output.Flush(); });
                output.WriteLine();
            }
            else
            {
                // No tokenizer: stream ids as they are produced.
                result = Run(null);
                output.WriteLine(string.Join(' ', result.Ids));
            }
            error.WriteLine($"[{result.PromptTokens} prompt tokens, {result.Ids.Count} generated, finish: {result.FinishReason.ToString().ToLowerInvariant()}]");
            return 0;
        });
        return cmd;
    }

    public static Command Tokenize()
    {
        var dir = new Option<string>("--tokenizer", "-t") { Description = "Directory with tokenizer.json or tokenizer.model (and tokenizer_config.json).", Required = true };
        var text = new Option<string>("--text") { Description = "The text to encode.", Required = true };
        var plain = new Option<bool>("--plain") { Description = "Encode special-token text (e.g. <|eot_id|>) as plain text." };
        var addSpecial = new Option<bool>("--add-special") { Description = "Add BOS/EOS as the tokenizer's config says." };
        var cmd = new Command("tokenize", "Print the token ids of a text as a JSON array.") { dir, text, plain, addSpecial };
        cmd.SetAction(p =>
        {
            var tok = TextTokenizer.FromDirectory(p.GetValue(dir)!);
            bool parse = !p.GetValue(plain);
            var ids = p.GetValue(addSpecial) ? tok.EncodeWithSpecial(p.GetValue(text)!, parse) : tok.Encode(p.GetValue(text)!, parse);
            p.InvocationConfiguration.Output.WriteLine("[" + string.Join(",", ids.Select(i => i.ToString(CultureInfo.InvariantCulture))) + "]");
            return 0;
        });
        return cmd;
    }

    public static Command Render()
    {
        var model = new Option<string>("--model", "-m") { Description = "Model (or tokenizer) directory: tokenizer files and tokenizer_config.json.", Required = true };
        var chat = new Option<string>("--chat") { Description = "A JSON file: a list of {\"role\", \"content\"}.", Required = true };
        var template = new Option<string?>("--template") { Description = $"Chat template: {string.Join(", ", ChatTemplate.Names)} (default: from tokenizer_config.json)." };
        var noPrompt = new Option<bool>("--no-generation-prompt") { Description = "Do not append the assistant header at the end." };
        var labels = new Option<bool>("--labels") { Description = "Print one row per token: index, id, piece, privilege, loss." };
        var json = new Option<bool>("--json") { Description = "With --labels: a JSON array of {\"id\", \"piece\", \"privilege\", \"loss\"}." };
        var loss = new Option<string>("--loss") { Description = "Loss mask: all (every assistant turn), last (the last one) or none.", DefaultValueFactory = _ => "all" };
        var cmd = new Command("render", "Render a conversation with a chat template; with --labels show each token's privilege and loss mask.")
        {
            model, chat, template, noPrompt, labels, json, loss,
        };
        cmd.SetAction(p =>
        {
            var messages = ChatFile.Load(p.GetValue(chat)!);
            var tok = TextTokenizer.FromDirectory(p.GetValue(model)!);
            var renderer = new ChatRenderer(tok, p.GetValue(template) is { } t ? ChatTemplate.Parse(t) : null);
            var lossMode = p.GetValue(loss) switch
            {
                "all" => ChatLoss.AllAssistantTurns,
                "last" => ChatLoss.LastAssistantTurn,
                "none" => ChatLoss.None,
                var other => throw new ArgumentException($"--loss: '{other}' is not one of all, last, none"),
            };
            var r = renderer.Render(messages, new ChatRenderOptions { AddGenerationPrompt = !p.GetValue(noPrompt), Loss = lossMode });
            var o = p.InvocationConfiguration.Output;
            if (!p.GetValue(labels))
            {
                if (p.GetValue(json)) throw new ArgumentException("--json needs --labels");
                o.Write(r.Text);
                if (!r.Text.EndsWith('\n')) o.WriteLine();
                return 0;
            }
            if (p.GetValue(json))
            {
                var rows = Enumerable.Range(0, r.Ids.Length).Select(i => new Dictionary<string, object>
                {
                    ["id"] = r.Ids[i],
                    ["piece"] = tok.TokenPiece(r.Ids[i]),
                    ["privilege"] = PrivilegeName(r.Privileges[i]),
                    ["loss"] = r.LossMask[i],
                });
                o.WriteLine(JsonSerializer.Serialize(rows, Json));
                return 0;
            }
            o.WriteLine($"{"#",5}  {"id",7}  {"piece",-24}  {"privilege",-9}  loss");
            for (int i = 0; i < r.Ids.Length; i++)
                o.WriteLine($"{i,5}  {r.Ids[i],7}  {Visible(tok.TokenPiece(r.Ids[i])),-24}  {PrivilegeName(r.Privileges[i]),-9}  {(r.LossMask[i] ? "1" : "0")}");
            var counts = r.Privileges.GroupBy(x => x).OrderByDescending(g => g.Key).Select(g => $"{PrivilegeName(g.Key)} {g.Count()}");
            o.WriteLine($"{r.Ids.Length} tokens: {string.Join(", ", counts)}; loss on {r.LossMask.Count(b => b)}");
            return 0;
        });
        return cmd;
    }

    public static Command Chat(TextReader input)
    {
        var model = ModelCommands.ModelOption();
        var system = new Option<string?>("--system") { Description = "A system message that starts the conversation." };
        var sampling = new SamplingOptions();
        var cmd = new Command("chat", "Chat with a model interactively (/reset clears the conversation, /exit or end of input quits); when the context is full the oldest turns are dropped, the system message kept.") { model, system };
        foreach (var o in sampling.All) cmd.Options.Add(o);
        cmd.SetAction(p =>
        {
            var options = sampling.Generation(p);
            using var engine = sampling.LoadEngine(p, p.GetValue(model)!);
            _ = engine.Renderer; // fail before the first prompt when there is no template
            var o = p.InvocationConfiguration.Output;
            var e = p.InvocationConfiguration.Error;
            // Each reply gets --max-new-tokens, at most half the context, so that the conversation keeps the other half.
            int reserve = Math.Min(options.MaxNewTokens, engine.ContextLength / 2);
            if (reserve < options.MaxNewTokens)
                e.WriteLine($"note: --max-new-tokens {options.MaxNewTokens} is more than half the model's context of {engine.ContextLength} " +
                            $"tokens; each reply is capped at {reserve} tokens");
            var replyOptions = options with { MaxNewTokens = reserve };
            var history = new List<ChatMessage>();
            void Reset()
            {
                history.Clear();
                if (p.GetValue(system) is { } s) history.Add(ChatMessage.System(s));
            }
            Reset();
            e.WriteLine("chat: type a message and press Enter; /reset clears the conversation, /exit quits.");
            while (true)
            {
                e.Write("> ");
                e.Flush();
                string? line = input.ReadLine();
                if (line is null || line.Trim() == "/exit") break;
                if (line.Trim() == "/reset") { Reset(); e.WriteLine("(conversation cleared)"); continue; }
                if (line.Trim().Length == 0) continue;
                history.Add(ChatMessage.User(line));
                var rendered = FitConversation(engine, history, reserve, e);
                if (rendered is null)
                {
                    history.RemoveAt(history.Count - 1);
                    continue;
                }
                var result = engine.Generate(rendered, replyOptions, text => { o.Write(text); o.Flush(); });
                o.WriteLine();
                history.Add(ChatMessage.Assistant(result.Text));
                if (result.FinishReason == FinishReason.Length)
                    e.WriteLine(reserve == options.MaxNewTokens ? $"[stopped at --max-new-tokens {options.MaxNewTokens}]" : $"[stopped at the reply cap of {reserve} tokens]");
            }
            return 0;
        });
        return cmd;
    }

    /// <summary>Says on stderr, before generating, when the model's context will end the output before
    /// <paramref name="maxNewTokens"/> (a prompt that leaves no room at all is refused by the generator).</summary>
    private static void NoteContextClamp(TextWriter error, ChatEngine engine, int promptTokens, int maxNewTokens)
    {
        int context = engine.ContextLength;
        if (promptTokens >= context || (long)promptTokens + maxNewTokens <= context) return;
        error.WriteLine($"note: the prompt's {promptTokens} tokens + --max-new-tokens {maxNewTokens} exceed the model's context of " +
                        $"{context} tokens (max_position_embeddings); generation stops at the context end, after at most " +
                        $"{context - promptTokens} new tokens");
    }

    /// <summary>
    /// Fits the conversation (ending with the new user message) into the model's context with <paramref name="reserve"/>
    /// tokens left for the reply: drops the oldest turns (a user message and the reply to it) but never the system
    /// message, one line on <paramref name="error"/> per dropped turn. Returns the rendered conversation, or null (and
    /// says why) when even the system message and the new user message leave no room; the history is then unchanged.
    /// </summary>
    private static RenderedChat? FitConversation(ChatEngine engine, List<ChatMessage> history, int reserve, TextWriter error)
    {
        int context = engine.ContextLength;
        int room = context - Math.Max(reserve, 1);
        var rendered = engine.RenderForGeneration(history);
        if (rendered.Length <= room) return rendered;
        int head = history[0].Role == ChatRole.System ? 1 : 0;
        var minimal = history.Count - head == 1 ? rendered : engine.RenderForGeneration([.. history.Take(head), history[^1]]);
        if (minimal.Length > room)
        {
            string with = head == 1 ? "with the system message, " : "";
            error.WriteLine($"error: message not sent: {with}it renders to {minimal.Length} tokens, and with {reserve} tokens for the " +
                            $"reply that exceeds the model's context of {context} tokens; send a shorter message (or lower " +
                            "--max-new-tokens); the conversation is kept");
            return null;
        }
        while (rendered.Length > room)
        {
            int before = rendered.Length;
            int removed = 1;
            history.RemoveAt(head);
            if (history.Count - head > 1 && history[head].Role != ChatRole.User) { history.RemoveAt(head); removed++; }
            rendered = engine.RenderForGeneration(history);
            error.WriteLine($"[context full: dropped the oldest turn ({removed} message{(removed == 1 ? "" : "s")}, " +
                            $"{before - rendered.Length} tokens); the conversation is now {rendered.Length} of {context} tokens, " +
                            $"{reserve} kept for the reply]");
        }
        return rendered;
    }

    internal static string PrivilegeName(Privilege p) => p.ToString().ToLowerInvariant();

    /// <summary>A token piece with control characters made visible, for the label table.</summary>
    private static string Visible(string piece)
    {
        var sb = new StringBuilder(piece.Length);
        foreach (char c in piece)
            sb.Append(c switch { '\n' => "\\n", '\t' => "\\t", '\r' => "\\r", _ when char.IsControl(c) => $"\\u{(int)c:x4}", _ => c.ToString() });
        return sb.ToString();
    }
}
