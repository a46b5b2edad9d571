using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace LoraMix.Checkpoints;

/// <summary>
/// A restricted pickle interpreter for the <c>data.pkl</c> of a <c>torch.save</c> zip checkpoint. It builds an inert
/// object graph (tuples, lists, dicts, numbers, strings, storage and tensor descriptors); it never resolves a Python name
/// to code, never calls anything and never uses reflection. Only the opcodes <c>torch.save</c> emits (protocols 2 to 5)
/// and a short allowlist of globals are accepted; everything else raises <see cref="CheckpointFormatException"/>.
/// </summary>
internal sealed class TorchPickleUnpickler
{
    /// <summary>The largest <c>data.pkl</c> read (a state dict of 10,000 tensors pickles to about 2 MB).</summary>
    internal const int MaxPickleBytes = 64 << 20;

    private const int MaxStackDepth = 1 << 20;
    private const int MaxMarkDepth = 1 << 16;
    private const int MaxDims = 64;
    private const int MaxGlobalNameBytes = 512;

    internal const string SecurityNote =
        "A pickle that names other globals or uses other opcodes can execute arbitrary code when Python loads it; " +
        "LoraMix only loads tensor data and does not run anything from the file. If the file is trusted, re-save it as " +
        "safetensors or as a plain state dict (torch.save(model.state_dict())).";

    /// <summary>The globals <c>data.pkl</c> may name, as they appear in the pickle (<c>module.name</c>).</summary>
    internal static readonly IReadOnlyList<string> AllowedGlobals =
    [
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.FloatStorage", "torch.DoubleStorage", "torch.HalfStorage", "torch.BFloat16Storage",
        "torch.LongStorage", "torch.IntStorage", "torch.ShortStorage", "torch.CharStorage",
        "torch.ByteStorage", "torch.BoolStorage", "torch.UntypedStorage", "torch.storage.UntypedStorage",
    ];

    private static readonly UTF8Encoding s_strictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    // ------------------------------------------------------------------ the inert object model

    internal sealed class PyTuple(object?[] items)
    {
        public object?[] Items { get; } = items;
    }

    internal sealed class PyList
    {
        public List<object?> Items { get; } = [];
    }

    internal sealed class PyDict(bool ordered)
    {
        /// <summary>True for a <c>collections.OrderedDict</c>, false for a plain <c>dict</c>.</summary>
        public bool Ordered { get; } = ordered;
        public List<KeyValuePair<object?, object?>> Items { get; } = [];
    }

    internal enum GlobalKind { OrderedDict, RebuildTensorV2, RebuildParameter, RebuildParameterWithState, Storage }

    /// <summary>An allowlisted global: a tag, never a reference to code.</summary>
    internal sealed record PyGlobal(GlobalKind Kind, string Name, SafetensorsDType StorageDType = default, bool Untyped = false);

    /// <summary>A persistent id <c>('storage', cls, key, location, numel)</c>.</summary>
    internal sealed record StorageRef(string Key, SafetensorsDType DType, string StorageClass, string Location, long Numel);

    /// <summary>A <c>_rebuild_tensor_v2</c> call: a strided view of a storage.</summary>
    internal sealed record TensorRef(StorageRef Storage, long StorageOffset, long[] Size, long[] Stride, bool RequiresGrad, bool IsParameter);

    // ------------------------------------------------------------------ state

    private readonly string _file;
    private readonly byte[] _data;
    private int _pos;
    private int _opStart;
    private readonly List<object?> _stack = [];
    private readonly List<int> _marks = [];
    private readonly Dictionary<uint, object?> _memo = [];

    private TorchPickleUnpickler(string file, byte[] data)
    {
        _file = file;
        _data = data;
    }

    /// <summary>Interprets a whole pickle and returns the object <c>STOP</c> yields.</summary>
    /// <exception cref="CheckpointFormatException">Malformed, truncated or refused pickle.</exception>
    internal static object? Load(string file, byte[] data) => new TorchPickleUnpickler(file, data).Run();

    private object? Run()
    {
        while (true)
        {
            if (_pos >= _data.Length)
                throw Fail($"data.pkl ends at byte {_data.Length} without a STOP opcode (truncated file?)");
            _opStart = _pos;
            byte op = _data[_pos++];
            switch (op)
            {
                case 0x80: // PROTO
                {
                    byte proto = ReadByte();
                    if (proto > 5)
                        throw Fail($"data.pkl uses pickle protocol {proto}; protocols up to 5 are supported");
                    break;
                }
                case 0x95: // FRAME: a length hint only
                {
                    ulong n = ReadUInt64();
                    if (n > (ulong)(_data.Length - _pos))
                        throw Fail($"a FRAME of {n} bytes at byte {_opStart} runs past the end of data.pkl (truncated file?)");
                    break;
                }
                case (byte)'.': // STOP
                {
                    object? result = Pop();
                    return result;
                }
                case (byte)'(': // MARK
                    if (_marks.Count >= MaxMarkDepth) throw Fail($"more than {MaxMarkDepth} nested MARKs");
                    _marks.Add(_stack.Count);
                    break;
                case (byte)'}': Push(new PyDict(ordered: false)); break; // EMPTY_DICT
                case (byte)']': Push(new PyList()); break; // EMPTY_LIST
                case (byte)')': Push(new PyTuple([])); break; // EMPTY_TUPLE
                case (byte)'N': Push(null); break; // NONE
                case 0x88: Push(true); break; // NEWTRUE
                case 0x89: Push(false); break; // NEWFALSE
                case (byte)'K': Push((long)ReadByte()); break; // BININT1
                case (byte)'M': Push((long)BinaryPrimitives.ReadUInt16LittleEndian(Take(2))); break; // BININT2
                case (byte)'J': Push((long)BinaryPrimitives.ReadInt32LittleEndian(Take(4))); break; // BININT
                case 0x8a: Push(ReadLong(ReadByte())); break; // LONG1
                case 0x8b: // LONG4
                {
                    int n = BinaryPrimitives.ReadInt32LittleEndian(Take(4));
                    if (n < 0) throw Fail($"LONG4 at byte {_opStart} has a negative length {n}");
                    Push(ReadLong(n));
                    break;
                }
                case (byte)'G': Push(BinaryPrimitives.ReadDoubleBigEndian(Take(8))); break; // BINFLOAT
                case (byte)'X': Push(ReadString(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break; // BINUNICODE
                case 0x8c: Push(ReadString(ReadByte())); break; // SHORT_BINUNICODE
                case 0x8d: Push(ReadString(ReadUInt64())); break; // BINUNICODE8
                case (byte)'C': Push(Take(ReadByte()).ToArray()); break; // SHORT_BINBYTES
                case (byte)'B': Push(Take(CheckLength(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))).ToArray()); break; // BINBYTES
                case 0x8e: Push(Take(CheckLength(ReadUInt64())).ToArray()); break; // BINBYTES8
                case (byte)'t': Push(new PyTuple(PopToMark().ToArray())); break; // TUPLE
                case 0x85: Push(new PyTuple([Pop()])); break; // TUPLE1
                case 0x86: // TUPLE2
                {
                    object? b = Pop(), a = Pop();
                    Push(new PyTuple([a, b]));
                    break;
                }
                case 0x87: // TUPLE3
                {
                    object? c = Pop(), b = Pop(), a = Pop();
                    Push(new PyTuple([a, b, c]));
                    break;
                }
                case (byte)'q': _memo[ReadByte()] = Peek(); break; // BINPUT
                case (byte)'r': _memo[BinaryPrimitives.ReadUInt32LittleEndian(Take(4))] = Peek(); break; // LONG_BINPUT
                case 0x94: _memo[(uint)_memo.Count] = Peek(); break; // MEMOIZE
                case (byte)'h': Push(MemoGet(ReadByte())); break; // BINGET
                case (byte)'j': Push(MemoGet(BinaryPrimitives.ReadUInt32LittleEndian(Take(4)))); break; // LONG_BINGET
                case (byte)'0': Pop(); break; // POP
                case (byte)'1': PopToMark(); break; // POP_MARK
                case (byte)'2': Push(Peek()); break; // DUP
                case (byte)'s': // SETITEM
                {
                    object? value = Pop(), key = Pop();
                    DictTarget("SETITEM").Items.Add(new(key, value));
                    break;
                }
                case (byte)'u': // SETITEMS
                {
                    var items = PopToMark();
                    if (items.Count % 2 != 0)
                        throw Fail($"SETITEMS at byte {_opStart} has an odd number ({items.Count}) of keys and values");
                    var dict = DictTarget("SETITEMS");
                    for (int i = 0; i < items.Count; i += 2) dict.Items.Add(new(items[i], items[i + 1]));
                    break;
                }
                case (byte)'a': // APPEND
                {
                    object? value = Pop();
                    ListTarget("APPEND").Items.Add(value);
                    break;
                }
                case (byte)'e': // APPENDS
                {
                    var items = PopToMark();
                    ListTarget("APPENDS").Items.AddRange(items);
                    break;
                }
                case (byte)'c': // GLOBAL
                {
                    string module = ReadLine();
                    string name = ReadLine();
                    Push(ResolveGlobal(module, name, "GLOBAL"));
                    break;
                }
                case 0x93: // STACK_GLOBAL
                {
                    object? name = Pop(), module = Pop();
                    if (module is not string m || name is not string n)
                        throw Fail($"STACK_GLOBAL at byte {_opStart} needs two strings, found {Describe(module)} and {Describe(name)}");
                    Push(ResolveGlobal(m, n, "STACK_GLOBAL"));
                    break;
                }
                case (byte)'R': // REDUCE
                {
                    object? args = Pop(), callable = Pop();
                    Push(Reduce(callable, args));
                    break;
                }
                case 0x81: // NEWOBJ: cls.__new__(cls, *args); only OrderedDict()
                {
                    object? args = Pop(), cls = Pop();
                    Push(NewObject(cls, args, null, "NEWOBJ"));
                    break;
                }
                case 0x92: // NEWOBJ_EX
                {
                    object? kwargs = Pop(), args = Pop(), cls = Pop();
                    Push(NewObject(cls, args, kwargs, "NEWOBJ_EX"));
                    break;
                }
                case (byte)'Q': // BINPERSID
                    Push(PersistentLoad(Pop()));
                    break;
                case (byte)'b': // BUILD
                {
                    object? state = Pop();
                    Build(Peek(), state);
                    break;
                }
                case (byte)'i':
                    throw Refuse("opcode INST (instantiates an arbitrary class by name)");
                case (byte)'o':
                    throw Refuse("opcode OBJ (instantiates an arbitrary class)");
                case 0x82: case 0x83: case 0x84:
                    throw Refuse($"opcode EXT{(op == 0x82 ? 1 : op == 0x83 ? 2 : 4)} (loads a callable from the extension registry)");
                case (byte)'P':
                    throw Refuse("opcode PERSID (text persistent id; torch.save writes only BINPERSID)");
                default:
                    throw Fail(
                        $"unsupported pickle opcode 0x{op:x2}{Printable(op)} at byte {_opStart} of data.pkl; LoraMix reads only the " +
                        "opcodes torch.save emits for a state dict");
            }
        }
    }

    // ------------------------------------------------------------------ globals and calls

    private PyGlobal ResolveGlobal(string module, string name, string opcode)
    {
        string full = module + "." + name;
        switch (full)
        {
            case "collections.OrderedDict": return new PyGlobal(GlobalKind.OrderedDict, full);
            case "torch._utils._rebuild_tensor_v2": return new PyGlobal(GlobalKind.RebuildTensorV2, full);
            case "torch._utils._rebuild_parameter": return new PyGlobal(GlobalKind.RebuildParameter, full);
            case "torch._utils._rebuild_parameter_with_state": return new PyGlobal(GlobalKind.RebuildParameterWithState, full);
            case "torch.UntypedStorage":
            case "torch.storage.UntypedStorage":
                return new PyGlobal(GlobalKind.Storage, full, SafetensorsDType.U8, Untyped: true);
        }
        if (module == "torch" && TryStorageDType(name, out var dtype))
            return new PyGlobal(GlobalKind.Storage, full, dtype);
        if (module == "torch" && name.EndsWith("Storage", StringComparison.Ordinal) && name.Length < 64 &&
            name.All(char.IsAsciiLetterOrDigit))
            throw Fail($"data.pkl uses storage type '{full}', whose dtype LoraMix does not support " +
                       $"(supported: {SafetensorsDTypes.SupportedNames})");
        throw Refuse($"the Python global '{Clip(full)}' (opcode {opcode})");
    }

    /// <summary>The dtype of a legacy typed storage class of the <c>torch</c> module.</summary>
    internal static bool TryStorageDType(string className, out SafetensorsDType dtype)
    {
        switch (className)
        {
            case "FloatStorage": dtype = SafetensorsDType.F32; return true;
            case "DoubleStorage": dtype = SafetensorsDType.F64; return true;
            case "HalfStorage": dtype = SafetensorsDType.F16; return true;
            case "BFloat16Storage": dtype = SafetensorsDType.BF16; return true;
            case "LongStorage": dtype = SafetensorsDType.I64; return true;
            case "IntStorage": dtype = SafetensorsDType.I32; return true;
            case "ShortStorage": dtype = SafetensorsDType.I16; return true;
            case "CharStorage": dtype = SafetensorsDType.I8; return true;
            case "ByteStorage": dtype = SafetensorsDType.U8; return true;
            case "BoolStorage": dtype = SafetensorsDType.BOOL; return true;
            default: dtype = default; return false;
        }
    }

    /// <summary>The legacy typed storage class <c>torch.save</c> names for a dtype.</summary>
    internal static string StorageClassName(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F32 => "FloatStorage",
        SafetensorsDType.F64 => "DoubleStorage",
        SafetensorsDType.F16 => "HalfStorage",
        SafetensorsDType.BF16 => "BFloat16Storage",
        SafetensorsDType.I64 => "LongStorage",
        SafetensorsDType.I32 => "IntStorage",
        SafetensorsDType.I16 => "ShortStorage",
        SafetensorsDType.I8 => "CharStorage",
        SafetensorsDType.U8 => "ByteStorage",
        SafetensorsDType.BOOL => "BoolStorage",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "no torch storage class"),
    };

    private object Reduce(object? callable, object? args)
    {
        if (callable is not PyGlobal g)
            throw Refuse($"opcode REDUCE calling {Describe(callable)}, which is not an allowed global");
        if (args is not PyTuple t)
            throw Fail($"REDUCE at byte {_opStart} calls {g.Name} with {Describe(args)} instead of an argument tuple");
        var a = t.Items;
        switch (g.Kind)
        {
            case GlobalKind.OrderedDict:
                if (a.Length == 0) return new PyDict(ordered: true);
                if (a.Length == 1 && a[0] is PyList pairs)
                {
                    var dict = new PyDict(ordered: true);
                    foreach (var p in pairs.Items)
                    {
                        if (p is not PyTuple { Items.Length: 2 } kv)
                            throw Fail($"OrderedDict(...) at byte {_opStart} takes a list of (key, value) pairs, found {Describe(p)}");
                        dict.Items.Add(new(kv.Items[0], kv.Items[1]));
                    }
                    return dict;
                }
                throw Fail($"collections.OrderedDict is called at byte {_opStart} with {a.Length} unexpected argument(s)");
            case GlobalKind.RebuildTensorV2:
                return RebuildTensor(a);
            case GlobalKind.RebuildParameter:
            case GlobalKind.RebuildParameterWithState:
            {
                int expected = g.Kind == GlobalKind.RebuildParameter ? 3 : 4;
                if (a.Length != expected)
                    throw Fail($"{g.Name} at byte {_opStart} takes {expected} arguments, found {a.Length}");
                if (a[0] is not TensorRef tensor)
                    throw Fail($"{g.Name} at byte {_opStart} wraps {Describe(a[0])} instead of a tensor");
                if (a[1] is not bool requiresGrad)
                    throw Fail($"{g.Name} at byte {_opStart}: requires_grad is {Describe(a[1])}, expected a bool");
                RequireEmptyHooks(a[2], g.Name);
                if (expected == 4 && a[3] is not (PyDict or null or PyTuple))
                    throw Fail($"{g.Name} at byte {_opStart}: the state is {Describe(a[3])}, expected a dict");
                return tensor with { RequiresGrad = requiresGrad, IsParameter = true };
            }
            default:
                throw Fail($"{g.Name} is called at byte {_opStart}; torch.save never calls a storage class");
        }
    }

    private TensorRef RebuildTensor(object?[] a)
    {
        const string fn = "torch._utils._rebuild_tensor_v2";
        if (a.Length is not (6 or 7))
            throw Fail($"{fn} at byte {_opStart} takes 6 or 7 arguments, found {a.Length}");
        if (a[0] is not StorageRef storage)
            throw Fail($"{fn} at byte {_opStart}: the storage is {Describe(a[0])}, expected a persistent storage id");
        long offset = AsInt(a[1], "storage_offset");
        long[] size = AsIntTuple(a[2], "size");
        long[] stride = AsIntTuple(a[3], "stride");
        if (a[4] is not bool requiresGrad)
            throw Fail($"{fn} at byte {_opStart}: requires_grad is {Describe(a[4])}, expected a bool");
        RequireEmptyHooks(a[5], fn);
        if (a.Length == 7)
        {
            // torch appends get_tensor_metadata(t) only when it is non-empty (e.g. the neg/conj bits); accept only false flags.
            if (a[6] is not PyDict meta)
                throw Fail($"{fn} at byte {_opStart}: the tensor metadata is {Describe(a[6])}, expected a dict");
            foreach (var kv in meta.Items)
                if (kv.Value is not false)
                    throw Fail($"{fn} at byte {_opStart}: tensor metadata {Describe(kv.Key)} = {Describe(kv.Value)} is not supported");
        }
        if (size.Length != stride.Length)
            throw Fail($"{fn} at byte {_opStart}: size has {size.Length} dimensions but stride has {stride.Length}");
        if (offset < 0) throw Fail($"{fn} at byte {_opStart}: negative storage_offset {offset}");
        foreach (long d in size)
            if (d < 0) throw Fail($"{fn} at byte {_opStart}: negative dimension in size {Safetensors.FormatShape(size)}");
        foreach (long s in stride)
            if (s < 0) throw Fail($"{fn} at byte {_opStart}: negative stride in {Safetensors.FormatShape(stride)}");
        return new TensorRef(storage, offset, size, stride, requiresGrad, IsParameter: false);
    }

    private void RequireEmptyHooks(object? hooks, string fn)
    {
        if (hooks is PyDict { Items.Count: 0 } || hooks is null) return;
        throw Fail($"{fn} at byte {_opStart}: backward_hooks is {Describe(hooks)}; only an empty OrderedDict is accepted");
    }

    private object NewObject(object? cls, object? args, object? kwargs, string opcode)
    {
        if (cls is PyGlobal { Kind: GlobalKind.OrderedDict } && args is PyTuple { Items.Length: 0 } &&
            kwargs is null or PyDict { Items.Count: 0 })
            return new PyDict(ordered: true);
        throw Refuse($"opcode {opcode} on {Describe(cls)} (only OrderedDict() may be created this way)");
    }

    private object PersistentLoad(object? pid)
    {
        if (pid is not PyTuple t || t.Items.Length != 5)
            throw Fail($"BINPERSID at byte {_opStart}: the persistent id is {Describe(pid)}, expected ('storage', cls, key, location, numel)");
        var a = t.Items;
        if (a[0] is not "storage")
            throw Fail($"BINPERSID at byte {_opStart}: persistent id of type {Describe(a[0])}; only 'storage' is supported");
        if (a[1] is not PyGlobal { Kind: GlobalKind.Storage } cls)
            throw Fail($"BINPERSID at byte {_opStart}: the storage class is {Describe(a[1])}, expected e.g. torch.FloatStorage");
        if (a[2] is not string key || key.Length == 0 || key.Length > 256)
            throw Fail($"BINPERSID at byte {_opStart}: the storage key is {Describe(a[2])}, expected a short non-empty string");
        if (a[3] is not string location || location.Length > 256)
            throw Fail($"BINPERSID at byte {_opStart}: the storage location is {Describe(a[3])}, expected a string such as 'cpu'");
        long numel = AsInt(a[4], "storage numel");
        if (numel < 0) throw Fail($"BINPERSID at byte {_opStart}: negative storage size {numel}");
        return new StorageRef(key, cls.StorageDType, cls.Name, location, numel);
    }

    private void Build(object? target, object? state)
    {
        // An OrderedDict's instance __dict__ (e.g. the `_metadata` nn.Module.state_dict() attaches): accepted and ignored.
        if (target is PyDict { Ordered: true } && state is null or PyDict or PyTuple { Items: [PyDict or null, PyDict or null] })
            return;
        throw Refuse($"opcode BUILD on {Describe(target)} with state {Describe(state)} (only an OrderedDict's attributes may be set)");
    }

    // ------------------------------------------------------------------ stack, memo, input

    private void Push(object? value)
    {
        if (_stack.Count >= MaxStackDepth) throw Fail($"the pickle stack exceeds {MaxStackDepth} entries");
        _stack.Add(value);
    }

    private object? Pop()
    {
        int floor = _marks.Count > 0 ? _marks[^1] : 0;
        if (_stack.Count <= floor)
            throw Fail($"opcode 0x{_data[_opStart]:x2}{Printable(_data[_opStart])} at byte {_opStart} pops from an empty stack");
        object? v = _stack[^1];
        _stack.RemoveAt(_stack.Count - 1);
        return v;
    }

    private object? Peek()
    {
        int floor = _marks.Count > 0 ? _marks[^1] : 0;
        if (_stack.Count <= floor)
            throw Fail($"opcode 0x{_data[_opStart]:x2}{Printable(_data[_opStart])} at byte {_opStart} needs a value on the stack");
        return _stack[^1];
    }

    private List<object?> PopToMark()
    {
        if (_marks.Count == 0) throw Fail($"opcode 0x{_data[_opStart]:x2}{Printable(_data[_opStart])} at byte {_opStart} has no MARK");
        int mark = _marks[^1];
        _marks.RemoveAt(_marks.Count - 1);
        var items = _stack.GetRange(mark, _stack.Count - mark);
        _stack.RemoveRange(mark, _stack.Count - mark);
        return items;
    }

    private PyDict DictTarget(string opcode) => Peek() is PyDict d
        ? d
        : throw Refuse($"opcode {opcode} on {Describe(Peek())} (setting items of anything but a dict calls its __setitem__)");

    private PyList ListTarget(string opcode) => Peek() is PyList l
        ? l
        : throw Refuse($"opcode {opcode} on {Describe(Peek())} (appending to anything but a list calls its append/extend)");

    private object? MemoGet(uint index) => _memo.TryGetValue(index, out var v)
        ? v
        : throw Fail($"memo get of index {index} at byte {_opStart}, which was never stored");

    private byte ReadByte()
    {
        if (_pos >= _data.Length) throw Truncated();
        return _data[_pos++];
    }

    private ReadOnlySpan<byte> Take(int n)
    {
        if (n < 0 || n > _data.Length - _pos) throw Truncated();
        var span = _data.AsSpan(_pos, n);
        _pos += n;
        return span;
    }

    private ulong ReadUInt64() => BinaryPrimitives.ReadUInt64LittleEndian(Take(8));

    private int CheckLength(ulong n) => n <= (ulong)(_data.Length - _pos)
        ? (int)n
        : throw Fail($"a length of {n} bytes at byte {_opStart} runs past the end of data.pkl (truncated or corrupt file)");

    private string ReadString(ulong n)
    {
        var bytes = Take(CheckLength(n));
        try
        {
            return s_strictUtf8.GetString(bytes);
        }
        catch (DecoderFallbackException e)
        {
            throw Fail($"a string at byte {_opStart} of data.pkl is not valid UTF-8", e);
        }
    }

    private string ReadLine()
    {
        int end = Array.IndexOf(_data, (byte)'\n', _pos, Math.Min(_data.Length - _pos, MaxGlobalNameBytes + 1));
        if (end < 0)
            throw Fail($"the GLOBAL at byte {_opStart} has no newline-terminated name within {MaxGlobalNameBytes} bytes (truncated or corrupt file)");
        string s;
        try
        {
            s = s_strictUtf8.GetString(_data, _pos, end - _pos);
        }
        catch (DecoderFallbackException e)
        {
            throw Fail($"the GLOBAL at byte {_opStart} has a name that is not valid UTF-8", e);
        }
        _pos = end + 1;
        return s;
    }

    private long ReadLong(int n)
    {
        if (n == 0) return 0;
        if (n > 8) throw Fail($"an integer of {n} bytes at byte {_opStart} is too large for a tensor size or offset");
        var bytes = Take(n);
        long v = 0;
        for (int i = n - 1; i >= 0; i--) v = (v << 8) | bytes[i];
        if (n < 8 && (bytes[n - 1] & 0x80) != 0) v -= 1L << (8 * n); // sign-extend two's complement
        return v;
    }

    private long AsInt(object? v, string what) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        _ => throw Fail($"{what} at byte {_opStart} is {Describe(v)}, expected an integer"),
    };

    private long[] AsIntTuple(object? v, string what)
    {
        if (v is not PyTuple t)
            throw Fail($"{what} at byte {_opStart} is {Describe(v)}, expected a tuple of integers");
        if (t.Items.Length > MaxDims)
            throw Fail($"{what} at byte {_opStart} has {t.Items.Length} dimensions; at most {MaxDims} are supported");
        var result = new long[t.Items.Length];
        for (int i = 0; i < result.Length; i++)
            result[i] = t.Items[i] is long l ? l : throw Fail($"{what} at byte {_opStart} contains {Describe(t.Items[i])}, expected integers");
        return result;
    }

    // ------------------------------------------------------------------ errors

    private CheckpointFormatException Truncated() =>
        Fail($"data.pkl ends inside the opcode at byte {_opStart} (truncated or corrupt file)");

    private CheckpointFormatException Fail(string message, Exception? inner = null) => new(_file, null, message, inner);

    private CheckpointFormatException Refuse(string what) => new(_file, null,
        $"refusing to load: data.pkl uses {what} at byte {_opStart}. The file may execute code when loaded with Python's pickle; " +
        $"LoraMix only loads tensor data and allows only these globals: {string.Join(", ", AllowedGlobals)}. {SecurityNote}");

    private static string Printable(byte op) => op is >= 0x20 and < 0x7f ? $" ('{(char)op}')" : "";

    private static string Clip(string s) => s.Length <= 200 ? s.Replace("\n", "\\n") : s[..200].Replace("\n", "\\n") + "...";

    /// <summary>A short description of a value for messages (never recursive, so cyclic graphs are harmless).</summary>
    internal static string Describe(object? v) => v switch
    {
        null => "None",
        bool b => b ? "True" : "False",
        long l => "the integer " + l.ToString(CultureInfo.InvariantCulture),
        double d => "the float " + d.ToString("R", CultureInfo.InvariantCulture),
        string s => $"the string '{Clip(s)}'",
        byte[] b => $"a bytes object of {b.Length} bytes",
        PyTuple t => $"a tuple of {t.Items.Length}",
        PyList l => $"a list of {l.Items.Count}",
        PyDict { Ordered: true } d => $"an OrderedDict of {d.Items.Count}",
        PyDict d => $"a dict of {d.Items.Count}",
        PyGlobal g => $"the global {g.Name}",
        StorageRef s => $"storage '{Clip(s.Key)}'",
        TensorRef => "a tensor",
        _ => v.GetType().Name,
    };
}
