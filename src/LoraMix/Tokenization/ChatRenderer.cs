using System.Text;

namespace LoraMix.Tokenization;

/// <summary>
/// Renders a conversation with a chat template into token ids, one privilege label, one loss flag, one message index
/// and one content flag per token. Template text is renderer-owned (privilege <see cref="Privilege.System"/>), except
/// the framing of an untrusted (<c>tool</c>/<c>data</c>) message — its role header, its wrapper tags and the end of its
/// turn — which is labelled <see cref="Privilege.Untrusted"/> like its content: every untrusted message therefore yields
/// untrusted tokens even when its content is empty, whitespace a template trims, or only markers that neutralisation
/// deletes, so the hardened router's freeze starts at every untrusted message. Each message's content is encoded on its
/// own, untrusted content always as plain text. See docs/CHAT_TEMPLATES.md.
/// </summary>
/// <remarks>Thread-safe when the tokenizer is (rendering keeps no state between calls).</remarks>
public sealed class ChatRenderer
{
    private const string StartHeader = "<|start_header_id|>";
    private const string EndHeader = "<|end_header_id|>";
    private const string EotId = "<|eot_id|>";
    private const string ImStart = "<|im_start|>";
    private const string ImEnd = "<|im_end|>";

    private readonly Dictionary<string, int> _special = new(StringComparer.Ordinal);
    private readonly HashSet<int> _addedIds;
    private readonly int[] _anchor;
    private readonly string? _bos;
    private readonly string? _eos;

    /// <summary>Creates a renderer. With <paramref name="template"/> null the family is detected from the tokenizer's
    /// <c>chat_template</c> (<see cref="ChatTemplate.Detect"/>).</summary>
    /// <exception cref="ChatTemplateException">No template was given and none was recognised, or the tokenizer lacks a
    /// token the template needs.</exception>
    public ChatRenderer(TextTokenizer tokenizer, ChatTemplate? template = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        Tokenizer = tokenizer;
        Template = template ?? ChatTemplate.Detect(tokenizer.ChatTemplate) ?? throw new ChatTemplateException(null, null,
            (tokenizer.ChatTemplate is null ? "the tokenizer has no chat_template" : "the tokenizer's chat_template is not one LoraMix recognises")
            + $"; choose one explicitly: {string.Join(", ", ChatTemplate.Names)}");
        _addedIds = [.. tokenizer.SpecialTokens.Values];

        switch (Template.Family)
        {
            case ChatTemplateFamily.Llama3:
                _bos = tokenizer.BosToken ?? "<|begin_of_text|>";
                Require(_bos, "the beginning-of-text token");
                Require(StartHeader); Require(EndHeader); Require(EotId);
                break;
            case ChatTemplateFamily.ChatML:
                Require(ImStart); Require(ImEnd);
                break;
            case ChatTemplateFamily.Llama2:
            case ChatTemplateFamily.Mistral:
                _bos = tokenizer.BosToken ?? throw new ChatTemplateException(Template.Name, null, "the tokenizer has no BOS token");
                _eos = tokenizer.EosToken ?? throw new ChatTemplateException(Template.Name, null, "the tokenizer has no EOS token");
                Require(_bos, "the BOS token"); Require(_eos, "the EOS token");
                break;
            case ChatTemplateFamily.Plain:
                if (tokenizer.BosToken is { } b && tokenizer.SpecialTokens.ContainsKey(b)) Require(_bos = b);
                break;
        }

        if (tokenizer.Kind == TokenizerKind.SentencePiece)
        {
            _anchor = tokenizer.Encode("\n", parseSpecialTokens: false);
            if (_anchor.Length == 0)
                throw new ChatTemplateException(Template.Name, null, "the SentencePiece tokenizer encodes \"\\n\" to no token");
        }
        else _anchor = [];
    }

    /// <summary>The tokenizer.</summary>
    public TextTokenizer Tokenizer { get; }

    /// <summary>The template in use.</summary>
    public ChatTemplate Template { get; }

    /// <summary>Renders <paramref name="messages"/>.</summary>
    /// <exception cref="ChatTemplateException">The conversation is empty, or does not fit the template (the
    /// <c>[INST]</c> families: a system message that is not first, an assistant message where a user turn is due).</exception>
    public RenderedChat Render(IReadOnlyList<ChatMessage> messages, ChatRenderOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        options ??= ChatRenderOptions.Default;
        if (messages.Count == 0) throw new ChatTemplateException(Template.Name, null, "the conversation has no messages");
        for (int i = 0; i < messages.Count; i++)
            if (messages[i] is null) throw new ChatTemplateException(Template.Name, i, "the message is null");

        var contents = new string[messages.Count];
        for (int i = 0; i < messages.Count; i++)
            contents[i] = messages[i].IsUntrusted && options.NeutralizeUntrustedMarkers
                ? Neutralize(messages[i].Content, Template.UntrustedMarkers)
                : messages[i].Content;

        var b = new Builder(messages, contents, options);
        switch (Template.Family)
        {
            case ChatTemplateFamily.Llama3: BuildLlama3(b); break;
            case ChatTemplateFamily.ChatML: BuildChatML(b); break;
            case ChatTemplateFamily.Llama2: BuildInst(b, llama2: true); break;
            case ChatTemplateFamily.Mistral: BuildInst(b, llama2: false); break;
            case ChatTemplateFamily.Plain: BuildPlain(b); break;
        }
        return Encode(b, messages, options);
    }

    /// <summary>Deletes every marker from <paramref name="text"/>, case-insensitively and repeatedly until none is left
    /// (so that <c>[IN[INST]ST]</c> cannot reassemble into <c>[INST]</c>).</summary>
    public static string Neutralize(string text, IReadOnlyList<string> markers)
    {
        ArgumentNullException.ThrowIfNull(text);
        string s = text;
        bool again = true;
        while (again)
        {
            again = false;
            foreach (string m in markers)
            {
                int i;
                while ((i = s.IndexOf(m, StringComparison.OrdinalIgnoreCase)) >= 0)
                {
                    s = s.Remove(i, m.Length);
                    again = true;
                }
            }
        }
        return s;
    }

    // ---------------------------------------------------------------- families

    private void BuildLlama3(Builder b)
    {
        var msgs = b.Messages;
        for (int i = 0; i < msgs.Count; i++)
        {
            var m = msgs[i];
            if (i == 0) b.Special(_bos!, i);
            string role = m.Role switch { ChatRole.Tool => "ipython", ChatRole.Data => "user", _ => m.Role.ToName() };
            b.FrameSpecial(StartHeader, i);
            b.Frame(role, i);
            b.FrameSpecial(EndHeader, i);
            b.Frame("\n\n", i);
            string content = b.Contents[i].Trim();
            if (m.Role == ChatRole.Data)
            {
                b.Frame("<data>\n", i);
                b.Content(content, i);
                b.Frame("\n</data>", i);
            }
            else b.Content(content, i);
            b.FrameSpecial(EotId, i, closesAssistant: m.Role == ChatRole.Assistant);
        }
        if (b.Options.AddGenerationPrompt)
        {
            b.Special(StartHeader, -1);
            b.Template("assistant", -1);
            b.Special(EndHeader, -1);
            b.Template("\n\n", -1);
        }
    }

    private void BuildChatML(Builder b)
    {
        var msgs = b.Messages;
        if (Template.DefaultSystemPrompt is { } prompt && msgs[0].Role != ChatRole.System)
        {
            b.Special(ImStart, -1);
            b.Template("system\n" + prompt, -1);
            b.Special(ImEnd, -1);
            b.Template("\n", -1);
        }
        for (int i = 0; i < msgs.Count; i++)
        {
            var m = msgs[i];
            switch (m.Role)
            {
                case ChatRole.Tool:
                    // As Qwen2.5/Qwen3: consecutive tool results share one user turn.
                    if (i == 0 || msgs[i - 1].Role != ChatRole.Tool)
                    {
                        b.FrameSpecial(ImStart, i);
                        b.Frame("user", i);
                    }
                    b.Frame("\n<tool_response>\n", i);
                    b.Content(b.Contents[i], i);
                    b.Frame("\n</tool_response>", i);
                    if (i == msgs.Count - 1 || msgs[i + 1].Role != ChatRole.Tool)
                    {
                        b.FrameSpecial(ImEnd, i);
                        b.Frame("\n", i);
                    }
                    break;
                case ChatRole.Data:
                    b.FrameSpecial(ImStart, i);
                    b.Frame("user\n<data>\n", i);
                    b.Content(b.Contents[i], i);
                    b.Frame("\n</data>", i);
                    b.FrameSpecial(ImEnd, i);
                    b.Frame("\n", i);
                    break;
                default:
                    b.Special(ImStart, i);
                    b.Template(m.Role.ToName() + "\n", i);
                    b.Content(b.Contents[i], i);
                    b.Special(ImEnd, i, closesAssistant: m.Role == ChatRole.Assistant);
                    b.Template("\n", i);
                    break;
            }
        }
        if (b.Options.AddGenerationPrompt)
        {
            b.Special(ImStart, -1);
            b.Template("assistant\n", -1);
        }
    }

    private sealed class InstBlock(int? system)
    {
        public int? System { get; } = system;
        public List<int> Parts { get; } = [];
        public int First => System ?? Parts[0];
        public int Last => Parts.Count > 0 ? Parts[^1] : First;
    }

    private void BuildInst(Builder b, bool llama2)
    {
        var msgs = b.Messages;
        var items = new List<object>(); // InstBlock or the index of an assistant message
        int start = 0;
        InstBlock? open = null;
        if (msgs[0].Role == ChatRole.System)
        {
            open = new InstBlock(0);
            start = 1;
        }
        for (int i = start; i < msgs.Count; i++)
        {
            switch (msgs[i].Role)
            {
                case ChatRole.System:
                    throw new ChatTemplateException(Template.Name, i,
                        "a system message is only allowed as the first message in this template");
                case ChatRole.Assistant:
                    if (open is null || open.Parts.Count == 0)
                        throw new ChatTemplateException(Template.Name, i,
                            "an assistant message where a user turn is due: after the optional system message, roles must " +
                            "alternate user/assistant (tool and data messages count as part of the user turn)");
                    items.Add(open);
                    items.Add(i);
                    open = null;
                    break;
                default:
                    (open ??= new InstBlock(null)).Parts.Add(i);
                    break;
            }
        }
        if (open is not null) items.Add(open);

        if (!llama2) b.Special(_bos!, -1);
        foreach (object item in items)
        {
            if (item is int a)
            {
                if (llama2)
                {
                    b.Content(" " + b.Contents[a].Trim(), a);
                    b.Template(" ", a, closesAssistant: true);
                }
                else b.Content(" " + b.Contents[a], a);
                b.Special(_eos!, a, closesAssistant: true);
                continue;
            }

            var block = (InstBlock)item;
            if (llama2) b.Special(_bos!, block.First);
            Segment inst = b.Template(llama2 ? "[INST]" : " [INST]", block.First);
            int bodyStart = b.Segments.Count;
            if (block.System is { } s)
            {
                if (llama2)
                {
                    b.Template("<<SYS>>\n", s);
                    b.Content(b.Contents[s], s);
                    b.Template("\n<</SYS>>\n\n", s);
                }
                else
                {
                    b.Content(b.Contents[s], s);
                    if (block.Parts.Count > 0) b.Template("\n\n", s);
                }
            }
            for (int k = 0; k < block.Parts.Count; k++)
            {
                int p = block.Parts[k];
                if (k > 0) b.Template("\n\n", p);
                switch (msgs[p].Role)
                {
                    case ChatRole.Tool:
                        b.Frame("<tool_response>\n", p);
                        b.Content(b.Contents[p], p);
                        b.Frame("\n</tool_response>", p);
                        break;
                    case ChatRole.Data:
                        b.Frame("<data>\n", p);
                        b.Content(b.Contents[p], p);
                        b.Frame("\n</data>", p);
                        break;
                    default:
                        b.Content(b.Contents[p], p);
                        break;
                }
            }
            var body = b.Segments.GetRange(bodyStart, b.Segments.Count - bodyStart);
            if (llama2) StripBlock(body); // Llama-2's template strip()s the [INST] block as a whole.
            // The space after [INST] goes to the first body segment, so that in SentencePiece vocabularies the content's
            // first token (▁Hello) carries it and gets the content's privilege.
            if (body.FirstOrDefault(x => x.Text.Length > 0) is { } first) first.Text = " " + first.Text;
            else inst.Text += " ";
            b.Template(" [/INST]", block.Last);
        }
    }

    private static void StripBlock(List<Segment> body)
    {
        foreach (var s in body)
        {
            s.Text = s.Text.TrimStart();
            if (s.Text.Length > 0) break;
        }
        for (int i = body.Count - 1; i >= 0; i--)
        {
            body[i].Text = body[i].Text.TrimEnd();
            if (body[i].Text.Length > 0) break;
        }
    }

    private void BuildPlain(Builder b)
    {
        if (_bos is not null) b.Special(_bos, -1);
        for (int i = 0; i < b.Messages.Count; i++)
        {
            if (i > 0) b.Template("\n\n", i);
            switch (b.Messages[i].Role)
            {
                case ChatRole.Tool:
                    b.Frame("<tool_response>\n", i);
                    b.Content(b.Contents[i], i);
                    b.Frame("\n</tool_response>", i);
                    break;
                case ChatRole.Data:
                    b.Frame("<data>\n", i);
                    b.Content(b.Contents[i], i);
                    b.Frame("\n</data>", i);
                    break;
                default:
                    b.Content(b.Contents[i], i);
                    break;
            }
        }
    }

    // ---------------------------------------------------------------- encoding

    private RenderedChat Encode(Builder b, IReadOnlyList<ChatMessage> messages, ChatRenderOptions options)
    {
        int lastAssistant = -1;
        for (int i = messages.Count - 1; i >= 0; i--)
            if (messages[i].Role == ChatRole.Assistant) { lastAssistant = i; break; }

        var ids = new List<int>();
        var priv = new List<Privilege>();
        var loss = new List<bool>();
        var msgIdx = new List<int>();
        var isContent = new List<bool>();
        var spans = new List<ChatSpan>();
        var text = new StringBuilder();
        bool sp = Tokenizer.Kind == TokenizerKind.SentencePiece;
        bool runStart = true; // SentencePiece: the next text starts a run (gets the dummy "▁" prefix)

        foreach (var seg in b.Segments)
        {
            if (seg.Text.Length == 0) continue;
            int[] segIds;
            if (seg.Kind == SegmentKind.Special) segIds = [_special[seg.Text]];
            else if (!sp || runStart) segIds = Tokenizer.Encode(seg.Text, seg.ParseSpecial);
            else segIds = EncodeContinuation(seg.Text, seg.ParseSpecial);
            if (segIds.Length > 0) runStart = _addedIds.Contains(segIds[^1]);

            bool segLoss = seg.LossOf >= 0 && options.Loss switch
            {
                ChatLoss.AllAssistantTurns => true,
                ChatLoss.LastAssistantTurn => seg.LossOf == lastAssistant,
                _ => false,
            };
            spans.Add(new ChatSpan(seg.Message, seg.Privilege, seg.IsContent, segLoss, ids.Count, segIds.Length, text.Length, seg.Text));
            foreach (int id in segIds)
            {
                ids.Add(id);
                priv.Add(seg.Privilege);
                loss.Add(segLoss);
                msgIdx.Add(seg.Message);
                isContent.Add(seg.IsContent);
            }
            text.Append(seg.Text);
        }
        // The hardened router freezes at the first untrusted token: every untrusted message must have produced one
        // (its framing does in every template); fail closed rather than render a chat whose data escapes the freeze.
        var labelled = new bool[messages.Count];
        for (int i = 0; i < ids.Count; i++)
            if (msgIdx[i] >= 0 && priv[i] == Privilege.Untrusted) labelled[msgIdx[i]] = true;
        for (int m = 0; m < messages.Count; m++)
        {
            if (messages[m].IsUntrusted && !labelled[m])
                throw new ChatTemplateException(Template.Name, m,
                    $"the {messages[m].Role.ToName()} message rendered no untrusted token, so the router's freeze could not start at it");
        }
        return new RenderedChat(Tokenizer, Template, messages, [.. ids], [.. priv], [.. loss], [.. msgIdx], [.. isContent],
            text.ToString(), spans);
    }

    // SentencePiece adds a dummy "▁" to every run of text; text that continues a run is encoded behind a "\n" anchor
    // (a byte-fallback piece that never merges), whose ids are then dropped.
    private int[] EncodeContinuation(string text, bool parseSpecial)
    {
        int[] withAnchor = Tokenizer.Encode("\n" + text, parseSpecial);
        if (!withAnchor.AsSpan().StartsWith(_anchor))
            throw new ChatTemplateException(Template.Name, null,
                $"cannot encode text that continues a SentencePiece run: \"\\n\" merged with the text {Quote(text)}");
        return withAnchor[_anchor.Length..];
    }

    private static string Quote(string s) => s.Length <= 40 ? $"\"{s}\"" : $"\"{s[..40]}...\"";

    private void Require(string token, string? what = null)
    {
        if (!Tokenizer.SpecialTokens.TryGetValue(token, out int id))
            throw new ChatTemplateException(Template.Name, null,
                $"the template needs {what ?? "the special token"} '{token}', which the tokenizer does not have as an added token");
        _special[token] = id;
    }

    // ---------------------------------------------------------------- segments

    private enum SegmentKind { Special, Template, Content }

    private sealed class Segment(SegmentKind kind, string text, int message, Privilege privilege, bool isContent, int lossOf,
        bool parseSpecial)
    {
        public SegmentKind Kind { get; } = kind;
        public string Text { get; set; } = text;
        public int Message { get; } = message;
        public Privilege Privilege { get; } = privilege;
        public bool IsContent { get; } = isContent;
        public int LossOf { get; } = lossOf; // the assistant message whose loss this segment carries, or -1
        public bool ParseSpecial { get; } = parseSpecial;
    }

    private sealed class Builder(IReadOnlyList<ChatMessage> messages, string[] contents, ChatRenderOptions options)
    {
        public IReadOnlyList<ChatMessage> Messages { get; } = messages;
        public string[] Contents { get; } = contents;
        public ChatRenderOptions Options { get; } = options;
        public List<Segment> Segments { get; } = [];

        public Segment Special(string token, int message, bool closesAssistant = false) =>
            Add(new Segment(SegmentKind.Special, token, message, Privilege.System, false, closesAssistant ? message : -1, true));

        public Segment Template(string text, int message, bool closesAssistant = false) =>
            Add(new Segment(SegmentKind.Template, text, message, Privilege.System, false, closesAssistant ? message : -1, true));

        /// <summary>Template text that frames message <paramref name="message"/> alone (its role header, wrapper tags,
        /// end of turn): untrusted when the message is, so that an untrusted message always yields untrusted tokens.</summary>
        public Segment Frame(string text, int message, bool closesAssistant = false) =>
            Add(new Segment(SegmentKind.Template, text, message, FramePrivilege(message), false, closesAssistant ? message : -1, true));

        /// <summary>A special token that frames message <paramref name="message"/> alone (see <see cref="Frame"/>).</summary>
        public Segment FrameSpecial(string token, int message, bool closesAssistant = false) =>
            Add(new Segment(SegmentKind.Special, token, message, FramePrivilege(message), false, closesAssistant ? message : -1, true));

        private Privilege FramePrivilege(int message) => Messages[message].IsUntrusted ? Privilege.Untrusted : Privilege.System;

        public Segment Content(string text, int message)
        {
            var m = Messages[message];
            bool parse = !m.IsUntrusted && Options.ParseSpecialTokensInTrustedContent;
            return Add(new Segment(SegmentKind.Content, text, message, m.Privilege, true,
                m.Role == ChatRole.Assistant ? message : -1, parse));
        }

        private Segment Add(Segment s)
        {
            Segments.Add(s);
            return s;
        }
    }
}
