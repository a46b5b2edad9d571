using LoraMix.Tokenization;

namespace LoraMix.Tests.Tokenization;

/// <summary>The templates against the transformers.js goldens, and the labels they produce.</summary>
public sealed class ChatTemplateTests
{
    // ------------------------------------------------------------------ goldens

    [TokenizerFact]
    public void Llama3_matches_every_golden_case() => CheckGoldens("llama3", "llama3", ChatTemplate.Llama3);

    [TokenizerFact]
    public void ChatML_matches_every_golden_case() => CheckGoldens("chatml", "qwen", ChatTemplate.ChatML);

    [TokenizerFact]
    public void Qwen25_template_with_default_system_prompt_matches_every_golden_case() =>
        CheckGoldens("qwen2_5", "qwen", template: null);

    [TokenizerFact]
    public void Mistral_matches_every_golden_case() => CheckGoldens("mistral", "mistral", ChatTemplate.Mistral);

    [TokenizerFact]
    public void Llama2_matches_every_golden_case() => CheckGoldens("llama2", "llama2", ChatTemplate.Llama2);

    private static void CheckGoldens(string golden, string fixture, ChatTemplate? template)
    {
        var g = ChatGoldenFile.Load(golden);
        var tok = TokenizerFixtures.Load(fixture);
        template ??= ChatTemplate.Detect(g.HfChatTemplate) ?? throw new InvalidOperationException("not detected");
        var renderer = new ChatRenderer(tok, template);
        Assert.NotEmpty(g.Cases);
        foreach (var c in g.Cases)
        {
            var r = renderer.Render(c.Messages, new ChatRenderOptions { AddGenerationPrompt = c.AddGenerationPrompt });
            try
            {
                Assert.Equal(c.Text, r.Text);
                ChatLabelChecks.AssertWellFormed(r);
                bool tagged = c.Messages.Any(m => m.Role == ChatRole.Data
                    || (m.Role == ChatRole.Tool && template.Family != ChatTemplateFamily.Llama3));
                if (!tagged)
                {
                    Assert.Equal(tok.Encode(c.Text), r.Ids);
                    if (c.Ids is not null) Assert.Equal(c.Ids, r.Ids);
                }
                else
                {
                    // Untrusted content in tags keeps its boundaries (docs: "}\n" is not merged), so only the parts
                    // before the first untrusted token and the generation prompt are compared with the golden ids.
                    Assert.NotNull(c.Ids);
                    int first = r.FirstUntrustedPosition;
                    Assert.True(first > 0);
                    Assert.Equal(c.Ids[..first], r.Ids[..first]);
                    int tail = r.MessageIndices.Reverse().TakeWhile(m => m == -1).Count();
                    Assert.True(tail > 0);
                    Assert.Equal(c.Ids[^tail..], r.Ids[^tail..]);
                    Assert.Equal(c.Text, ChatLabelChecks.Spell(tok, r.Ids));
                }
                CheckContentAndLoss(tok, template.Family, r);
            }
            catch (Exception e) when (e is not ArgumentException)
            {
                throw new Xunit.Sdk.XunitException($"{golden}/{c.Name}: {e.Message}");
            }
        }
    }

    /// <summary>Each message's content tokens spell its (rendered) text, carry its privilege, and the loss covers
    /// exactly the assistant content and the closing end-of-turn token(s).</summary>
    internal static void CheckContentAndLoss(TextTokenizer tok, ChatTemplateFamily family, RenderedChat r)
    {
        var msgs = r.Messages;
        int expectedLoss = 0;
        for (int i = 0; i < msgs.Count; i++)
        {
            var (start, end) = ChatLabelChecks.ContentSpan(r, i);
            bool firstInBlock = family switch
            {
                ChatTemplateFamily.Mistral => i == 0 || msgs[i].Role == ChatRole.Assistant || msgs[i - 1].Role == ChatRole.Assistant,
                ChatTemplateFamily.Llama2 => msgs[i].Role == ChatRole.User && (i == 0 || msgs[i - 1].Role == ChatRole.Assistant),
                _ => false,
            };
            bool lastInBlock = i == msgs.Count - 1 || msgs[i + 1].Role == ChatRole.Assistant;
            string expected = ChatLabelChecks.ExpectedSpanText(family, msgs[i], firstInBlock, lastInBlock);
            Assert.Equal(expected, ChatLabelChecks.RawText(tok, r.Ids.AsSpan(start, end - start)));
            for (int k = start; k < end; k++) Assert.Equal(msgs[i].Privilege, r.Privileges[k]);
            if (msgs[i].Role != ChatRole.Assistant) continue;

            for (int k = start; k < end; k++) Assert.True(r.LossMask[k]);
            int closing = family switch { ChatTemplateFamily.Plain => 0, ChatTemplateFamily.Llama2 => 2, _ => 1 };
            for (int k = end; k < end + closing; k++)
            {
                Assert.True(r.LossMask[k], $"closing token {k} of assistant message {i} has no loss");
                Assert.Equal(i, r.MessageIndices[k]);
                Assert.False(r.IsContent[k]);
            }
            if (closing > 0)
            {
                string eot = family switch
                {
                    ChatTemplateFamily.Llama3 => "<|eot_id|>",
                    ChatTemplateFamily.ChatML => "<|im_end|>",
                    _ => tok.EosToken!,
                };
                Assert.Equal(tok.SpecialTokens[eot], r.Ids[end + closing - 1]);
            }
            expectedLoss += end - start + closing;
        }
        Assert.Equal(expectedLoss, r.LossTokenCount);
    }

    // ------------------------------------------------------------------ labels

    [TokenizerFact]
    public void Loss_options_select_all_last_or_no_assistant_turn()
    {
        var renderer = new ChatRenderer(TokenizerFixtures.Load("llama3"), ChatTemplate.Llama3);
        ChatMessage[] chat = [ChatMessage.User("One?"), ChatMessage.Assistant("1"), ChatMessage.User("Two?"), ChatMessage.Assistant("2")];
        var all = renderer.Render(chat);
        var last = renderer.Render(chat, new ChatRenderOptions { Loss = ChatLoss.LastAssistantTurn });
        var none = renderer.Render(chat, new ChatRenderOptions { Loss = ChatLoss.None });
        Assert.Equal(all.Ids, last.Ids);
        Assert.Equal(all.Ids, none.Ids);
        // "1" + <|eot_id|> and "2" + <|eot_id|>
        Assert.Equal(4, all.LossTokenCount);
        Assert.Equal(2, last.LossTokenCount);
        Assert.Equal(0, none.LossTokenCount);
        for (int i = 0; i < last.Length; i++)
            Assert.Equal(last.LossMask[i], all.LossMask[i] && all.MessageIndices[i] == 3);
    }

    [TokenizerFact]
    public void Llama3_bos_belongs_to_the_first_header_and_the_generation_prompt_to_no_message()
    {
        var tok = TokenizerFixtures.Load("llama3");
        var r = new ChatRenderer(tok, ChatTemplate.Llama3).Render(
            [ChatMessage.System("S"), ChatMessage.Data("doc"), ChatMessage.User("Q")], ChatRenderOptions.Inference);
        Assert.Equal(tok.BosId, r.Ids[0]);
        Assert.Single(r.Ids, tok.BosId!.Value);
        Assert.Equal(0, r.MessageIndices[0]);
        Assert.Equal(Privilege.System, r.Privileges[0]);
        // Generation prompt: <|start_header_id|>assistant<|end_header_id|>\n\n
        Assert.Equal([-1, -1, -1, -1], r.MessageIndices[^4..]);
        Assert.All(r.Privileges[^4..], p => Assert.Equal(Privilege.System, p));
        // The data turn is a user turn whose header, <data> tags and end of turn are template text labelled untrusted
        // with the document: the freeze starts at the turn's header, even when the document is empty.
        Assert.EndsWith("<|start_header_id|>user<|end_header_id|>\n\n<data>\ndoc\n</data><|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", r.Text);
        var (s, e) = ChatLabelChecks.ContentSpan(r, 1);
        Assert.Equal("doc", ChatLabelChecks.RawText(tok, r.Ids.AsSpan(s, e - s)));
        int header = Array.IndexOf(r.MessageIndices, 1);
        int end = Array.LastIndexOf(r.MessageIndices, 1) + 1;
        Assert.Equal("<|start_header_id|>", tok.TokenPiece(r.Ids[header]));
        Assert.Equal("<|eot_id|>", tok.TokenPiece(r.Ids[end - 1]));
        Assert.Equal(header, r.FirstUntrustedPosition);
        Assert.All(r.Privileges[header..end], p => Assert.Equal(Privilege.Untrusted, p));
        Assert.Equal(end - header, r.Privileges.Count(p => p == Privilege.Untrusted));
        Assert.Equal(new Range(s, e), r.ContentRange(1));
    }

    [TokenizerFact]
    public void Mistral_leading_bos_has_no_message_and_the_space_after_INST_is_content()
    {
        var tok = TokenizerFixtures.Load("mistral");
        var r = new ChatRenderer(tok, ChatTemplate.Mistral).Render([ChatMessage.User("Hello!")]);
        Assert.Equal(tok.BosId, r.Ids[0]);
        Assert.Equal(-1, r.MessageIndices[0]);
        var (s, _) = ChatLabelChecks.ContentSpan(r, 0);
        Assert.Equal("▁Hello", tok.TokenPiece(r.Ids[s]));
        Assert.Equal(Privilege.User, r.Privileges[s]);
    }

    [TokenizerFact]
    public void Default_system_prompt_is_template_text_of_no_message()
    {
        var tok = TokenizerFixtures.Load("qwen");
        var renderer = new ChatRenderer(tok, ChatTemplate.ChatML.WithDefaultSystemPrompt(ChatTemplate.Qwen25DefaultSystemPrompt));
        var r = renderer.Render([ChatMessage.User("Hi")], ChatRenderOptions.Inference);
        Assert.StartsWith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi", r.Text);
        int firstUser = Array.IndexOf(r.MessageIndices, 0);
        Assert.True(firstUser > 10);
        for (int i = 0; i < firstUser; i++)
        {
            Assert.Equal(-1, r.MessageIndices[i]);
            Assert.Equal(Privilege.System, r.Privileges[i]);
            Assert.False(r.IsContent[i]);
        }
        // With a system message of its own, no default is inserted.
        var own = renderer.Render([ChatMessage.System("S"), ChatMessage.User("Hi")]);
        Assert.StartsWith("<|im_start|>system\nS<|im_end|>\n", own.Text);
    }

    [TokenizerFact]
    public void Special_tokens_in_trusted_content_are_text_unless_asked_and_never_in_untrusted_content()
    {
        var tok = TokenizerFixtures.Load("llama3");
        var renderer = new ChatRenderer(tok, ChatTemplate.Llama3);
        int eot = tok.SpecialTokens["<|eot_id|>"];
        ChatMessage[] chat = [ChatMessage.User("a<|eot_id|>b"), ChatMessage.Tool("c<|eot_id|>d")];

        var plain = renderer.Render(chat);
        Assert.Equal(2, plain.Ids.Count(id => id == eot)); // the two turn ends only

        var parsed = renderer.Render(chat, new ChatRenderOptions { ParseSpecialTokensInTrustedContent = true });
        Assert.Equal(3, parsed.Ids.Count(id => id == eot));
        var (us, ue) = ChatLabelChecks.ContentSpan(parsed, 0);
        int inUser = Array.IndexOf(parsed.Ids, eot, us, ue - us);
        Assert.True(inUser >= 0);
        Assert.Equal(Privilege.User, parsed.Privileges[inUser]);
        Assert.True(parsed.IsContent[inUser]);
        var (ts, te) = ChatLabelChecks.ContentSpan(parsed, 1);
        Assert.DoesNotContain(eot, parsed.Ids[ts..te]);
        Assert.Equal(tok.Encode(parsed.Text)[..ue], parsed.Ids[..ue]);
    }

    [TokenizerFact]
    public void Label_rows_give_id_piece_privilege_name_and_loss()
    {
        var tok = TokenizerFixtures.Load("llama3");
        var r = new ChatRenderer(tok, ChatTemplate.Llama3).Render([ChatMessage.User("Hi"), ChatMessage.Data("x"), ChatMessage.Assistant("Yo")]);
        var rows = r.ToLabelRows();
        Assert.Equal(r.Length, rows.Count);
        for (int i = 0; i < rows.Count; i++)
        {
            Assert.Equal(i, rows[i].Position);
            Assert.Equal(r.Ids[i], rows[i].Id);
            Assert.Equal(tok.TokenPiece(r.Ids[i]), rows[i].Piece);
            Assert.Equal(r.Privileges[i].ToName(), rows[i].PrivilegeName);
            Assert.Equal(r.LossMask[i], rows[i].Loss);
        }
        Assert.Contains(rows, x => x.PrivilegeName == "untrusted");
        Assert.Contains(rows, x => x.Piece == "<|begin_of_text|>" && x.PrivilegeName == "system");
    }

    // ------------------------------------------------------------------ [INST] families

    [TokenizerFact]
    public void Inst_families_reject_what_the_hugging_face_templates_reject()
    {
        foreach (var (fixture, template) in new[] { ("mistral", ChatTemplate.Mistral), ("llama2", ChatTemplate.Llama2) })
        {
            var renderer = new ChatRenderer(TokenizerFixtures.Load(fixture), template);
            AssertRejects(renderer, 0, ChatMessage.Assistant("a"));
            AssertRejects(renderer, 1, ChatMessage.System("s"), ChatMessage.Assistant("a"));
            AssertRejects(renderer, 4, ChatMessage.User("u"), ChatMessage.Assistant("a"), ChatMessage.Data("d"), ChatMessage.Assistant("b"), ChatMessage.Assistant("c"));
            AssertRejects(renderer, 2, ChatMessage.User("u"), ChatMessage.Assistant("a"), ChatMessage.Assistant("b"));
            AssertRejects(renderer, 1, ChatMessage.User("u"), ChatMessage.System("s"));
            Assert.Throws<ChatTemplateException>(() => renderer.Render([]));
        }
    }

    private static void AssertRejects(ChatRenderer renderer, int index, params ChatMessage[] chat)
    {
        var e = Assert.Throws<ChatTemplateException>(() => renderer.Render(chat));
        Assert.Equal(index, e.MessageIndex);
        Assert.Equal(renderer.Template.Name, e.Template);
        Assert.Contains($"message {index}", e.Message);
    }

    [TokenizerFact]
    public void Inst_families_render_a_lone_system_message_and_group_user_tool_data_into_one_block()
    {
        var mistral = new ChatRenderer(TokenizerFixtures.Load("mistral"), ChatTemplate.Mistral);
        var llama2 = new ChatRenderer(TokenizerFixtures.Load("llama2"), ChatTemplate.Llama2);
        Assert.Equal("<s> [INST] Be brief. [/INST]", mistral.Render([ChatMessage.System("Be brief.")]).Text);
        Assert.Equal("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>> [/INST]", llama2.Render([ChatMessage.System("Be brief.")]).Text);

        ChatMessage[] chat = [ChatMessage.System("S"), ChatMessage.User("Summarise:"), ChatMessage.Data("doc "), ChatMessage.Tool("t"),
            ChatMessage.Assistant("ok"), ChatMessage.Data(" d2 ")];
        Assert.Equal("<s> [INST] S\n\nSummarise:\n\n<data>\ndoc \n</data>\n\n<tool_response>\nt\n</tool_response> [/INST] ok</s>" +
                     " [INST] <data>\n d2 \n</data> [/INST]", mistral.Render(chat).Text);
        Assert.Equal("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nSummarise:\n\n<data>\ndoc \n</data>\n\n<tool_response>\nt\n</tool_response> [/INST] ok </s>" +
                     "<s>[INST] <data>\n d2 \n</data> [/INST]", llama2.Render(chat).Text);
        foreach (var r in new[] { mistral.Render(chat), llama2.Render(chat) })
        {
            ChatLabelChecks.AssertWellFormed(r);
        }
    }

    // ------------------------------------------------------------------ selection

    [Fact]
    public void Parse_accepts_the_five_names_case_insensitively_and_names_them_when_unknown()
    {
        foreach (string name in ChatTemplate.Names) Assert.Equal(name, ChatTemplate.Parse(name.ToUpperInvariant()).Name);
        var e = Assert.Throws<ChatTemplateException>(() => ChatTemplate.Parse("vicuna"));
        foreach (string name in ChatTemplate.Names) Assert.Contains(name, e.Message);
        Assert.IsAssignableFrom<LoraMixException>(e);
    }

    [Fact]
    public void Detect_recognises_every_golden_template()
    {
        Assert.Equal(ChatTemplate.Llama3, ChatTemplate.Detect(ChatGoldenFile.Load("llama3").HfChatTemplate));
        Assert.Equal(ChatTemplate.Llama2, ChatTemplate.Detect(ChatGoldenFile.Load("llama2").HfChatTemplate));
        Assert.Equal(ChatTemplate.Mistral, ChatTemplate.Detect(ChatGoldenFile.Load("mistral").HfChatTemplate));
        Assert.Equal(ChatTemplate.ChatML, ChatTemplate.Detect(ChatGoldenFile.Load("chatml").HfChatTemplate));
        var qwen25 = ChatTemplate.Detect(ChatGoldenFile.Load("qwen2_5").HfChatTemplate);
        Assert.Equal(ChatTemplateFamily.ChatML, qwen25!.Family);
        Assert.Equal(ChatTemplate.Qwen25DefaultSystemPrompt, qwen25.DefaultSystemPrompt);
        Assert.Null(ChatTemplate.Detect(null));
        Assert.Null(ChatTemplate.Detect(""));
        Assert.Null(ChatTemplate.Detect("{{ messages[0]['content'] }}"));
    }

    [Fact]
    public void Detect_picks_up_the_qwen2_default_system_prompt()
    {
        const string qwen2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        Assert.Equal("You are a helpful assistant.", ChatTemplate.Detect(qwen2)!.DefaultSystemPrompt);
    }

    [TokenizerFact]
    public void Renderer_detects_the_template_from_the_tokenizer_or_asks_for_one()
    {
        Assert.Equal(ChatTemplateFamily.ChatML, new ChatRenderer(TokenizerFixtures.Load("qwen")).Template.Family);
        Assert.Null(new ChatRenderer(TokenizerFixtures.Load("qwen")).Template.DefaultSystemPrompt); // Qwen3 has none
        Assert.Equal(ChatTemplateFamily.Llama3, new ChatRenderer(TokenizerFixtures.Load("llama3")).Template.Family);
        var e = Assert.Throws<ChatTemplateException>(() => new ChatRenderer(TokenizerFixtures.Load("mistral")));
        Assert.Contains("llama2", e.Message);
        Assert.Throws<ChatTemplateException>(() => new ChatRenderer(TokenizerFixtures.Load("llama2")));
        // A template whose tokens the vocabulary lacks is refused up front.
        var missing = Assert.Throws<ChatTemplateException>(() => new ChatRenderer(TokenizerFixtures.Load("mistral"), ChatTemplate.Llama3));
        Assert.Contains("<|start_header_id|>", missing.Message);
    }

    [Fact]
    public void Default_system_prompt_is_chatml_only()
    {
        Assert.Throws<ArgumentException>(() => new ChatTemplate(ChatTemplateFamily.Llama3, "x"));
        Assert.Equal("x", ChatTemplate.ChatML.WithDefaultSystemPrompt("x").DefaultSystemPrompt);
    }
}
