using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Modeling;
using LoraMix.Routing;
using LoraMix.Tokenization;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Inference;

/// <summary>How <see cref="ChatEngine.Load"/> builds an engine.</summary>
public sealed record EngineOptions
{
    /// <summary>Device to run on (default CPU).</summary>
    public Device? Device { get; init; }

    /// <summary>Compute dtype (default: float32).</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;

    /// <summary>Adapter directories to load, in order, unnamed: one is named <c>default</c>, several
    /// <c>adapter0</c>, <c>adapter1</c>, ... (PEFT LoRA or MoE-PEFT MixLoRA, detected from adapter_config.json). Unless
    /// <see cref="Use"/> says otherwise the engine runs the only adapter loaded, or several LoRA adapters summed.</summary>
    public IReadOnlyList<string> Adapters { get; init; } = [];

    /// <summary>Adapter directories to load under the given names (after <see cref="Adapters"/>).</summary>
    public IReadOnlyList<KeyValuePair<string, string>> NamedAdapters { get; init; } = [];

    /// <summary>What every call runs unless it gives its own (<see cref="GenerationOptions.Adapters"/>): null runs the
    /// only adapter loaded (several LoRA adapters: their sum; none: the base model).</summary>
    public AdapterChoice? Use { get; init; }

    /// <summary>Chat template family (llama3, llama2, mistral, chatml, plain); null detects it from tokenizer_config.json.</summary>
    public string? Template { get; init; }

    /// <summary>Tokenizer directory; null uses the model directory.</summary>
    public string? TokenizerDirectory { get; init; }

    /// <summary>Route MixLoRA adapters with this policy instead of their configured <c>router_policy</c> (null: each
    /// adapter's). Every call of the engine uses it: generation, chats, batches, tracing. Requires a MixLoRA adapter.</summary>
    public IRouterPolicy? RouterPolicy { get; init; }
}

/// <summary>Where <see cref="ChatEngine.RouterPolicy"/> came from.</summary>
public enum RouterPolicySource
{
    /// <summary>No adapter with a router is loaded.</summary>
    None,
    /// <summary><see cref="EngineOptions.RouterPolicy"/>.</summary>
    Override,
    /// <summary>The adapter's <c>router_policy</c> key.</summary>
    AdapterConfig,
    /// <summary>The adapter's config has no <c>router_policy</c> (a MoE-PEFT adapter): MixLoRA's free routing.</summary>
    Default,
}

/// <summary>The result of one generation: text, ids (without the prompt and the stop token) and why it ended.</summary>
public sealed record EngineResult(string Text, IReadOnlyList<int> Ids, FinishReason FinishReason, int PromptTokens);

/// <summary>
/// The engine: one model, its tokenizer and chat template, and a single model thread. The CLI, the server and
/// IChatClient all generate through it. Calls are serialised (the model is not re-entrant).
/// </summary>
public sealed class ChatEngine : IDisposable
{
    private readonly SemaphoreSlim _modelThread = new(1, 1);
    private readonly TextTokenizer? _tokenizer;
    private readonly ChatRenderer? _renderer;
    private readonly string _modelDirectory;

    private readonly Dictionary<string, LoadedAdapter> _loaded = new(StringComparer.Ordinal);

    /// <summary>An adapter the engine loaded: its name, directory, method (from the registry), config, and for a
    /// MixLoRA adapter its config and whether that config sets <c>router_policy</c>.</summary>
    public sealed record LoadedAdapter(string Name, string Directory, IAdapterMethod Method, object Config, bool PolicyKeyPresent)
    {
        /// <summary>The MixLoRA config, or null for another method.</summary>
        public MixLoraConfig? MixLora => Config as MixLoraConfig;
    }

    private ChatEngine(LlamaForCausalLM model, TextTokenizer? tokenizer, ChatTemplate? template, string modelDirectory,
        IRouterPolicy? policyOverride)
    {
        Model = model;
        RouterPolicyOverride = policyOverride;
        _tokenizer = tokenizer;
        _modelDirectory = modelDirectory;
        if (tokenizer is not null && (template is not null || tokenizer.ChatTemplate is not null))
            _renderer = new ChatRenderer(tokenizer, template);
        var stops = new HashSet<int>(model.Config.EosTokenIds);
        if (tokenizer?.EosId is int eos) stops.Add(eos);
        if (tokenizer is not null)
            foreach (string marker in EndOfTurnMarkers)
                if (tokenizer.TokenToId(marker) is int id) stops.Add(id);
        StopTokenIds = stops;
    }

    /// <summary>Special tokens that end a turn in the supported templates; generation stops at any the tokenizer has.</summary>
    public static IReadOnlyList<string> EndOfTurnMarkers { get; } = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"];

    /// <summary>The model (with any adapters attached).</summary>
    public LlamaForCausalLM Model { get; }

    /// <summary>The model's context in tokens (<c>max_position_embeddings</c>): a prompt must be shorter, and prompt plus
    /// generated tokens never exceed it.</summary>
    public int ContextLength => Model.Config.MaxPositionEmbeddings;

    /// <summary>What a call runs when it does not say (<see cref="EngineOptions.Use"/>, or the default described there).</summary>
    public AdapterChoice DefaultAdapters { get; private set; } = AdapterChoice.Base;

    /// <summary>The adapters loaded, by name, in load order.</summary>
    public IReadOnlyList<LoadedAdapter> LoadedAdapters { get { lock (_loaded) return [.. _loaded.Values]; } }

    /// <summary>The MixLoRA adapter of <see cref="DefaultAdapters"/>, or null when it runs none.</summary>
    private LoadedAdapter? DefaultMixLora => MixLoraOf(DefaultAdapters);

    private LoadedAdapter? MixLoraOf(AdapterChoice choice)
    {
        lock (_loaded)
            return choice.Terms.Select(t => _loaded.GetValueOrDefault(t.Name)).FirstOrDefault(a => a?.MixLora is not null);
    }

    /// <summary>The config of the MixLoRA adapter <see cref="DefaultAdapters"/> runs, or null when it runs none.</summary>
    public MixLoraConfig? MixLora => DefaultMixLora?.MixLora;

    /// <summary>The router policy the default adapters route with: <see cref="EngineOptions.RouterPolicy"/>, else the
    /// MixLoRA adapter's <c>router_policy</c>; null when they have no router.</summary>
    public IRouterPolicy? RouterPolicy => DefaultMixLora is { } m ? RouterPolicyOverride ?? m.MixLora!.CreatePolicy() : null;

    /// <summary>Where <see cref="RouterPolicy"/> came from.</summary>
    public RouterPolicySource RouterPolicySource => DefaultMixLora is not { } m ? RouterPolicySource.None
        : RouterPolicyOverride is not null ? RouterPolicySource.Override
        : m.PolicyKeyPresent ? RouterPolicySource.AdapterConfig : RouterPolicySource.Default;

    /// <summary>The selection a call runs: its own, else <see cref="DefaultAdapters"/> for every row.</summary>
    private AdapterSelection Selection(GenerationOptions options) => options.Adapters ?? AdapterSelection.Of(DefaultAdapters);

    /// <summary>
    /// Loads the adapter directory <paramref name="path"/> onto the running model under <paramref name="name"/> (its
    /// method detected from adapter_config.json), without reloading the base model; calls can then select it. Waits for
    /// the model thread.
    /// </summary>
    /// <exception cref="ArgumentException">The name is taken or invalid.</exception>
    /// <exception cref="LoraMixException">The directory is not a loadable adapter for this model (nothing is attached).</exception>
    public LoadedAdapter LoadAdapter(string name, string path)
    {
        _modelThread.Wait();
        try { return LoadUnlocked(name, path); }
        finally { _modelThread.Release(); }
    }

    /// <summary>Removes adapter <paramref name="name"/> from the model and frees its tensors. Waits for the model thread.
    /// If it was part of <see cref="DefaultAdapters"/>, the default becomes the base model.</summary>
    /// <exception cref="ArgumentException">No adapter of that name is loaded.</exception>
    public void UnloadAdapter(string name)
    {
        _modelThread.Wait();
        try
        {
            LoadedAdapter adapter;
            lock (_loaded)
                if (!_loaded.Remove(name, out adapter!))
                    throw new ArgumentException($"no adapter named '{name}' is loaded; loaded: {string.Join(", ", _loaded.Keys)}", nameof(name));
            adapter.Method.Remove(Model, name);
            if (DefaultAdapters.Terms.Any(t => t.Name == name)) DefaultAdapters = AdapterChoice.Base;
        }
        finally { _modelThread.Release(); }
    }

    /// <summary>Makes <paramref name="choice"/> what calls run by default.</summary>
    /// <exception cref="ArgumentException">It names an adapter that is not loaded.</exception>
    public void SetDefaultAdapters(AdapterChoice choice)
    {
        ArgumentNullException.ThrowIfNull(choice);
        Model.CheckAdapters(AdapterSelection.Of(choice), 1);
        DefaultAdapters = choice;
    }

    private LoadedAdapter LoadUnlocked(string name, string path)
    {
        AdapterChoice.CheckName(name);
        lock (_loaded)
            if (_loaded.ContainsKey(name) || Model.Adapters.ContainsKey(name))
                throw new ArgumentException($"an adapter named '{name}' is already loaded; unload it first or choose another name", nameof(name));
        var method = AdapterMethods.Detect(path);
        var config = method.Load(Model, path, name);
        bool policyKey = config is MixLoraConfig
            && AdapterFiles.ReadConfigObject(Path.Combine(path, MixLoraAdapters.ConfigFileName), method.DisplayName).ContainsKey("router_policy");
        var loaded = new LoadedAdapter(name, path, method, config, policyKey);
        lock (_loaded) _loaded[name] = loaded;
        return loaded;
    }

    /// <summary>The policy given in <see cref="EngineOptions.RouterPolicy"/>, or null when the adapter's own is used.</summary>
    public IRouterPolicy? RouterPolicyOverride { get; }

    /// <summary>Fails closed, before anything runs, when a router policy the call routes with freezes on untrusted
    /// tokens but the prompt carries no privilege labels (raw ids): nothing could tell where untrusted text starts.</summary>
    private void RequireLabels(bool labelled, AdapterSelection selection)
    {
        if (labelled) return;
        Model.CheckAdapters(selection, selection.RowCount ?? 1);
        foreach (var name in selection.Names)
        {
            if (MixLoraOf(AdapterChoice.Of(name)) is not { } m) continue;
            var policy = RouterPolicyOverride ?? m.MixLora!.CreatePolicy();
            if (policy.FreezesOnUntrusted)
                throw new InvalidOperationException($"the MixLoRA adapter routes with router_policy {policy.Describe()}, which needs privilege labels " +
                                           "on every token, and raw token ids have none; give a chat (generate --chat, or chat) so that the " +
                                           "renderer labels each token, or route with --router-policy free");
        }
        foreach (var name in selection.Names)
        {
            if (Model.ScalingAdapter(name) is not { } x) continue;
            var policy = RouterPolicyOverride ?? x.Policy;
            if (policy.FreezesOnUntrusted)
                throw new InvalidOperationException($"the X-LoRA adapter '{name}' freezes its scalings with router_policy {policy.Describe()}, which needs " +
                                                    "privilege labels on every token, and raw token ids have none; give a chat (generate --chat, or chat) " +
                                                    "so that the renderer labels each token, or use --router-policy free");
        }
    }

    /// <summary>A routing context for one call: the engine's policy override travels in it. Raw ids (no labels) get one
    /// only when there is an override, so that a privileged override fails closed as a privileged adapter does.</summary>
    private RoutingContext? NewRouting(bool labelled) =>
        labelled || RouterPolicyOverride is not null ? new RoutingContext { Policy = RouterPolicyOverride } : null;

    /// <summary>The tokenizer; throws when the model directory has none.</summary>
    public TextTokenizer Tokenizer => _tokenizer ?? throw new TokenizerFileException(_modelDirectory, null,
        "no tokenizer.json or tokenizer.model in the model directory: text prompts need one (use --prompt-ids, or add the tokenizer files)");

    /// <summary>True when the model directory has a tokenizer.</summary>
    public bool HasTokenizer => _tokenizer is not null;

    /// <summary>The chat renderer; throws when there is no tokenizer or no known chat template.</summary>
    public ChatRenderer Renderer => _renderer ?? throw new LoraMixException(
        _tokenizer is null
            ? $"{_modelDirectory}: no tokenizer, so chats cannot be rendered"
            : $"{_modelDirectory}: tokenizer_config.json has no chat_template; choose one explicitly ({string.Join(", ", ChatTemplate.Names)})");

    /// <summary>Token ids that end generation: the model's and tokenizer's EOS and the template's end-of-turn tokens.</summary>
    public IReadOnlySet<int> StopTokenIds { get; }

    /// <summary>Loads the model (and adapters) and its tokenizer, if the directory has one.</summary>
    public static ChatEngine Load(string modelDirectory, EngineOptions? options = null)
    {
        options ??= new EngineOptions();
        if (!System.IO.Directory.Exists(modelDirectory))
            throw new LoraMixException($"model directory '{modelDirectory}' does not exist");
        string tokDir = options.TokenizerDirectory ?? modelDirectory;
        TextTokenizer? tokenizer = HasTokenizerFiles(tokDir) ? TextTokenizer.FromDirectory(tokDir) : null;
        if (options.TokenizerDirectory is not null && tokenizer is null)
            throw new TokenizerFileException(tokDir, null, "no tokenizer.json or tokenizer.model in this directory");
        ChatTemplate? template = options.Template is null ? null : ChatTemplate.Parse(options.Template);
        var plan = PlanAdapters(options);
        if (options.RouterPolicy is not null && plan.MixLoraInUse is null
            && !plan.Use.Terms.Any(t => plan.Adapters.Any(a => a.Name == t.Name && a.Method == AdapterMethods.XLora)))
            throw new LoraMixException($"a router policy ({options.RouterPolicy.Describe()}) was given, but no MixLoRA or X-LoRA adapter is in use: " +
                                       "only MixLoRA routers and X-LoRA scaling heads have a policy (plain LoRA adapters route nothing)");
        var model = LlamaForCausalLM.FromPretrained(modelDirectory, options.Device, options.DType);
        try
        {
            var engine = new ChatEngine(model, tokenizer, template, modelDirectory, options.RouterPolicy);
            foreach (var (name, path, _) in plan.Adapters) engine.LoadUnlocked(name, path);
            engine.SetDefaultAdapters(plan.Use);
            model.eval();
            return engine;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>The adapters <paramref name="options"/> load (name, directory, detected kind) and what calls run by
    /// default, worked out before anything loads: unnamed directories are named <c>default</c> (one, alone) or
    /// <c>adapterN</c>; the default is <see cref="EngineOptions.Use"/>, else the only adapter, else the sum of several
    /// LoRA adapters.</summary>
    /// <exception cref="LoraMixException">A name repeats, <c>Use</c> names an adapter not given, or several adapters
    /// include a MixLoRA one and <c>Use</c> does not say which to run.</exception>
    public static AdapterPlan PlanAdapters(EngineOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var named = options.Adapters.Select((path, i) => new KeyValuePair<string, string>(
                options.Adapters.Count == 1 && options.NamedAdapters.Count == 0 ? "default" : $"adapter{i}", path))
            .Concat(options.NamedAdapters).ToList();
        foreach (var (name, _) in named)
        {
            try { AdapterChoice.CheckName(name); }
            catch (ArgumentException e) { throw new LoraMixException(e.Message); }
        }
        if (named.GroupBy(n => n.Key).FirstOrDefault(g => g.Count() > 1) is { } dup)
            throw new LoraMixException($"adapter name '{dup.Key}' is given twice; give each adapter its own name");
        var adapters = named.Select(n => (n.Key, n.Value, AdapterMethods.Detect(n.Value))).ToList();
        var kinds = adapters.ToDictionary(a => a.Key, a => a.Item3);
        if (options.Use is { } use)
            foreach (var t in use.Terms)
                if (!kinds.ContainsKey(t.Name))
                    throw new LoraMixException($"--use names adapter '{t.Name}', which is not loaded; loaded: {(kinds.Count == 0 ? "none" : string.Join(", ", kinds.Keys))}");
        var choice = options.Use ?? (named.Count switch
        {
            0 => AdapterChoice.Base,
            1 => AdapterChoice.Of(named[0].Key),
            _ when kinds.Values.All(k => k == AdapterMethods.Lora) => AdapterChoice.Compose(named.Select(n => n.Key)),
            _ => throw new LoraMixException($"{named.Count} adapters are loaded and one is MixLoRA or X-LoRA: say which to run with --use NAME " +
                                            $"(loaded: {string.Join(", ", named.Select(n => $"{n.Key}={n.Value}"))})"),
        });
        var mixInUse = choice.Terms.Where(t => kinds[t.Name] == AdapterMethods.MixLora).ToList();
        if (mixInUse.Count > 1)
            throw new LoraMixException($"--use composes two MixLoRA adapters ({string.Join(", ", mixInUse.Select(t => t.Name))}); a row runs one mixture of experts at most");
        (string, string)? mixLora = null;
        if (mixInUse.Count == 1) mixLora = adapters.Where(a => a.Key == mixInUse[0].Name).Select(a => (a.Key, a.Value)).First();
        return new AdapterPlan(adapters, choice, mixLora);
    }

    /// <summary>What <see cref="PlanAdapters"/> worked out.</summary>
    /// <param name="Adapters">Name, directory and kind of every adapter, in load order.</param>
    /// <param name="Use">What calls run by default.</param>
    /// <param name="MixLoraInUse">The MixLoRA adapter <paramref name="Use"/> runs (name, directory), or null.</param>
    public sealed record AdapterPlan(IReadOnlyList<(string Name, string Directory, IAdapterMethod Method)> Adapters, AdapterChoice Use,
        (string Name, string Directory)? MixLoraInUse);

    /// <summary>True when <paramref name="directory"/> holds tokenizer.json or tokenizer.model.</summary>
    public static bool HasTokenizerFiles(string directory) =>
        File.Exists(Path.Combine(directory, "tokenizer.json")) || File.Exists(Path.Combine(directory, "tokenizer.model"));

    /// <summary>Encodes a raw text prompt: special-token text is recognised, BOS is added when the tokenizer's config says so.</summary>
    public int[] EncodePrompt(string text)
    {
        var tok = Tokenizer;
        var ids = tok.Encode(text);
        if (tok.AddBosToken && tok.BosId is int bos && (ids.Length == 0 || ids[0] != bos)) ids = [bos, .. ids];
        return ids;
    }

    /// <summary>Renders a conversation with the generation prompt (the model's turn comes next).</summary>
    public RenderedChat RenderForGeneration(IReadOnlyList<ChatMessage> messages) =>
        Renderer.Render(messages, new ChatRenderOptions { AddGenerationPrompt = true });

    /// <summary>Generates from token ids, streaming decoded text to <paramref name="onText"/> as it becomes valid UTF-8.
    /// Raw ids carry no privilege labels: a MixLoRA adapter with <c>router_policy: privileged</c> refuses them (use
    /// <see cref="Generate(RenderedChat, GenerationOptions, Action{string}?, CancellationToken)"/> or <see cref="Chat"/>).</summary>
    public EngineResult Generate(IReadOnlyList<int> promptIds, GenerationOptions options, Action<string>? onText = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        return GenerateOne(promptIds, null, options, onText, cancellationToken);
    }

    /// <summary>Generates from a rendered chat: its privilege labels travel with the ids into a <see cref="RoutingContext"/>,
    /// so a MixLoRA adapter routes under its configured <c>router_policy</c> (frozen from the first untrusted token under
    /// <c>privileged</c>), in the prefill and in every decoding step.</summary>
    public EngineResult Generate(RenderedChat chat, GenerationOptions options, Action<string>? onText = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(chat);
        return GenerateOne(chat.Ids, chat.Privileges, options, onText, cancellationToken);
    }

    private EngineResult GenerateOne(IReadOnlyList<int> promptIds, IReadOnlyList<Privilege>? privileges, GenerationOptions options,
        Action<string>? onText, CancellationToken cancellationToken)
    {
        var selection = Selection(options);
        RequireLabels(privileges is not null, selection);
        var effective = options with
        {
            StopTokenIds = [.. options.StopTokenIds.Union(options.StopAtEos ? StopTokenIds : [])], Adapters = selection,
        };
        _modelThread.Wait(cancellationToken);
        try
        {
            var stream = _tokenizer?.CreateStreamDecoder(skipSpecialTokens: true);
            var text = new System.Text.StringBuilder();
            using var routing = NewRouting(privileges is not null);
            var result = new TokenGenerator(Model).Generate([promptIds], effective, routing, privileges is null ? null : [privileges], (_, id) =>
            {
                if (stream is null) return;
                string piece = stream.Push(id);
                if (piece.Length == 0) return;
                text.Append(piece);
                onText?.Invoke(piece);
            }, cancellationToken)[0];
            if (stream is not null)
            {
                string rest = stream.Flush();
                if (rest.Length > 0) { text.Append(rest); onText?.Invoke(rest); }
            }
            return new EngineResult(text.ToString(), result.Tokens, result.FinishReason, promptIds.Count);
        }
        finally
        {
            _modelThread.Release();
        }
    }

    /// <summary>
    /// Generates for several prompts at once (left-padded batches of <paramref name="batchSize"/>, prompts of similar
    /// length together) and returns the decoded texts in input order, special tokens skipped. Raw ids carry no
    /// privilege labels (see <see cref="Generate(IReadOnlyList{int}, GenerationOptions, Action{string}?, CancellationToken)"/>).
    /// </summary>
    public IReadOnlyList<EngineResult> GenerateBatch(IReadOnlyList<int[]> prompts, GenerationOptions options, int batchSize = 16,
        Action<int>? onDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompts);
        return GenerateMany(prompts, null, options, batchSize, onDone, cancellationToken);
    }

    /// <summary>Generates for several rendered chats at once (as the ids overload), each with its privilege labels in
    /// the batch's <see cref="RoutingContext"/>.</summary>
    public IReadOnlyList<EngineResult> GenerateBatch(IReadOnlyList<RenderedChat> chats, GenerationOptions options, int batchSize = 16,
        Action<int>? onDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(chats);
        return GenerateMany(chats.Select(c => c.Ids).ToList(), chats.Select(c => c.Privileges).ToList(), options, batchSize, onDone, cancellationToken);
    }

    private EngineResult[] GenerateMany(IReadOnlyList<int[]> prompts, IReadOnlyList<Privilege[]>? privileges, GenerationOptions options,
        int batchSize, Action<int>? onDone, CancellationToken cancellationToken)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(batchSize, 1);
        var selection = Selection(options);
        selection.CheckBatch(prompts.Count);
        RequireLabels(privileges is not null, selection);
        var effective = options with { StopTokenIds = [.. options.StopTokenIds.Union(options.StopAtEos ? StopTokenIds : [])] };
        var results = new EngineResult[prompts.Count];
        var order = Enumerable.Range(0, prompts.Count).OrderBy(i => prompts[i].Length).ToArray();
        _modelThread.Wait(cancellationToken);
        try
        {
            var generator = new TokenGenerator(Model);
            int done = 0;
            foreach (var chunk in order.Chunk(batchSize))
            {
                using var routing = NewRouting(privileges is not null);
                var outs = generator.Generate(chunk.Select(i => (IReadOnlyList<int>)prompts[i]).ToList(),
                    effective with { Adapters = selection.Select(chunk) }, routing,
                    privileges is null ? null : chunk.Select(i => (IReadOnlyList<Privilege>)privileges[i]).ToList(), null, cancellationToken);
                for (int j = 0; j < chunk.Length; j++)
                {
                    var o = outs[j];
                    string text = _tokenizer is null ? string.Join(' ', o.Tokens) : _tokenizer.Decode([.. o.Tokens], skipSpecialTokens: true);
                    results[chunk[j]] = new EngineResult(text, o.Tokens, o.FinishReason, prompts[chunk[j]].Length);
                }
                done += chunk.Length;
                onDone?.Invoke(done);
            }
            return results;
        }
        finally
        {
            _modelThread.Release();
        }
    }

    /// <summary>Generates the assistant's reply to a conversation (rendered with its privilege labels).</summary>
    public EngineResult Chat(IReadOnlyList<ChatMessage> messages, GenerationOptions options, Action<string>? onText = null,
        CancellationToken cancellationToken = default) =>
        Generate(RenderForGeneration(messages), options, onText, cancellationToken);

    /// <summary>
    /// Runs a conversation through the MixLoRA adapter with a <see cref="RoutingTrace"/>: the rendered chat (with the
    /// generation prompt) is prefilled with the renderer's privilege labels, then up to <paramref name="generateTokens"/>
    /// greedy tokens are decoded through the KV cache and each is fed back and traced (labelled
    /// <see cref="Privilege.Assistant"/>). Routing goes through <paramref name="policyOverride"/>, or the adapter's
    /// configured <c>router_policy</c> when null.
    /// </summary>
    /// <param name="messages">The conversation.</param>
    /// <param name="policyOverride">The router policy to route with instead of the adapter's, or null.</param>
    /// <param name="generateTokens">Greedy decoding steps to trace after the prompt (0: prefill only); fewer when the
    /// model's context ends first (the inspection's finish reason is then length).</param>
    /// <param name="stopAtStopTokens">Stop early at the engine's stop tokens (EOS, end of turn).</param>
    /// <param name="cancellationToken">Cancels between decoding steps.</param>
    /// <exception cref="LoraMixException">No MixLoRA adapter is loaded, or the model has no tokenizer or chat template.</exception>
    public RoutingInspection TraceRouting(IReadOnlyList<ChatMessage> messages, IRouterPolicy? policyOverride = null,
        int generateTokens = 0, bool stopAtStopTokens = true, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ArgumentOutOfRangeException.ThrowIfNegative(generateTokens);
        var mixLora = MixLora ?? throw new LoraMixException(
            "routing can only be traced through a MixLoRA adapter, and none is loaded (LoRA adapters have no router)");
        var choice = DefaultAdapters;
        var chat = RenderForGeneration(messages);
        var policy = policyOverride ?? RouterPolicy ?? mixLora.CreatePolicy();
        // One step more than the tokens to trace: the generator never feeds back the last token it samples.
        var options = new GenerationOptions
        {
            MaxNewTokens = generateTokens == int.MaxValue ? generateTokens : generateTokens + 1, Temperature = 0, StopAtEos = stopAtStopTokens,
            StopTokenIds = stopAtStopTokens ? [.. StopTokenIds] : [], Adapters = AdapterSelection.Of(choice),
        };
        _modelThread.Wait(cancellationToken);
        try
        {
            using var routing = new RoutingContext { Policy = policy, Trace = new RoutingTrace() };
            var generated = new TokenGenerator(Model).Generate(chat, options, routing, cancellationToken: cancellationToken);
            // Fed back (and traced): every kept token when a stop token ended it, else all but the last sampled one.
            int fed = generated.FinishReason == FinishReason.Stop ? generated.Tokens.Count : Math.Max(0, generated.Tokens.Count - 1);
            int traced = Math.Min(fed, generateTokens);
            var routes = routing.Trace!.Row(0);
            if (routes.Count != chat.Length + traced)
                throw new InvalidOperationException($"routing trace has {routes.Count} tokens, expected {chat.Length} prompt + {traced} generated");
            var tokens = new List<InspectedToken>(routes.Count);
            for (int i = 0; i < routes.Count; i++)
            {
                bool isGenerated = i >= chat.Length;
                int id = isGenerated ? generated.Tokens[i - chat.Length] : chat.Ids[i];
                tokens.Add(new InspectedToken(id, Tokenizer.TokenPiece(id), isGenerated ? Privilege.Assistant : chat.Privileges[i],
                    isGenerated, routes[i].Layers));
            }
            FinishReason? finish = generateTokens == 0 ? null
                : generated.Tokens.Count > generateTokens ? FinishReason.Length : generated.FinishReason;
            return new RoutingInspection(tokens, chat.Length, chat.FirstUntrustedPosition, policy, mixLora.NumExperts,
                routing.Trace.LayerIndices, finish);
        }
        finally
        {
            _modelThread.Release();
        }
    }

    /// <summary>
    /// Runs the default adapters' X-LoRA adapter over a conversation (and <paramref name="generateTokens"/> greedy tokens)
    /// and records, per token, the scalings its scaled pass used: <c>[module][expert]</c>, under the adapter's
    /// <c>router_policy</c> (or the engine's override).
    /// </summary>
    /// <exception cref="LoraMixException">The default adapters run no X-LoRA adapter.</exception>
    public ScalingsInspection TraceScalings(IReadOnlyList<ChatMessage> messages, int generateTokens = 0, bool stopAtStopTokens = true,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ArgumentOutOfRangeException.ThrowIfNegative(generateTokens);
        var choice = DefaultAdapters;
        var xlora = choice.Terms.Select(t => Model.ScalingAdapter(t.Name)).FirstOrDefault(a => a is not null) ?? throw new LoraMixException(
            "scalings can only be traced through an X-LoRA adapter, and the adapters in use have none");
        var chat = RenderForGeneration(messages);
        var policy = RouterPolicyOverride ?? xlora.Policy;
        var options = new GenerationOptions
        {
            MaxNewTokens = generateTokens == int.MaxValue ? generateTokens : generateTokens + 1, Temperature = 0, StopAtEos = stopAtStopTokens,
            StopTokenIds = stopAtStopTokens ? [.. StopTokenIds] : [], Adapters = AdapterSelection.Of(choice),
        };
        _modelThread.Wait(cancellationToken);
        try
        {
            var rows = new List<float[]>();
            int modules = xlora.NumModules, experts = xlora.NumExperts;
            void Observe(string name, TorchSharp.torch.Tensor s)
            {
                if (name != xlora.Name) return;
                using var scope = TorchSharp.torch.NewDisposeScope();
                var row = s[0].to(TorchSharp.torch.ScalarType.Float32).cpu().contiguous();                 // [T, L, N]
                var values = row.data<float>().ToArray();
                for (long t = 0; t < row.shape[0]; t++) rows.Add(values.AsSpan((int)(t * modules * experts), modules * experts).ToArray());
            }
            using var routing = new RoutingContext { Policy = RouterPolicyOverride, OnScalings = Observe };
            var generated = new TokenGenerator(Model).Generate(chat, options, routing, cancellationToken: cancellationToken);
            int fed = generated.FinishReason == FinishReason.Stop ? generated.Tokens.Count : Math.Max(0, generated.Tokens.Count - 1);
            int traced = Math.Min(fed, generateTokens);
            if (rows.Count < chat.Length + traced)
                throw new InvalidOperationException($"scalings trace has {rows.Count} tokens, expected {chat.Length} prompt + {traced} generated");
            var tokens = new List<ScalingsToken>(chat.Length + traced);
            for (int i = 0; i < chat.Length + traced; i++)
            {
                bool isGenerated = i >= chat.Length;
                int id = isGenerated ? generated.Tokens[i - chat.Length] : chat.Ids[i];
                tokens.Add(new ScalingsToken(id, Tokenizer.TokenPiece(id), isGenerated ? Privilege.Assistant : chat.Privileges[i], isGenerated, rows[i]));
            }
            FinishReason? finish = generateTokens == 0 ? null
                : generated.Tokens.Count > generateTokens ? FinishReason.Length : generated.FinishReason;
            var adapter = xlora as Adapters.XLora.XLoraAdapter;
            return new ScalingsInspection(tokens, chat.Length, chat.FirstUntrustedPosition, policy,
                adapter?.ModuleOrder ?? [.. Enumerable.Range(0, modules).Select(l => $"module {l}")],
                adapter?.Config.Adapters.Select(a => a.Name).ToList() ?? [.. xlora.Experts], finish);
        }
        finally
        {
            _modelThread.Release();
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        Model.Dispose();
        _modelThread.Dispose();
    }
}
