using System.Text;
using System.Text.RegularExpressions;

namespace LoraMix.Tokenization;

/// <summary>The hand-written chat template families (see docs/CHAT_TEMPLATES.md).</summary>
public enum ChatTemplateFamily
{
    /// <summary>Meta-Llama-3(.1/.2)-Instruct: <c>&lt;|start_header_id|&gt;role&lt;|end_header_id|&gt;</c> turns.</summary>
    Llama3,

    /// <summary>Llama-2-chat: <c>&lt;s&gt;[INST] &lt;&lt;SYS&gt;&gt;...</c>.</summary>
    Llama2,

    /// <summary>Mistral-7B-Instruct-v0.1 (tokenizer V1): <c>&lt;s&gt; [INST] ... [/INST]</c>.</summary>
    Mistral,

    /// <summary>ChatML (Qwen2/2.5/3): <c>&lt;|im_start|&gt;role\n...&lt;|im_end|&gt;</c>.</summary>
    ChatML,

    /// <summary>No template: BOS, then the messages separated by blank lines (base models).</summary>
    Plain,
}

/// <summary>
/// A chat template: a <see cref="Family"/> and, for ChatML, an optional default system prompt (Qwen2/2.5 insert one
/// when the conversation has no system message).
/// </summary>
public sealed record ChatTemplate
{
    private static readonly string[] InstMarkers = ["[INST]", "[/INST]"];
    private static readonly string[] SysMarkers = ["<<SYS>>", "<</SYS>>"];
    private static readonly string[] TagMarkers = ["<data>", "</data>", "<tool_response>", "</tool_response>"];

    public ChatTemplate(ChatTemplateFamily family, string? defaultSystemPrompt = null)
    {
        if (!Enum.IsDefined(family)) throw new ArgumentOutOfRangeException(nameof(family), family, null);
        if (defaultSystemPrompt is not null && family != ChatTemplateFamily.ChatML)
            throw new ArgumentException($"a default system prompt is only supported by the chatml family, not {NameOf(family)}",
                nameof(defaultSystemPrompt));
        Family = family;
        DefaultSystemPrompt = defaultSystemPrompt;
    }

    /// <summary>The family.</summary>
    public ChatTemplateFamily Family { get; }

    /// <summary>ChatML only: a system prompt rendered (as template text, message index -1) when the conversation does
    /// not start with a system message. Null: none.</summary>
    public string? DefaultSystemPrompt { get; }

    /// <summary>The family's name as <see cref="Parse"/> accepts it (<c>llama3</c>, <c>llama2</c>, <c>mistral</c>,
    /// <c>chatml</c>, <c>plain</c>).</summary>
    public string Name => NameOf(Family);

    /// <summary>The template names <see cref="Parse"/> accepts.</summary>
    public static IReadOnlyList<string> Names { get; } = ["llama3", "llama2", "mistral", "chatml", "plain"];

    public static ChatTemplate Llama3 { get; } = new(ChatTemplateFamily.Llama3);
    public static ChatTemplate Llama2 { get; } = new(ChatTemplateFamily.Llama2);
    public static ChatTemplate Mistral { get; } = new(ChatTemplateFamily.Mistral);
    public static ChatTemplate ChatML { get; } = new(ChatTemplateFamily.ChatML);
    public static ChatTemplate Plain { get; } = new(ChatTemplateFamily.Plain);

    /// <summary>Qwen2.5-Instruct's default system prompt (as its chat_template writes it).</summary>
    public const string Qwen25DefaultSystemPrompt = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

    /// <summary>
    /// The textual markers deleted from untrusted (tool/data) content when
    /// <see cref="ChatRenderOptions.NeutralizeUntrustedMarkers"/> is on: the family's own textual markers
    /// (<c>[INST]</c>, <c>[/INST]</c>; llama2 also <c>&lt;&lt;SYS&gt;&gt;</c>, <c>&lt;&lt;/SYS&gt;&gt;</c>) and the
    /// renderer's tags (<c>&lt;data&gt;</c>, <c>&lt;/data&gt;</c>, <c>&lt;tool_response&gt;</c>,
    /// <c>&lt;/tool_response&gt;</c>). Special-token strings are not listed: untrusted content is always encoded as
    /// plain text, so they cannot become special ids.
    /// </summary>
    public IReadOnlyList<string> UntrustedMarkers => Family switch
    {
        ChatTemplateFamily.Llama2 => [.. InstMarkers, .. SysMarkers, .. TagMarkers],
        ChatTemplateFamily.Mistral => [.. InstMarkers, .. TagMarkers],
        _ => TagMarkers,
    };

    /// <summary>A copy with another default system prompt (chatml only; null removes it).</summary>
    public ChatTemplate WithDefaultSystemPrompt(string? prompt) => new(Family, prompt);

    /// <summary>Parses a template name (case-insensitive).</summary>
    /// <exception cref="ChatTemplateException">Unknown name; the message lists the known ones.</exception>
    public static ChatTemplate Parse(string name) =>
        TryParse(name, out var t)
            ? t
            : throw new ChatTemplateException(null, null,
                $"unknown template '{name}': expected one of {string.Join(", ", Names)}");

    /// <summary>Parses a template name (case-insensitive); false when unknown.</summary>
    public static bool TryParse(string? name, out ChatTemplate template)
    {
        template = name?.Trim().ToLowerInvariant() switch
        {
            "llama3" => Llama3,
            "llama2" => Llama2,
            "mistral" => Mistral,
            "chatml" => ChatML,
            "plain" => Plain,
            _ => null!,
        };
        return template is not null;
    }

    /// <summary>
    /// Detects the family from a Hugging Face <c>chat_template</c> (tokenizer_config.json):
    /// <c>&lt;|start_header_id|&gt;</c> → llama3; <c>&lt;|im_start|&gt;</c> → chatml (a default system prompt written
    /// literally in the template, as in Qwen2/2.5, is picked up); <c>[INST]</c> with <c>&lt;&lt;SYS&gt;&gt;</c> → llama2;
    /// <c>[INST]</c> without → mistral. Null when the text is null/empty or not recognised.
    /// </summary>
    public static ChatTemplate? Detect(string? chatTemplate)
    {
        if (string.IsNullOrWhiteSpace(chatTemplate)) return null;
        if (chatTemplate.Contains("<|start_header_id|>", StringComparison.Ordinal)) return Llama3;
        if (chatTemplate.Contains("<|im_start|>", StringComparison.Ordinal))
            return FindDefaultSystemPrompt(chatTemplate) is { } prompt ? new(ChatTemplateFamily.ChatML, prompt) : ChatML;
        if (chatTemplate.Contains("[INST]", StringComparison.Ordinal))
            return chatTemplate.Contains("<<SYS>>", StringComparison.Ordinal) ? Llama2 : Mistral;
        return null;
    }

    // A Jinja string literal that holds a whole default system turn: '<|im_start|>system\n...<|im_end|>\n'
    // (single or double quotes; the prompt itself is a literal, not an expression).
    private static readonly Regex DefaultSystemLiteral = new(
        """(?<q>['"])<\|im_start\|>system\\n(?<p>(?:\\.|(?!\k<q>)[^\\])*?)<\|im_end\|>\\n\k<q>""",
        RegexOptions.CultureInvariant | RegexOptions.ExplicitCapture);

    internal static string? FindDefaultSystemPrompt(string chatTemplate)
    {
        var m = DefaultSystemLiteral.Match(chatTemplate);
        if (!m.Success) return null;
        string prompt = UnescapeJinja(m.Groups["p"].Value);
        return prompt.Length == 0 ? null : prompt;
    }

    private static string UnescapeJinja(string s)
    {
        if (!s.Contains('\\')) return s;
        var sb = new StringBuilder(s.Length);
        for (int i = 0; i < s.Length; i++)
        {
            char c = s[i];
            if (c != '\\' || i + 1 == s.Length) { sb.Append(c); continue; }
            char e = s[++i];
            sb.Append(e switch { 'n' => '\n', 't' => '\t', 'r' => '\r', _ => e });
        }
        return sb.ToString();
    }

    private static string NameOf(ChatTemplateFamily family) => family switch
    {
        ChatTemplateFamily.Llama3 => "llama3",
        ChatTemplateFamily.Llama2 => "llama2",
        ChatTemplateFamily.Mistral => "mistral",
        ChatTemplateFamily.ChatML => "chatml",
        ChatTemplateFamily.Plain => "plain",
        _ => throw new ArgumentOutOfRangeException(nameof(family), family, null),
    };

    public override string ToString() =>
        DefaultSystemPrompt is null ? Name : $"{Name} (default system prompt: \"{DefaultSystemPrompt}\")";
}

/// <summary>Which assistant tokens the loss mask covers.</summary>
public enum ChatLoss
{
    /// <summary>Every assistant message's content and its end-of-turn token (the default).</summary>
    AllAssistantTurns,

    /// <summary>Only the last assistant message.</summary>
    LastAssistantTurn,

    /// <summary>No token (inference prompts).</summary>
    None,
}

/// <summary>Options of <see cref="ChatRenderer.Render"/>.</summary>
public sealed record ChatRenderOptions
{
    /// <summary>Append the assistant turn opener (llama3, chatml). The <c>[INST]</c> families and plain have none.</summary>
    public bool AddGenerationPrompt { get; init; }

    /// <summary>Which assistant tokens get loss.</summary>
    public ChatLoss Loss { get; init; } = ChatLoss.AllAssistantTurns;

    /// <summary>Delete the template's textual markers and the renderer's tags from tool/data content, repeatedly and
    /// case-insensitively (<see cref="ChatTemplate.UntrustedMarkers"/>). On by default.</summary>
    public bool NeutralizeUntrustedMarkers { get; init; } = true;

    /// <summary>Encode system/user/assistant content with special-token parsing, as Hugging Face does when it tokenises
    /// the rendered string. Off by default; tool/data content is plain text regardless.</summary>
    public bool ParseSpecialTokensInTrustedContent { get; init; }

    /// <summary>The defaults: no generation prompt, loss on all assistant turns, markers neutralised.</summary>
    public static ChatRenderOptions Default { get; } = new();

    /// <summary>For inference: generation prompt on, no loss.</summary>
    public static ChatRenderOptions Inference { get; } = new() { AddGenerationPrompt = true, Loss = ChatLoss.None };
}
