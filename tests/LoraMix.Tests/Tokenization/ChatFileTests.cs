using System.Text.Json;
using LoraMix.Data;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>Chat files, roles and privileges.</summary>
public sealed class ChatFileTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("loramix-chat-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string json)
    {
        string path = Path.Combine(_dir, $"chat{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        return path;
    }

    [Fact]
    public void Loads_an_array_of_role_content_objects()
    {
        var chat = ChatFile.Load(Write("""
            [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"content": "D", "role": "data"},
             {"role": "tool", "content": "T"}, {"role": "assistant", "content": ""}]
            """));
        Assert.Equal([ChatMessage.System("S"), ChatMessage.User("U"), ChatMessage.Data("D"), ChatMessage.Tool("T"), ChatMessage.Assistant("")], chat);
        Assert.Equal(chat, ChatFile.Load(Write("""{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"content": "D", "role": "data"}, {"role": "tool", "content": "T"}, {"role": "assistant", "content": ""}]}""")));
    }

    [Theory]
    [InlineData("""[{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}]""", 1, "developer")]
    [InlineData("""[{"role": "User", "content": "a"}]""", 0, "User")]
    [InlineData("""[{"role": "user"}]""", 0, "content")]
    [InlineData("""[{"content": "x"}]""", 0, "role")]
    [InlineData("""[{"role": "user", "content": 3}]""", 0, "content")]
    [InlineData("""[{"role": "user", "content": "a"}, "b"]""", 1, "object")]
    [InlineData("""[{"role": "user", "content": "a", "name": "x"}]""", 0, "name")]
    public void Bad_messages_name_the_file_the_index_and_the_expected_roles(string json, int index, string mentioned)
    {
        string path = Write(json);
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(path));
        Assert.Equal(path, e.FilePath);
        Assert.Equal(index, e.MessageIndex);
        Assert.Contains(path, e.Message);
        Assert.Contains($"message {index}", e.Message);
        Assert.Contains(mentioned, e.Message);
        if (mentioned is "developer" or "User" or "role")
            Assert.Contains("system, user, assistant, tool, data", e.Message);
        Assert.IsAssignableFrom<LoraMixException>(e);
    }

    [Theory]
    [InlineData("""{"role": "user", "content": "a"}""")]
    [InlineData("[]")]
    [InlineData("not json")]
    public void Bad_files_name_the_file(string json)
    {
        string path = Write(json);
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(path));
        Assert.Null(e.MessageIndex);
        Assert.StartsWith(path, e.Message);
    }

    [Fact]
    public void A_missing_file_is_a_chat_file_error()
    {
        var e = Assert.Throws<ChatFileException>(() => ChatFile.Load(Path.Combine(_dir, "absent.json")));
        Assert.Contains("absent.json", e.Message);
    }

    [Fact]
    public void Roles_parse_exactly_and_unknown_roles_fail_with_a_typed_error()
    {
        foreach (string name in ChatRoles.Names) Assert.Equal(name, ChatRoles.Parse(name).ToName());
        var e = Assert.Throws<UnknownChatRoleException>(() => ChatMessage.Create("function", "x"));
        Assert.Equal("function", e.Role);
        Assert.Equal(ChatRoles.Names, e.ExpectedRoles);
        Assert.Equal(ChatMessage.Tool("x"), ChatMessage.Create("tool", "x"));
    }

    [Fact]
    public void Privileges_compare_like_the_hierarchy_and_serialise_lowercase()
    {
        Assert.True(Privilege.Untrusted < Privilege.Assistant && Privilege.Assistant < Privilege.User && Privilege.User < Privilege.System);
        Assert.Equal([0, 1, 2, 3], new[] { Privilege.Untrusted, Privilege.Assistant, Privilege.User, Privilege.System }.Select(p => (int)p));
        Assert.Equal("\"untrusted\"", JsonSerializer.Serialize(Privilege.Untrusted));
        Assert.Equal("\"system\"", JsonSerializer.Serialize(Privilege.System));
        Assert.Equal(Privilege.User, JsonSerializer.Deserialize<Privilege>("\"user\""));
        Assert.Equal("\"data\"", JsonSerializer.Serialize(ChatRole.Data));
        Assert.Equal(Privilege.Untrusted, ChatMessage.Tool("x").Privilege);
        Assert.Equal(Privilege.Untrusted, ChatMessage.Data("x").Privilege);
        Assert.Equal(Privilege.Assistant, ChatMessage.Assistant("x").Privilege);
        Assert.Equal(Privilege.Assistant, ChatRoles.ParsePrivilege("assistant"));
        Assert.Throws<LoraMixException>(() => ChatRoles.ParsePrivilege("root"));
    }

    [Fact]
    public void Task_world_chats_convert_to_messages()
    {
        var example = new TaskExample("upper", "Uppercase the data.", "abc", "ABC", InstructionPlacement.System);
        Assert.Equal([ChatMessage.System("Uppercase the data."), ChatMessage.Data("abc"), ChatMessage.Assistant("ABC")], example.ToChatMessages());
        var user = example with { Placement = InstructionPlacement.User };
        Assert.Equal([ChatMessage.User("Uppercase the data."), ChatMessage.Data("abc")], user.ToChatMessages(includeAnswer: false));
    }
}
