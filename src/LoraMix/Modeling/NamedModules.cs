using static TorchSharp.torch;

namespace LoraMix.Modeling;

/// <summary>
/// Per-adapter child modules, registered under the adapter's name as they are added (TorchSharp's ModuleDict registers
/// its items only once, at construction), so training mode, parameters() and state_dict() always see them. The one
/// holder of LoRA deltas (<c>AdaptedLinear</c>), MixLoRA mixtures and privilege embeddings.
/// </summary>
internal sealed class NamedModules<T> : nn.Module where T : nn.Module
{
    private readonly List<(string Name, T Module)> _items = [];

    public NamedModules() : base($"NamedModules<{typeof(T).Name}>") { }

    public IReadOnlyList<string> Names => _items.Select(i => i.Name).ToList();

    public bool TryGet(string name, out T module)
    {
        foreach (var (n, m) in _items)
            if (n == name) { module = m; return true; }
        module = null!;
        return false;
    }

    public T? Get(string name) => TryGet(name, out var m) ? m : null;

    public void Add(string name, T module)
    {
        register_module(name, module);
        _items.Add((name, module));
    }

    public void Remove(string name)
    {
        register_module(name, null!);
        _items.RemoveAll(i => i.Name == name);
    }
}
