using System.Globalization;
using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>One adapter of a row's <see cref="AdapterChoice"/> and the weight its update is scaled by.</summary>
/// <param name="Name">The adapter's name on the model.</param>
/// <param name="Weight">Multiplies the adapter's LoRA updates (1 = as trained). A mixture-of-experts adapter takes
/// weight 1 only.</param>
public readonly record struct AdapterTerm(string Name, double Weight = 1.0);

/// <summary>
/// What one batch row runs: the base model (no term), one named adapter, or a composition of several adapters with
/// weights (their LoRA updates are summed, each scaled by its weight; at most one of them may be a mixture-of-experts
/// adapter). Immutable; equal choices compare equal, so rows that share a choice are grouped.
/// </summary>
public sealed class AdapterChoice : IEquatable<AdapterChoice>
{
    private AdapterChoice(AdapterTerm[] terms) => Terms = terms;

    /// <summary>The base model: no adapter.</summary>
    public static AdapterChoice Base { get; } = new([]);

    /// <summary>The adapter terms, in the order given (the order their updates are added).</summary>
    public IReadOnlyList<AdapterTerm> Terms { get; }

    /// <summary>True for the base model.</summary>
    public bool IsBase => Terms.Count == 0;

    /// <summary>One adapter at weight 1.</summary>
    public static AdapterChoice Of(string name) => Compose(new AdapterTerm(name));

    /// <summary>Several adapters, each at weight 1.</summary>
    public static AdapterChoice Compose(IEnumerable<string> names) => Compose(names.Select(n => new AdapterTerm(n)).ToArray());

    /// <summary>A composition of adapters with weights.</summary>
    /// <exception cref="ArgumentException">A name is empty or contains '.', a name repeats, or a weight is not finite.</exception>
    public static AdapterChoice Compose(params AdapterTerm[] terms)
    {
        ArgumentNullException.ThrowIfNull(terms);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, weight) in terms)
        {
            CheckName(name);
            if (!seen.Add(name)) throw new ArgumentException($"adapter '{name}' appears twice in one composition; give it once with its weight");
            if (!double.IsFinite(weight)) throw new ArgumentException($"adapter '{name}' has weight {weight}; a weight must be a finite number");
        }
        return terms.Length == 0 ? Base : new AdapterChoice([.. terms]);
    }

    /// <summary>Throws unless <paramref name="name"/> can name an adapter (non-empty, no '.', no ',' or ':', not "base").</summary>
    public static void CheckName(string name)
    {
        if (string.IsNullOrEmpty(name) || name.IndexOfAny(['.', ',', ':', '=']) >= 0 || name.Any(char.IsWhiteSpace))
            throw new ArgumentException($"adapter name '{name}' must be non-empty and contain no '.', ',', ':', '=' or whitespace");
        if (name == "base") throw new ArgumentException("'base' names the base model; choose another adapter name");
    }

    /// <summary>
    /// Parses <c>base</c>, <c>NAME</c>, or a composition <c>NAME[:WEIGHT][,NAME[:WEIGHT]...]</c> (weights are invariant-culture
    /// numbers, default 1), e.g. <c>math:0.7,code:0.3</c>.
    /// </summary>
    /// <exception cref="FormatException">The text is empty or a weight is not a number.</exception>
    public static AdapterChoice Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        text = text.Trim();
        if (text.Length == 0) throw new FormatException("an adapter choice is empty; give 'base', a name, or name:weight,name:weight");
        if (text == "base") return Base;
        var terms = new List<AdapterTerm>();
        foreach (var part in text.Split(','))
        {
            var p = part.Trim();
            int colon = p.LastIndexOf(':');
            string name = colon < 0 ? p : p[..colon];
            double weight = 1;
            if (colon >= 0 && !double.TryParse(p[(colon + 1)..], NumberStyles.Float, CultureInfo.InvariantCulture, out weight))
                throw new FormatException($"'{p}': the weight after ':' must be a number (e.g. {name}:0.5)");
            terms.Add(new AdapterTerm(name, weight));
        }
        try { return Compose([.. terms]); }
        catch (ArgumentException e) { throw new FormatException(e.Message, e); }
    }

    public bool Equals(AdapterChoice? other) => other is not null && Terms.SequenceEqual(other.Terms);
    public override bool Equals(object? obj) => obj is AdapterChoice c && Equals(c);
    public override int GetHashCode()
    {
        var h = new HashCode();
        foreach (var t in Terms) h.Add(t);
        return h.ToHashCode();
    }

    /// <summary><c>base</c>, <c>name</c>, or <c>a:0.5,b</c> (the form <see cref="Parse"/> reads).</summary>
    public override string ToString() => IsBase ? "base" : string.Join(",", Terms.Select(t =>
        t.Weight == 1 ? t.Name : $"{t.Name}:{t.Weight.ToString("R", CultureInfo.InvariantCulture)}"));
}

/// <summary>
/// The adapters a forward call runs, per batch row: one <see cref="AdapterChoice"/> for every row (<see cref="Of(AdapterChoice)"/>,
/// any batch size) or one per row (<see cref="PerRow"/>). It travels with the call
/// (<see cref="LlamaForCausalLM.Forward"/>'s <c>adapters</c>) — the model holds no "active adapter" — so one batch can mix
/// rows for the base model and for different adapters; every adapter slot reads it from the forward context. Immutable
/// and safe to share between threads.
/// </summary>
public sealed class AdapterSelection
{
    private readonly AdapterChoice? _uniform;
    private readonly AdapterChoice[]? _rows;

    private AdapterSelection(AdapterChoice? uniform, AdapterChoice[]? rows)
    {
        _uniform = uniform;
        _rows = rows;
    }

    /// <summary>Every row runs the base model.</summary>
    public static AdapterSelection Base { get; } = new(AdapterChoice.Base, null);

    /// <summary>Every row runs <paramref name="choice"/>.</summary>
    public static AdapterSelection Of(AdapterChoice choice) => new(choice ?? throw new ArgumentNullException(nameof(choice)), null);

    /// <summary>Every row runs adapter <paramref name="name"/>.</summary>
    public static AdapterSelection Of(string name) => Of(AdapterChoice.Of(name));

    /// <summary>Row <c>i</c> runs <paramref name="rows"/>[i]; the batch must have exactly that many rows.</summary>
    public static AdapterSelection PerRow(IEnumerable<AdapterChoice> rows)
    {
        var array = rows.ToArray();
        if (array.Length == 0) throw new ArgumentException("a per-row adapter selection needs at least one row", nameof(rows));
        if (array.Any(c => c is null)) throw new ArgumentException("a row's adapter choice is null", nameof(rows));
        return array.All(c => c.Equals(array[0])) ? new(array[0], null) { RowCount = array.Length } : new(null, array);
    }

    /// <summary>The number of rows a per-row selection was made for, or null when any batch size fits.</summary>
    public int? RowCount { get => _rows?.Length ?? _rowCount; private init => _rowCount = value; }
    private readonly int? _rowCount;

    /// <summary>The choice of every row when all rows share it, else null.</summary>
    public AdapterChoice? Uniform => _uniform;

    /// <summary>True when no row runs an adapter.</summary>
    public bool IsBase => _uniform?.IsBase ?? _rows!.All(c => c.IsBase);

    /// <summary>The choice of row <paramref name="row"/>.</summary>
    public AdapterChoice this[int row] => _uniform ?? _rows![row];

    /// <summary>The distinct adapter names, in order of first appearance (row by row, term by term).</summary>
    public IReadOnlyList<string> Names =>
        (_uniform is not null ? [_uniform] : _rows!).SelectMany(c => c.Terms).Select(t => t.Name).Distinct(StringComparer.Ordinal).ToList();

    /// <summary>The selection of a batch made of rows <paramref name="rows"/> of this one, in that order.</summary>
    public AdapterSelection Select(IReadOnlyList<int> rows) =>
        _uniform is not null ? (RowCount is null ? this : new(_uniform, null) { RowCount = rows.Count }) : PerRow(rows.Select(r => _rows![r]));

    /// <summary>Throws unless the selection fits a batch of <paramref name="batch"/> rows.</summary>
    /// <exception cref="ArgumentException">A per-row selection has another number of rows.</exception>
    public void CheckBatch(long batch)
    {
        if (RowCount is int n && n != batch)
            throw new ArgumentException($"the adapter selection has {n} rows but the batch has {batch}; give one choice per row (or one for all)");
    }

    public override string ToString() => _uniform is not null ? _uniform.ToString() : string.Join(" | ", _rows!.Select(c => c.ToString()));
}

/// <summary>The rows of one forward call that use one adapter, and their weights: what an adapter slot gathers.</summary>
public sealed class AdapterRows
{
    internal AdapterRows(string name, long[] rows, double[] weights, bool allRows, Device device)
    {
        Name = name;
        Rows = rows;
        Weights = weights;
        AllRows = allRows;
        UniformWeight = weights.All(w => w == weights[0]) ? weights[0] : null;
        if (!allRows) Index = tensor(rows, device: device);
        if (UniformWeight is null) WeightsColumn = tensor(weights, device: device);
    }

    /// <summary>The adapter.</summary>
    public string Name { get; }

    /// <summary>Rows (ascending) that use it.</summary>
    public long[] Rows { get; }

    /// <summary>Each row's weight.</summary>
    public double[] Weights { get; }

    /// <summary>True when every row of the call uses it: the slot runs it on the whole batch without gathering.</summary>
    public bool AllRows { get; }

    /// <summary>The common weight of its rows, or null when they differ.</summary>
    public double? UniformWeight { get; }

    /// <summary><see cref="Rows"/> on the model's device (int64), or null when <see cref="AllRows"/>.</summary>
    public Tensor? Index { get; }

    /// <summary><see cref="Weights"/> on the model's device (fp64), or null when <see cref="UniformWeight"/> is set.</summary>
    public Tensor? WeightsColumn { get; }

    /// <summary>Scales <paramref name="update"/> (one slice per row of <see cref="Rows"/> along dimension 0) by the rows'
    /// weights; returns it unchanged at weight 1.</summary>
    public Tensor Scale(Tensor update)
    {
        if (UniformWeight is double w) return w == 1 ? update : update * w;
        var shape = new long[update.dim()];
        Array.Fill(shape, 1L);
        shape[0] = -1;
        return update * WeightsColumn!.to(update.dtype).view(shape);
    }
}

/// <summary>
/// An <see cref="AdapterSelection"/> resolved for one forward call: for each adapter the rows that use it (what Punica
/// and S-LoRA call the segments), built once per call on the model's device and read by every slot through
/// <see cref="ForwardContext.Adapters"/>. A slot runs each adapter it holds once per call over that adapter's rows.
/// </summary>
public sealed class AdapterBatch
{
    private readonly Dictionary<string, AdapterRows> _uses;

    private AdapterBatch(long batch, AdapterSelection selection, List<AdapterRows> uses)
    {
        Batch = batch;
        Selection = selection;
        Uses = uses;
        _uses = uses.ToDictionary(u => u.Name, StringComparer.Ordinal);
    }

    /// <summary>Rows of the call.</summary>
    public long Batch { get; }

    /// <summary>The selection it was resolved from.</summary>
    public AdapterSelection Selection { get; }

    /// <summary>Every adapter used by some row, in order of first appearance.</summary>
    public IReadOnlyList<AdapterRows> Uses { get; }

    /// <summary>The rows that use adapter <paramref name="name"/>, or null when none does.</summary>
    public AdapterRows? Use(string name) => _uses.GetValueOrDefault(name);

    /// <summary>The batch for <paramref name="selection"/> over <paramref name="batch"/> rows, or null when every row runs the
    /// base model (the slots then run their base layers alone).</summary>
    public static AdapterBatch? Resolve(AdapterSelection? selection, long batch, Device device)
    {
        if (selection is null || selection.IsBase) return null;
        selection.CheckBatch(batch);
        var rows = new Dictionary<string, (List<long> Rows, List<double> Weights)>(StringComparer.Ordinal);
        var order = new List<string>();
        for (int r = 0; r < batch; r++)
            foreach (var (name, weight) in selection[r].Terms)
            {
                if (!rows.TryGetValue(name, out var entry))
                {
                    rows[name] = entry = ([], []);
                    order.Add(name);
                }
                entry.Rows.Add(r);
                entry.Weights.Add(weight);
            }
        var uses = order.Select(n => new AdapterRows(n, [.. rows[n].Rows], [.. rows[n].Weights], rows[n].Rows.Count == batch, device)).ToList();
        return new AdapterBatch(batch, selection, uses);
    }

    /// <summary>The batch of rows <paramref name="rows"/> of this call (a slot that runs a sub-batch on its own).</summary>
    public AdapterBatch? Subset(IReadOnlyList<int> rows, Device device) => Resolve(Selection.Select(rows.Select(r => r).ToArray()), rows.Count, device);
}
