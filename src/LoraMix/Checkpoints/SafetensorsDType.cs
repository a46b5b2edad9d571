using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>The safetensors element types LoraMix reads and writes (the ones TorchSharp has a dtype for).</summary>
/// <remarks>Names match the safetensors spec exactly (<c>"F32"</c>, <c>"BF16"</c>, ...). Bytes are little-endian.</remarks>
public enum SafetensorsDType
{
    /// <summary>64-bit IEEE float (<c>torch.float64</c>).</summary>
    F64,
    /// <summary>32-bit IEEE float (<c>torch.float32</c>).</summary>
    F32,
    /// <summary>16-bit IEEE float (<c>torch.float16</c>).</summary>
    F16,
    /// <summary>bfloat16 (<c>torch.bfloat16</c>).</summary>
    BF16,
    /// <summary>Signed 64-bit integer (<c>torch.int64</c>).</summary>
    I64,
    /// <summary>Signed 32-bit integer (<c>torch.int32</c>).</summary>
    I32,
    /// <summary>Signed 16-bit integer (<c>torch.int16</c>).</summary>
    I16,
    /// <summary>Signed 8-bit integer (<c>torch.int8</c>).</summary>
    I8,
    /// <summary>Unsigned 8-bit integer (<c>torch.uint8</c>).</summary>
    U8,
    /// <summary>Boolean stored as one byte, 0 or 1 (<c>torch.bool</c>).</summary>
    BOOL,
}

/// <summary>Conversions between <see cref="SafetensorsDType"/>, its spec name and TorchSharp's <see cref="ScalarType"/>.</summary>
public static class SafetensorsDTypes
{
    /// <summary>Every supported dtype, largest element first.</summary>
    public static IReadOnlyList<SafetensorsDType> All { get; } =
    [
        SafetensorsDType.F64, SafetensorsDType.F32, SafetensorsDType.F16, SafetensorsDType.BF16,
        SafetensorsDType.I64, SafetensorsDType.I32, SafetensorsDType.I16, SafetensorsDType.I8,
        SafetensorsDType.U8, SafetensorsDType.BOOL,
    ];

    /// <summary>The supported spec names, comma separated (for error messages).</summary>
    public static string SupportedNames { get; } = string.Join(", ", All.Select(ToName));

    /// <summary>Dtypes of the safetensors spec that TorchSharp has no dtype for; reported as unsupported rather than unknown.</summary>
    private static readonly HashSet<string> s_knownUnsupported = new(StringComparer.Ordinal)
    {
        "U16", "U32", "U64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
    };

    /// <summary>The TorchSharp dtype of <paramref name="dtype"/>.</summary>
    public static ScalarType ToScalarType(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 => ScalarType.Float64,
        SafetensorsDType.F32 => ScalarType.Float32,
        SafetensorsDType.F16 => ScalarType.Float16,
        SafetensorsDType.BF16 => ScalarType.BFloat16,
        SafetensorsDType.I64 => ScalarType.Int64,
        SafetensorsDType.I32 => ScalarType.Int32,
        SafetensorsDType.I16 => ScalarType.Int16,
        SafetensorsDType.I8 => ScalarType.Int8,
        SafetensorsDType.U8 => ScalarType.Byte,
        SafetensorsDType.BOOL => ScalarType.Bool,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a safetensors dtype"),
    };

    /// <summary>The safetensors dtype of a TorchSharp dtype.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The dtype (e.g. complex) has no safetensors equivalent here.</exception>
    public static SafetensorsDType FromScalarType(ScalarType dtype) =>
        TryFromScalarType(dtype, out var result)
            ? result
            : throw new ArgumentOutOfRangeException(nameof(dtype), dtype,
                $"torch dtype {dtype} cannot be stored in safetensors by LoraMix; supported: {SupportedNames}");

    /// <summary>The safetensors dtype of a TorchSharp dtype, or false when there is none.</summary>
    public static bool TryFromScalarType(ScalarType dtype, out SafetensorsDType result)
    {
        switch (dtype)
        {
            case ScalarType.Float64: result = SafetensorsDType.F64; return true;
            case ScalarType.Float32: result = SafetensorsDType.F32; return true;
            case ScalarType.Float16: result = SafetensorsDType.F16; return true;
            case ScalarType.BFloat16: result = SafetensorsDType.BF16; return true;
            case ScalarType.Int64: result = SafetensorsDType.I64; return true;
            case ScalarType.Int32: result = SafetensorsDType.I32; return true;
            case ScalarType.Int16: result = SafetensorsDType.I16; return true;
            case ScalarType.Int8: result = SafetensorsDType.I8; return true;
            case ScalarType.Byte: result = SafetensorsDType.U8; return true;
            case ScalarType.Bool: result = SafetensorsDType.BOOL; return true;
            default: result = default; return false;
        }
    }

    /// <summary>Bytes per element.</summary>
    public static int ElementSize(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 or SafetensorsDType.I64 => 8,
        SafetensorsDType.F32 or SafetensorsDType.I32 => 4,
        SafetensorsDType.F16 or SafetensorsDType.BF16 or SafetensorsDType.I16 => 2,
        SafetensorsDType.I8 or SafetensorsDType.U8 or SafetensorsDType.BOOL => 1,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a safetensors dtype"),
    };

    /// <summary>The spec name (<c>"F32"</c>, <c>"BF16"</c>, <c>"BOOL"</c>, ...).</summary>
    public static string ToName(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.F64 => "F64",
        SafetensorsDType.F32 => "F32",
        SafetensorsDType.F16 => "F16",
        SafetensorsDType.BF16 => "BF16",
        SafetensorsDType.I64 => "I64",
        SafetensorsDType.I32 => "I32",
        SafetensorsDType.I16 => "I16",
        SafetensorsDType.I8 => "I8",
        SafetensorsDType.U8 => "U8",
        SafetensorsDType.BOOL => "BOOL",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a safetensors dtype"),
    };

    /// <summary>Parses a spec name; exact and case-sensitive, as in the safetensors library.</summary>
    public static bool TryParse(string? name, out SafetensorsDType dtype)
    {
        switch (name)
        {
            case "F64": dtype = SafetensorsDType.F64; return true;
            case "F32": dtype = SafetensorsDType.F32; return true;
            case "F16": dtype = SafetensorsDType.F16; return true;
            case "BF16": dtype = SafetensorsDType.BF16; return true;
            case "I64": dtype = SafetensorsDType.I64; return true;
            case "I32": dtype = SafetensorsDType.I32; return true;
            case "I16": dtype = SafetensorsDType.I16; return true;
            case "I8": dtype = SafetensorsDType.I8; return true;
            case "U8": dtype = SafetensorsDType.U8; return true;
            case "BOOL": dtype = SafetensorsDType.BOOL; return true;
            default: dtype = default; return false;
        }
    }

    /// <summary>True for dtype names the safetensors spec defines but LoraMix cannot load (no TorchSharp dtype).</summary>
    public static bool IsKnownUnsupported(string name) => s_knownUnsupported.Contains(name);

    /// <summary>
    /// The position of the dtype in the Rust <c>safetensors::Dtype</c> enum, whose derived order the library sorts by when
    /// it lays out data: BOOL &lt; U8 &lt; I8 &lt; I16 &lt; F16 &lt; BF16 &lt; I32 &lt; F32 &lt; F64 &lt; I64 (increasing alignment, with a
    /// fixed order among dtypes of the same size).
    /// </summary>
    internal static int RustOrder(SafetensorsDType dtype) => dtype switch
    {
        SafetensorsDType.BOOL => 0,
        SafetensorsDType.U8 => 1,
        SafetensorsDType.I8 => 2,
        SafetensorsDType.I16 => 5,
        SafetensorsDType.F16 => 7,
        SafetensorsDType.BF16 => 8,
        SafetensorsDType.I32 => 9,
        SafetensorsDType.F32 => 11,
        SafetensorsDType.F64 => 12,
        SafetensorsDType.I64 => 13,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a safetensors dtype"),
    };
}
