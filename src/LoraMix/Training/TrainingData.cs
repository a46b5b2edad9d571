using LoraMix.Data;
using LoraMix.Tokenization;

namespace LoraMix.Training;

/// <summary>A dataset record with the training example it rendered to.</summary>
public sealed record RenderedRecord(DatasetRecord Record, TrainingExample Example);

/// <summary>
/// Turns dataset records into training examples with the one chat renderer: conversations are rendered with the chat
/// template and take their loss mask from <see cref="RenderedChat.LossMask"/> (assistant content and its end-of-turn
/// token), or every token with <c>train_on_prompt</c>, and their privilege labels from <see cref="RenderedChat.Privileges"/>
/// (for <c>router_policy: privileged</c>); plain texts are encoded with BOS (when the tokenizer's config adds
/// one) and EOS (when the tokenizer has one), every token a target.
/// </summary>
public static class TrainingData
{
    /// <summary>One record as a training example; throws <see cref="LoraMixException"/> when it cannot be rendered.</summary>
    public static TrainingExample FromRecord(DatasetRecord record, ChatRenderer renderer, bool trainOnPrompt = false)
    {
        ArgumentNullException.ThrowIfNull(record);
        ArgumentNullException.ThrowIfNull(renderer);
        if (record.Messages is { } messages)
        {
            var rendered = renderer.Render(messages);
            bool[] mask = trainOnPrompt ? Enumerable.Repeat(true, rendered.Length).ToArray() : rendered.LossMask;
            return new TrainingExample(rendered.Ids, mask, rendered.Privileges);
        }
        var tok = renderer.Tokenizer;
        var ids = new List<int>();
        if (tok.AddBosToken && tok.BosId is int bos) ids.Add(bos);
        tok.EncodeInto(record.Text ?? "", parseSpecialTokens: false, ids);
        if (tok.EosId is int eos) ids.Add(eos);
        if (ids.Count < 2) throw new LoraMixException("the text encodes to fewer than 2 tokens, so there is nothing to predict");
        return TrainingExample.AllTargets([.. ids]);
    }

    /// <summary>
    /// Renders every record; a record that fails is an error naming <paramref name="source"/> and its line, or, with
    /// <paramref name="skipBad"/>, is skipped and its message added to <paramref name="skipped"/>.
    /// </summary>
    public static List<RenderedRecord> FromRecords(IReadOnlyList<DatasetRecord> records, ChatRenderer renderer, bool trainOnPrompt,
        bool skipBad, string source, List<string> skipped)
    {
        ArgumentNullException.ThrowIfNull(records);
        var list = new List<RenderedRecord>(records.Count);
        foreach (var r in records)
        {
            try
            {
                list.Add(new RenderedRecord(r, FromRecord(r, renderer, trainOnPrompt)));
            }
            catch (LoraMixException e) when (e is not DatasetFileException)
            {
                var bad = new DatasetFileException(source, r.Line, e.Message, e);
                if (!skipBad) throw bad;
                skipped.Add(bad.Message);
            }
        }
        return list;
    }
}
