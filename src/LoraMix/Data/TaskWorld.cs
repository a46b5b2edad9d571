using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace LoraMix.Data;

/// <summary>
/// The task world: a deterministic generator of instruction-following tasks whose answers are exact
/// functions of their input, rendered as chats (instruction in <c>system</c> or <c>user</c>, input in an
/// untrusted <c>data</c> message), with disjoint train/test splits and prompt-injection variants.
/// See docs/TASK_WORLD.md.
/// </summary>
public static partial class TaskWorld
{
    /// <summary>Role string of the privileged system message.</summary>
    public const string SystemRole = "system";

    /// <summary>Role string of the user message.</summary>
    public const string UserRole = "user";

    /// <summary>Role string of the assistant (answer) message.</summary>
    public const string AssistantRole = "assistant";

    /// <summary>Role string of the untrusted data message.</summary>
    public const string DataRole = "data";

    /// <summary>Role string of an untrusted tool result (<see cref="TaskGenerateOptions.ToolFraction"/>).</summary>
    public const string ToolRole = "tool";

    /// <summary>Every clean example's <see cref="TaskExample.RenderedLength"/> is at most this.</summary>
    public const int MaxRenderedLength = 160;

    /// <summary>Every injected example's <see cref="TaskExample.RenderedLength"/> is at most this.</summary>
    public const int MaxInjectedRenderedLength = 300;

    /// <summary>An input is in the test split when <c>StableHash(input) % 100 &lt; TestPercent</c>.</summary>
    public const int TestPercent = 20;

    /// <summary>The family with this id.</summary>
    /// <exception cref="ArgumentException">Unknown id (the message lists the known ones).</exception>
    public static TaskFamily GetFamily(string id) =>
        ById.TryGetValue(id, out var f)
            ? f
            : throw new ArgumentException(
                $"Unknown task family '{id}'. Known families: {string.Join(", ", Families)}.", nameof(id));

    /// <summary>The exact answer of family <paramref name="family"/> on <paramref name="input"/>.</summary>
    public static string Apply(string family, string input) => GetFamily(family).Apply(input);

    /// <summary>
    /// The split an input belongs to: a function of the input text alone (FNV-1a 64 of its UTF-8 bytes),
    /// so a test input never appears in any training example of any family.
    /// </summary>
    public static TaskSplit SplitOf(string input) =>
        StableHash(input) % 100 < TestPercent ? TaskSplit.Test : TaskSplit.Train;

    /// <summary>Examples of one family; see <see cref="Generate(IEnumerable{string}, int, int, TaskSplit, TaskGenerateOptions?)"/>.</summary>
    public static IReadOnlyList<TaskExample> Generate(
        string family, int count, int seed, TaskSplit split = TaskSplit.Train, TaskGenerateOptions? options = null) =>
        Generate([family], count, seed, split, options);

    /// <summary>
    /// <paramref name="count"/> examples in all, the families taken round-robin in the order given (so
    /// balanced within one). Deterministic for (families, count, seed, split, options); each family draws
    /// from its own stream seeded by (seed, family, split), so adding a family leaves the others' examples
    /// unchanged. Every input lies in <paramref name="split"/> (<see cref="SplitOf"/>), and with
    /// <see cref="TaskGenerateOptions.Unique"/> no (family, input) pair repeats.
    /// </summary>
    public static IReadOnlyList<TaskExample> Generate(
        IEnumerable<string> families, int count, int seed, TaskSplit split = TaskSplit.Train,
        TaskGenerateOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(families);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        options ??= new TaskGenerateOptions();
        var fams = families.Select(GetFamily).ToArray();
        if (fams.Length == 0) throw new ArgumentException("At least one task family is required.", nameof(families));
        if (fams.Select(f => f.Id).Distinct().Count() != fams.Length)
            throw new ArgumentException("Task families must not repeat.", nameof(families));

        var streams = fams.Select(f => new FamilyStream(f, seed, split, options)).ToArray();
        var result = new List<TaskExample>(count);
        for (int i = 0; i < count; i++) result.Add(streams[i % fams.Length].Next());
        return result;
    }

    /// <summary>
    /// One example of <paramref name="family"/> for a given input (which need not come from a split; its
    /// <see cref="TaskExample.Split"/> is <see cref="SplitOf"/> of it), with a chosen template.
    /// </summary>
    public static TaskExample Create(
        string family, string input, int templateIndex = 0, InstructionPlacement placement = InstructionPlacement.System)
    {
        var f = GetFamily(family);
        ArgumentOutOfRangeException.ThrowIfNegative(templateIndex);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(templateIndex, f.Templates.Count);
        return new TaskExample(f.Id, f.Templates[templateIndex], input, f.Apply(input), placement)
        {
            Split = SplitOf(input),
            TemplateIndex = templateIndex,
        };
    }

    /// <summary>
    /// One JSON line in the chat dataset format: <c>{"messages":[{"role":..,"content":..},...]}</c>, plus
    /// <c>family</c> and, for injected examples, <c>injected_family</c> and <c>injected_answer</c>.
    /// </summary>
    public static string ToChatJsonLine(TaskExample example, bool includeAnswer = true)
    {
        ArgumentNullException.ThrowIfNull(example);
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            w.WriteStartArray("messages");
            foreach (var (role, content) in example.ToChat(includeAnswer))
            {
                w.WriteStartObject();
                w.WriteString("role", role);
                w.WriteString("content", content);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteString("family", example.Family);
            w.WriteString("answer", example.Answer);
            if (example.IsInjected)
            {
                w.WriteString("injected_family", example.InjectedFamily);
                w.WriteString("injected_answer", example.InjectedAnswer);
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }

    /// <summary>Writes <paramref name="examples"/> as JSON lines (see <see cref="ToChatJsonLine"/>).</summary>
    public static void WriteChatJsonl(string path, IEnumerable<TaskExample> examples, bool includeAnswer = true)
    {
        var sb = new StringBuilder();
        foreach (var e in examples) sb.Append(ToChatJsonLine(e, includeAnswer)).Append('\n');
        File.WriteAllText(path, sb.ToString(), new UTF8Encoding(false));
    }

    internal static IReadOnlyList<string> TemplatesOf(TaskFamily f, ParaphraseSet set) => set switch
    {
        ParaphraseSet.Train => f.TrainTemplates,
        ParaphraseSet.HeldOut => f.HeldOutTemplates,
        _ => f.Templates,
    };

    internal static ulong StableHash(string s)
    {
        ulong h = 14695981039346656037UL;
        foreach (byte b in Encoding.UTF8.GetBytes(s))
        {
            h ^= b;
            h *= 1099511628211UL;
        }
        return h;
    }

    internal static ulong Mix(params ulong[] parts)
    {
        ulong h = 0x9E3779B97F4A7C15UL;
        foreach (ulong p in parts) h = TaskRng.SplitMix(h ^ TaskRng.SplitMix(p + 0x632BE59BD9B4E019UL));
        return h;
    }

    private const int MaxAttemptsPerExample = 10_000;

    private sealed class FamilyStream(TaskFamily family, int seed, TaskSplit split, TaskGenerateOptions options)
    {
        private readonly TaskRng _rng = new(Mix((ulong)(uint)seed, StableHash(family.Id), (ulong)split));
        private readonly HashSet<string> _seen = new(StringComparer.Ordinal);
        private readonly IReadOnlyList<string> _templates = TemplatesOf(family, options.Paraphrases);

        public TaskExample Next()
        {
            for (int attempt = 0; attempt < MaxAttemptsPerExample; attempt++)
            {
                int t = _rng.Next(_templates.Count);
                var placement = options.Placement ??
                    (_rng.Next(2) == 0 ? InstructionPlacement.System : InstructionPlacement.User);
                string input = family.DrawInput(_rng, family.MaxWords);
                if (SplitOf(input) != split) continue;
                if (options.Unique && _seen.Contains(input)) continue;
                string instruction = _templates[t];
                string answer = family.Apply(input);
                if (instruction.Length + input.Length + answer.Length > MaxRenderedLength) continue;
                _seen.Add(input);
                int templateIndex = options.Paraphrases == ParaphraseSet.HeldOut ? family.TrainTemplates.Count + t : t;
                bool tool = options.ToolFraction > 0 && _rng.NextDouble() < options.ToolFraction;
                return new TaskExample(family.Id, instruction, input, answer, placement)
                {
                    Split = split,
                    TemplateIndex = templateIndex,
                    InputRole = tool ? ToolRole : DataRole,
                };
            }
            throw new InvalidOperationException(
                $"Task family '{family.Id}': could not draw a new {split} example after {MaxAttemptsPerExample} attempts " +
                $"({_seen.Count} distinct inputs drawn so far); ask for fewer examples or set Unique = false.");
        }
    }
}

/// <summary>A small, version-stable PRNG (SplitMix64), so generated data never depends on System.Random's algorithm.</summary>
internal sealed class TaskRng(ulong seed)
{
    private ulong _state = seed;

    public static ulong SplitMix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    public ulong NextUInt64()
    {
        _state += 0x9E3779B97F4A7C15UL;
        return SplitMix(_state);
    }

    /// <summary>Uniform in [0, n) (rejection sampling, no modulo bias).</summary>
    public int Next(int n)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(n);
        ulong un = (ulong)n;
        ulong limit = ulong.MaxValue - ulong.MaxValue % un;
        ulong x;
        do x = NextUInt64(); while (x >= limit);
        return (int)(x % un);
    }

    /// <summary>Uniform in [lo, hi).</summary>
    public int Next(int lo, int hi) => lo + Next(hi - lo);

    /// <summary>A uniform draw in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));
}
