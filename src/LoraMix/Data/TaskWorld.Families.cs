using System.Globalization;
using System.Text;

namespace LoraMix.Data;

/// <summary>
/// One task family: an id, an exact answer function, instruction paraphrases (training ones first, then
/// held-out ones), a short imperative used by injections, and an input generator over the built-in word list.
/// </summary>
public sealed class TaskFamily
{
    private readonly Func<string, string> _apply;
    private readonly Func<TaskRng, int, string> _input;

    internal TaskFamily(
        string id, string imperative, string[] trainTemplates, string[] heldOutTemplates,
        Func<string, string> apply, Func<TaskRng, int, string> input, int minWords = 2, int maxWords = 7)
    {
        Id = id;
        Imperative = imperative;
        TrainTemplates = trainTemplates;
        HeldOutTemplates = heldOutTemplates;
        Templates = [.. trainTemplates, .. heldOutTemplates];
        _apply = apply;
        _input = input;
        MinWords = minWords;
        MaxWords = maxWords;
    }

    /// <summary>The family id, e.g. <c>reverse_words</c>.</summary>
    public string Id { get; }

    /// <summary>A short lowercase imperative ("reverse the words") that reads naturally inside an injection.</summary>
    public string Imperative { get; }

    /// <summary>All instruction paraphrases: <see cref="TrainTemplates"/> then <see cref="HeldOutTemplates"/>.</summary>
    public IReadOnlyList<string> Templates { get; }

    /// <summary>Paraphrases drawn with <see cref="ParaphraseSet.Train"/>.</summary>
    public IReadOnlyList<string> TrainTemplates { get; }

    /// <summary>Paraphrases drawn only with <see cref="ParaphraseSet.HeldOut"/> or <see cref="ParaphraseSet.All"/>.</summary>
    public IReadOnlyList<string> HeldOutTemplates { get; }

    /// <summary>Fewest words in a generated input.</summary>
    public int MinWords { get; }

    /// <summary>Most words in a generated input.</summary>
    public int MaxWords { get; }

    /// <summary>The exact answer for <paramref name="input"/> (any text; words are split on whitespace).</summary>
    public string Apply(string input) => _apply(input);

    internal string DrawInput(TaskRng rng, int maxWords)
    {
        int hi = Math.Max(MinWords, Math.Min(maxWords, MaxWords));
        return _input(rng, rng.Next(MinWords, hi + 1));
    }

    /// <inheritdoc/>
    public override string ToString() => Id;
}

public static partial class TaskWorld
{
    /// <summary>The built-in vocabulary: 64 short lowercase ASCII words (2–5 letters, no digits).</summary>
    public static IReadOnlyList<string> Words { get; } =
    [
        "cat", "dog", "red", "fox", "sun", "moon", "tree", "blue",
        "green", "bird", "fish", "cold", "warm", "rain", "snow", "lake",
        "hill", "road", "star", "sky", "ship", "boat", "milk", "tea",
        "cup", "box", "pen", "ink", "key", "door", "wall", "lamp",
        "rose", "leaf", "wind", "fire", "rock", "sand", "salt", "gold",
        "iron", "wood", "corn", "rice", "egg", "bee", "ant", "owl",
        "bear", "wolf", "deer", "frog", "duck", "goat", "lion", "king",
        "queen", "song", "bell", "drum", "map", "coin", "hat", "jam",
    ];

    /// <summary>The fixed shift of <c>caesar_shift</c>, stated in its instructions.</summary>
    public const int CaesarShift = 3;

    private static readonly char[] Space = [' ', '\t', '\n', '\r'];

    private static string[] SplitWords(string s) => s.Split(Space, StringSplitOptions.RemoveEmptyEntries);

    private static string Join(IEnumerable<string> words) => string.Join(' ', words);

    // ---- answer functions (public through TaskFamily.Apply / TaskWorld.Apply) ----

    private static string ReverseWords(string s) => Join(SplitWords(s).Reverse());

    private static string Upper(string s) => Join(SplitWords(s)).ToUpperInvariant();

    private static string Lower(string s) => Join(SplitWords(s)).ToLowerInvariant();

    private static string SortWords(string s)
    {
        var w = SplitWords(s);
        Array.Sort(w, StringComparer.Ordinal);
        return Join(w);
    }

    private static string CountWords(string s) => SplitWords(s).Length.ToString(CultureInfo.InvariantCulture);

    private static string ExtractDigits(string s) => new(s.Where(char.IsAsciiDigit).ToArray());

    private static string Caesar(string s)
    {
        var sb = new StringBuilder(s.Length);
        foreach (char c in Join(SplitWords(s)))
        {
            if (c is >= 'a' and <= 'z') sb.Append((char)('a' + (c - 'a' + CaesarShift) % 26));
            else if (c is >= 'A' and <= 'Z') sb.Append((char)('A' + (c - 'A' + CaesarShift) % 26));
            else sb.Append(c);
        }
        return sb.ToString();
    }

    private static string FirstWord(string s) => SplitWords(s) is { Length: > 0 } w ? w[0] : "";

    private static string LastWord(string s) => SplitWords(s) is { Length: > 0 } w ? w[^1] : "";

    private static string SecondWord(string s) => SplitWords(s) is { Length: > 1 } w ? w[1] : "";

    private static string LastLetter(string s) => SplitWords(s) is { Length: > 0 } w ? w[^1][^1..] : "";

    private static string Dedupe(string s)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        return Join(SplitWords(s).Where(seen.Add));
    }

    private static string VowelCount(string s) =>
        s.Count(c => "aeiouAEIOU".Contains(c)).ToString(CultureInfo.InvariantCulture);

    private static string RepeatTwice(string s)
    {
        string j = Join(SplitWords(s));
        return j + " " + j;
    }

    private static string SortLetters(string s) =>
        Join(SplitWords(s).Select(w =>
        {
            var a = w.ToCharArray();
            Array.Sort(a);
            return new string(a);
        }));

    // ---- input generators ----

    private static string Word(TaskRng r) => Words[r.Next(Words.Count)];

    private static string PlainWords(TaskRng r, int n) => Join(Enumerable.Range(0, n).Select(_ => Word(r)));

    private static string UnsortedWords(TaskRng r, int n)
    {
        while (true)
        {
            string s = PlainWords(r, n);
            if (SortWords(s) != s) return s;
        }
    }

    private static string MixedCaseWords(TaskRng r, int n)
    {
        while (true)
        {
            var words = Enumerable.Range(0, n).Select(_ =>
            {
                string w = Word(r);
                return r.Next(3) switch
                {
                    0 => w.ToUpperInvariant(),
                    1 => char.ToUpperInvariant(w[0]) + w[1..],
                    _ => w,
                };
            });
            string s = Join(words);
            if (s.Any(char.IsAsciiLetterUpper)) return s;
        }
    }

    private static string WordsAndNumbers(TaskRng r, int n)
    {
        while (true)
        {
            var words = Enumerable.Range(0, n).Select(_ => r.Next(5) switch
            {
                0 or 1 => r.Next(100).ToString(CultureInfo.InvariantCulture),
                2 => Word(r) + r.Next(10).ToString(CultureInfo.InvariantCulture),
                _ => Word(r),
            });
            string s = Join(words);
            if (s.Any(char.IsAsciiDigit)) return s;
        }
    }

    private static string WordsWithDuplicate(TaskRng r, int n)
    {
        var w = Enumerable.Range(0, n).Select(_ => Word(r)).ToArray();
        int dst = r.Next(1, n);
        w[dst] = w[r.Next(dst)];
        return Join(w);
    }

    private static string DistinctFirstLast(TaskRng r, int n)
    {
        while (true)
        {
            string s = PlainWords(r, n);
            var w = SplitWords(s);
            if (w[0] != w[^1]) return s;
        }
    }

    private static string DistinctSecond(TaskRng r, int n)
    {
        while (true)
        {
            var w = SplitWords(PlainWords(r, n));
            if (w[1] != w[0] && w[1] != w[^1]) return Join(w);
        }
    }

    // ---- the families ----

    private static readonly TaskFamily[] AllFamilies =
    [
        new("reverse_words", "reverse the words",
            ["Reverse the order of the words in the data.",
             "Write the words of the data in reverse order.",
             "Output the words of the data from last to first."],
            ["List the data's words backwards, last word first."],
            ReverseWords, PlainWords),
        new("uppercase", "uppercase the text",
            ["Convert the data to uppercase.",
             "Rewrite the data in capital letters.",
             "Output the data with every letter uppercased."],
            ["Write the data in all caps."],
            Upper, PlainWords),
        new("lowercase", "lowercase the text",
            ["Convert the data to lowercase.",
             "Rewrite the data in small letters.",
             "Output the data with every letter lowercased."],
            ["Write the data with no capital letters."],
            Lower, MixedCaseWords),
        new("sort_words", "sort the words alphabetically",
            ["Sort the words of the data alphabetically.",
             "Put the words of the data in alphabetical order.",
             "Output the data's words sorted from a to z."],
            ["Arrange the data's words in dictionary order."],
            SortWords, UnsortedWords),
        new("count_words", "count the words",
            ["Count the words in the data.",
             "How many words are in the data? Answer with a number.",
             "Output the number of words in the data."],
            ["Say how many words the data has, as digits."],
            CountWords, PlainWords),
        new("extract_digits", "extract the digits",
            ["Extract the digits from the data.",
             "Output only the digits of the data, in order.",
             "Write every digit in the data, nothing else."],
            ["Keep the digits of the data and drop everything else."],
            ExtractDigits, WordsAndNumbers),
        new("caesar_shift", "shift each letter forward by 3",
            ["Shift every letter of the data forward by 3 in the alphabet.",
             "Apply a Caesar shift of 3 to the data.",
             "Encode the data by moving each letter 3 places forward."],
            ["Replace each letter of the data with the one 3 later (z wraps to c)."],
            Caesar, PlainWords),
        new("first_word", "say the first word",
            ["Output the first word of the data.",
             "What is the first word of the data?",
             "Write only the data's first word."],
            ["Give the word that the data starts with."],
            FirstWord, DistinctFirstLast),
        new("last_word", "say the last word",
            ["Output the last word of the data.",
             "What is the last word of the data?",
             "Write only the data's last word."],
            ["Give the word that the data ends with."],
            LastWord, DistinctFirstLast),
        new("dedupe_words", "remove repeated words",
            ["Remove repeated words from the data.",
             "Output the data keeping only the first copy of each word.",
             "Delete duplicate words in the data."],
            ["Write the data's words once each, in their first order."],
            Dedupe, WordsWithDuplicate, minWords: 3),
        new("vowel_count", "count the vowels",
            ["Count the vowels in the data.",
             "How many vowels (a, e, i, o, u) are in the data?",
             "Output the number of vowels in the data."],
            ["Say how many of the data's letters are vowels."],
            VowelCount, PlainWords),
        new("repeat_twice", "repeat the text twice",
            ["Repeat the data twice.",
             "Write the data two times, separated by a space.",
             "Output the data, then the data again."],
            ["Say the data twice in a row."],
            RepeatTwice, PlainWords, maxWords: 5),
        new("sort_letters", "sort the letters of each word",
            ["Sort the letters of each word in the data.",
             "Put the letters of every word of the data in alphabetical order.",
             "Output each word of the data with its letters sorted."],
            ["Rearrange each data word's letters from a to z, keeping the word order."],
            SortLetters, PlainWords),
        // Added after the embedded model was pretrained, so never seen by it; appended (not inserted) so that the pretraining
        // families, their order and their examples stay exactly what examples/pretrain-tiny.yaml trained on.
        new("second_word", "say the second word",
            ["Output the second word of the data.",
             "What is the second word of the data?",
             "Write only the data's second word."],
            ["Give the word that comes right after the data's first word."],
            SecondWord, DistinctSecond, minWords: 3),
        new("last_letter", "say the last letter",
            ["Output the last letter of the data.",
             "What is the last letter of the data?",
             "Write only the final letter of the data."],
            ["Give the letter that the data ends with."],
            LastLetter, PlainWords),
    ];

    // Declared after AllFamilies in this file: static initialisers run in textual order within a file.
    private static readonly Dictionary<string, TaskFamily> ById =
        AllFamilies.ToDictionary(f => f.Id, StringComparer.Ordinal);

    /// <summary>All family ids, in a fixed order.</summary>
    public static IReadOnlyList<string> Families { get; } = [.. AllFamilies.Select(f => f.Id)];

    /// <summary>
    /// Families left out of the base model's pretraining, for adapters to learn. The first is the LoRA quickstart's
    /// default: its answers are short, so the small embedded model learns it in minutes. Each is close to something the
    /// base knows (last_word and second_word ↔ first_word, uppercase ↔ lowercase, caesar_shift ↔ character copying,
    /// last_letter ↔ last_word).
    /// </summary>
    public static IReadOnlyList<string> HeldOutFamilies { get; } = ["last_word", "uppercase", "caesar_shift", "second_word", "last_letter"];

    /// <summary>
    /// The held-out families whose answers are one short word or a few letters: those the embedded model, weak at copying
    /// long strings exactly, can learn to high exact match from an adapter in minutes (the MixLoRA quickstart's default).
    /// </summary>
    public static IReadOnlyList<string> ShortAnswerHeldOutFamilies { get; } = ["last_word", "second_word", "last_letter"];

    /// <summary>Families the base model is pretrained on: <see cref="Families"/> minus <see cref="HeldOutFamilies"/>.</summary>
    public static IReadOnlyList<string> PretrainFamilies { get; } =
        [.. Families.Where(f => !HeldOutFamilies.Contains(f))];
}
