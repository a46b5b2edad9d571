namespace LoraMix.Tokenization;

/// <summary>
/// One contiguous piece of a rendered chat: a special token, a run of template text, or one message's content.
/// </summary>
/// <param name="MessageIndex">The message it belongs to; -1 for the generation prompt, a default system prompt and the
/// single leading BOS of mistral/plain.</param>
/// <param name="Privilege">The privilege of its tokens.</param>
/// <param name="IsContent">True for a message's content; false for template text.</param>
/// <param name="Loss">The loss flag of its tokens.</param>
/// <param name="TokenStart">Index of its first token in <see cref="RenderedChat.Ids"/>.</param>
/// <param name="TokenCount">Number of tokens (may be 0 only for text that encodes to nothing).</param>
/// <param name="CharStart">Index of its first character in <see cref="RenderedChat.Text"/>.</param>
/// <param name="Text">Its text (special tokens: the token string).</param>
public sealed record ChatSpan(int MessageIndex, Privilege Privilege, bool IsContent, bool Loss, int TokenStart, int TokenCount,
    int CharStart, string Text);

/// <summary>One token of a rendered chat with its labels (for <c>loramix render --labels</c>).</summary>
/// <param name="Position">Token position.</param>
/// <param name="Id">Token id.</param>
/// <param name="Piece">The vocabulary piece (<see cref="TextTokenizer.TokenPiece"/>).</param>
/// <param name="Privilege">The token's privilege.</param>
/// <param name="Loss">Whether the token is a training target.</param>
/// <param name="MessageIndex">The message it belongs to, or -1.</param>
/// <param name="IsContent">True for message content, false for template tokens.</param>
public sealed record ChatLabelRow(int Position, int Id, string Piece, Privilege Privilege, bool Loss, int MessageIndex, bool IsContent)
{
    /// <summary>The lowercase privilege name (<c>untrusted</c>, <c>assistant</c>, <c>user</c>, <c>system</c>).</summary>
    public string PrivilegeName => Privilege.ToName();
}

/// <summary>A rendered conversation: ids and, per token, privilege, loss flag, message index and content flag.</summary>
public sealed class RenderedChat
{
    private readonly TextTokenizer _tokenizer;

    internal RenderedChat(TextTokenizer tokenizer, ChatTemplate template, IReadOnlyList<ChatMessage> messages, int[] ids,
        Privilege[] privileges, bool[] lossMask, int[] messageIndices, bool[] isContent, string text, IReadOnlyList<ChatSpan> spans)
    {
        _tokenizer = tokenizer;
        Template = template;
        Messages = messages;
        Ids = ids;
        Privileges = privileges;
        LossMask = lossMask;
        MessageIndices = messageIndices;
        IsContent = isContent;
        Text = text;
        Spans = spans;
    }

    /// <summary>The template that rendered it.</summary>
    public ChatTemplate Template { get; }

    /// <summary>The messages as given (before trimming or marker neutralisation).</summary>
    public IReadOnlyList<ChatMessage> Messages { get; }

    /// <summary>Token ids (BOS/EOS exactly where the template writes them).</summary>
    public int[] Ids { get; }

    /// <summary>Per token: content tokens their role's privilege; template tokens <see cref="Privilege.System"/>, except
    /// the framing of an untrusted message (role header, wrapper tags, end of turn), which is
    /// <see cref="Privilege.Untrusted"/> like its content.</summary>
    public Privilege[] Privileges { get; }

    /// <summary>Per token: true on assistant content and the end-of-turn token closing it (per <see cref="ChatLoss"/>).</summary>
    public bool[] LossMask { get; }

    /// <summary>Per token: the index of the message it belongs to, or -1.</summary>
    public int[] MessageIndices { get; }

    /// <summary>Per token: true for content tokens, false for template tokens.</summary>
    public bool[] IsContent { get; }

    /// <summary>The rendered string (template text and content; special tokens written as their strings).</summary>
    public string Text { get; }

    /// <summary>The pieces the chat was built from, in order (empty pieces are left out).</summary>
    public IReadOnlyList<ChatSpan> Spans { get; }

    /// <summary>Number of tokens.</summary>
    public int Length => Ids.Length;

    /// <summary>Position of the first untrusted token — the first token of the first <c>tool</c>/<c>data</c> message's
    /// framing, whether or not its content produced tokens — or -1 when there is no untrusted message (the hardened router
    /// freezes there).</summary>
    public int FirstUntrustedPosition => Array.IndexOf(Privileges, Privilege.Untrusted);

    /// <summary>The token range of message <paramref name="messageIndex"/>'s content (empty at the message's position
    /// when the content encodes to nothing; (0, 0) when the message was not rendered).</summary>
    public Range ContentRange(int messageIndex)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(messageIndex);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(messageIndex, Messages.Count);
        foreach (var s in Spans)
            if (s.IsContent && s.MessageIndex == messageIndex)
                return new Range(s.TokenStart, s.TokenStart + s.TokenCount);
        int at = Array.IndexOf(MessageIndices, messageIndex);
        return at < 0 ? new Range(0, 0) : new Range(at, at);
    }

    /// <summary>The number of tokens with loss.</summary>
    public int LossTokenCount => LossMask.Count(x => x);

    /// <summary>One row per token: position, id, piece, privilege, loss, message index, content flag.</summary>
    public IReadOnlyList<ChatLabelRow> ToLabelRows()
    {
        var rows = new ChatLabelRow[Ids.Length];
        for (int i = 0; i < rows.Length; i++)
            rows[i] = new ChatLabelRow(i, Ids[i], _tokenizer.TokenPiece(Ids[i]), Privileges[i], LossMask[i], MessageIndices[i], IsContent[i]);
        return rows;
    }
}
