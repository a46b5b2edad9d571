using System.Reflection;
using System.Text;
using System.Text.RegularExpressions;
using NetArchTest.Rules;

namespace LoraMix.Tests.Architecture;

/// <summary>
/// Pins the library's layering (docs/ARCHITECTURE.md, "Layers") on the compiled LoraMix assembly: a namespace may use its
/// own layer and the layers below it, never a higher one. NetArchTest reads every type's signatures, fields, base types,
/// attributes and method bodies (nested and compiler-generated types included), so a fully qualified name or a
/// <c>var</c> counts like a <c>using</c>.
/// </summary>
public sealed class DependencyRulesTests
{
    private static readonly Assembly Library = typeof(LoraMixException).Assembly;

    /// <summary>The layers, lowest first. A namespace covers its sub-namespaces (<c>LoraMix.Adapters.Lora</c> is in
    /// <c>LoraMix.Adapters</c>) except <c>LoraMix</c>, which is the root namespace alone.</summary>
    public static readonly string[][] Layers =
    [
        ["LoraMix", "LoraMix.Torch", "LoraMix.Configuration"],
        ["LoraMix.Checkpoints", "LoraMix.Tokenization"],
        ["LoraMix.Routing"],
        ["LoraMix.Modeling"],
        ["LoraMix.Adapters"],
        ["LoraMix.Data", "LoraMix.Inference", "LoraMix.Training", "LoraMix.Evaluation"],
        ["LoraMix.Workflows"],
    ];

    /// <summary>Namespaces of one layer that may not use each other (what composes them lives in a higher layer).</summary>
    public static readonly (string From, string To)[] ForbiddenWithinLayer =
    [
        ("LoraMix.Training", "LoraMix.Evaluation"),
        ("LoraMix.Evaluation", "LoraMix.Training"),
        ("LoraMix.Checkpoints", "LoraMix.Tokenization"),
        ("LoraMix.Tokenization", "LoraMix.Checkpoints"),
    ];

    public static TheoryData<string> Namespaces()
    {
        var data = new TheoryData<string>();
        foreach (var ns in Layers.SelectMany(l => l)) data.Add(ns);
        return data;
    }

    [Fact]
    public void EveryLibraryNamespaceHasALayer()
    {
        var unplaced = Library.GetTypes()
            .Select(t => t.Namespace)
            .Where(ns => ns is not null && (ns == "LoraMix" || ns.StartsWith("LoraMix.", StringComparison.Ordinal)))
            .Distinct()
            .Where(ns => LayerOf(ns!) < 0)
            .OrderBy(ns => ns, StringComparer.Ordinal)
            .ToList();
        Assert.True(unplaced.Count == 0,
            $"namespaces without a layer (add them to {nameof(DependencyRulesTests)}.{nameof(Layers)} and docs/ARCHITECTURE.md): " +
            string.Join(", ", unplaced));
    }

    [Theory]
    [MemberData(nameof(Namespaces))]
    public void NamespaceUsesNoHigherLayer(string ns)
    {
        int layer = LayerOf(ns);
        var forbidden = Layers.Skip(layer + 1).SelectMany(l => l)
            .Concat(ForbiddenWithinLayer.Where(p => p.From == ns).Select(p => p.To))
            .ToArray();
        var offenders = Offenders(() => TypesIn(ns), forbidden);
        Assert.True(offenders.Count == 0, Describe($"{ns} (layer {layer + 1}) may not use {string.Join(", ", forbidden)}", offenders));
    }

    [Fact]
    public void TrainerDoesNotKnowAdapterMethods()
    {
        // The generic trainer reaches method-specific losses and statistics through ITrainingObjective / TrainingTarget.
        var offenders = Offenders(() => Types.InAssembly(Library).That()
            .HaveNameMatching("^Trainer$").And().ResideInNamespaceMatching("^LoraMix\\.Training$"), ["LoraMix.Adapters"]);
        Assert.True(offenders.Count == 0, Describe("LoraMix.Training.Trainer may not use LoraMix.Adapters", offenders));
    }

    [Fact]
    public void LibraryDoesNotReferenceTheCli()
    {
        var names = Library.GetReferencedAssemblies().Select(a => a.Name).ToList();
        Assert.DoesNotContain("LoraMix.Cli", names);
        Assert.DoesNotContain("loramix", names);
        var offenders = Offenders(() => Types.InAssembly(Library).That().ResideInNamespaceMatching("^LoraMix(\\.|$)"), ["LoraMix.Cli"]);
        Assert.True(offenders.Count == 0, Describe("the library may not use LoraMix.Cli", offenders));
    }

    [Fact]
    public void TheRuleCatchesAViolation()
    {
        // The checker itself: the CLI trains, so "the CLI may not use LoraMix.Training" must fail and name its types.
        var offenders = Offenders(() => Types.InAssembly(typeof(LoraMix.Cli.CliApp).Assembly).That()
            .ResideInNamespaceMatching("^LoraMix\\.Cli(\\.|$)"), ["LoraMix.Training"]);
        Assert.NotEmpty(offenders);
        Assert.All(offenders.Values, used => Assert.Contains("LoraMix.Training", used));
    }

    /// <summary>The layer index of a namespace (its longest listed prefix), or -1.</summary>
    private static int LayerOf(string ns)
    {
        for (int i = 0; i < Layers.Length; i++)
            if (Layers[i].Any(l => Covers(l, ns))) return i;
        return -1;
    }

    private static bool Covers(string layerNamespace, string ns) =>
        layerNamespace == "LoraMix" ? ns == "LoraMix" : ns == layerNamespace || ns.StartsWith(layerNamespace + ".", StringComparison.Ordinal);

    private static PredicateList TypesIn(string ns) => Types.InAssembly(Library).That().ResideInNamespaceMatching(
        ns == "LoraMix" ? "^LoraMix$" : "^" + Regex.Escape(ns) + "(\\.|$)");

    /// <summary>The types <paramref name="types"/> selects that use any of <paramref name="namespaces"/>, each with the ones it
    /// uses.</summary>
    private static SortedDictionary<string, SortedSet<string>> Offenders(Func<PredicateList> types, IEnumerable<string> namespaces)
    {
        var result = new SortedDictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        foreach (var target in namespaces)
        {
            var test = types().ShouldNot().HaveDependencyOn(target).GetResult();
            if (test.IsSuccessful) continue;
            foreach (var name in test.FailingTypeNames ?? [])
            {
                if (!result.TryGetValue(name, out var used)) result[name] = used = new SortedSet<string>(StringComparer.Ordinal);
                used.Add(target);
            }
        }
        return result;
    }

    private static string Describe(string rule, SortedDictionary<string, SortedSet<string>> offenders)
    {
        var text = new StringBuilder(rule).Append("; offending types:");
        foreach (var (type, used) in offenders) text.Append("\n  ").Append(type).Append(" -> ").Append(string.Join(", ", used));
        return text.ToString();
    }
}
