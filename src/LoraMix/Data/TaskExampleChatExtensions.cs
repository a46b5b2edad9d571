using LoraMix.Tokenization;

namespace LoraMix.Data;

/// <summary>Conversions from the task world's chats.</summary>
public static class TaskExampleChatExtensions
{
    /// <summary><see cref="TaskExample.ToChat"/> as <see cref="ChatMessage"/>s (instruction, data, then the answer when
    /// <paramref name="includeAnswer"/>).</summary>
    public static IReadOnlyList<ChatMessage> ToChatMessages(this TaskExample example, bool includeAnswer = true) =>
        ChatMessage.FromPairs(example.ToChat(includeAnswer));
}
