using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraMix.Checkpoints;

/// <summary>One tensor of a safetensors header.</summary>
/// <param name="Name">The tensor's key in the header.</param>
/// <param name="DType">Its element type.</param>
/// <param name="Shape">Its shape (empty for a 0-d tensor).</param>
/// <param name="Begin">First byte, relative to the start of the data buffer (right after the header).</param>
/// <param name="End">One past the last byte, relative to the start of the data buffer.</param>
public sealed record SafetensorsEntry(string Name, SafetensorsDType DType, long[] Shape, long Begin, long End)
{
    /// <summary>Bytes of data (<c>End - Begin</c>).</summary>
    public long ByteLength => End - Begin;

    /// <summary>Number of elements (product of <see cref="Shape"/>; 1 for a 0-d tensor).</summary>
    public long NumberOfElements => Safetensors.ElementCount(Shape);

    /// <summary>The TorchSharp dtype the tensor is read as.</summary>
    public ScalarType ScalarType => SafetensorsDTypes.ToScalarType(DType);

    /// <inheritdoc/>
    public override string ToString() =>
        $"{Name}: {SafetensorsDTypes.ToName(DType)} {Safetensors.FormatShape(Shape)} at [{Begin}, {End})";
}

/// <summary>A tensor to be written: its name, the dtype it is stored as, and its shape.</summary>
/// <param name="Name">The tensor's key in the header.</param>
/// <param name="DType">The dtype stored in the file.</param>
/// <param name="Shape">The shape (empty for a 0-d tensor).</param>
public sealed record SafetensorsTensorSpec(string Name, SafetensorsDType DType, long[] Shape)
{
    /// <summary>Bytes the tensor takes in the file.</summary>
    /// <exception cref="ArgumentException">A negative dimension, or a size that overflows 64 bits.</exception>
    public long ByteLength
    {
        get
        {
            foreach (long d in Shape)
                if (d < 0) throw new ArgumentException($"tensor '{Name}': negative dimension in shape {Safetensors.FormatShape(Shape)}");
            return Safetensors.TryByteLength(Shape, DType, out long n)
                ? n
                : throw new ArgumentException($"tensor '{Name}': shape {Safetensors.FormatShape(Shape)} of {SafetensorsDTypes.ToName(DType)} overflows a 64-bit byte count");
        }
    }

    /// <inheritdoc/>
    public override string ToString() => $"{Name}: {SafetensorsDTypes.ToName(DType)} {Safetensors.FormatShape(Shape)}";
}

/// <summary>Shared constants and helpers of the safetensors reader and writer.</summary>
public static class Safetensors
{
    /// <summary>The largest header accepted, as in the safetensors library (100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    /// <summary>Single-file checkpoint name of a Hugging Face model directory.</summary>
    public const string SingleFileName = "model.safetensors";

    /// <summary>Index file name of a sharded Hugging Face model directory.</summary>
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>Largest span handed to one read or write call (1 GiB); the data goes straight between the file and
    /// the tensor's native memory, so no managed buffer proportional to a tensor is ever allocated.</summary>
    internal static int ChunkBytes { get; set; } = 1 << 30;

    /// <summary>Product of the dimensions (1 for a 0-d tensor); assumes a validated shape.</summary>
    internal static long ElementCount(long[] shape)
    {
        long n = 1;
        foreach (long d in shape) n = unchecked(n * d);
        return n;
    }

    /// <summary>
    /// Byte size of a tensor, or false on overflow. Stricter than the Rust library: the product of the <em>non-zero</em>
    /// dimensions must fit too, so that a shape such as <c>[0, 2^62, 2^62]</c> (0 bytes) cannot reach libtorch, whose
    /// stride computation would overflow.
    /// </summary>
    internal static bool TryByteLength(long[] shape, SafetensorsDType dtype, out long bytes)
    {
        bytes = 0;
        long nonZero = SafetensorsDTypes.ElementSize(dtype);
        bool zero = false;
        foreach (long d in shape)
        {
            if (d < 0) return false;
            if (d == 0) { zero = true; continue; }
            if (nonZero > long.MaxValue / d) return false;
            nonZero *= d;
        }
        bytes = zero ? 0 : nonZero;
        return true;
    }

    /// <summary>Formats a shape as <c>[2, 3]</c> (<c>[]</c> for 0-d).</summary>
    public static string FormatShape(IEnumerable<long> shape) => $"[{string.Join(", ", shape)}]";

    /// <summary>Big-endian hosts would need byte swapping, which this implementation does not do.</summary>
    internal static void EnsureLittleEndian()
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors I/O is implemented for little-endian hosts only");
    }
}

/// <summary>Raw access to a CPU tensor's native memory.</summary>
public static class TensorBytes
{
    /// <summary>
    /// The address of the first element of a CPU tensor (PyTorch's <c>tensor.data_ptr()</c>), valid while the tensor and its
    /// storage live; <see cref="IntPtr.Zero"/> for a tensor without elements. For a contiguous tensor the
    /// <c>numel * element_size</c> bytes from there are its data, in row-major order.
    /// </summary>
    /// <exception cref="ArgumentException">The tensor is not on the CPU.</exception>
    public static IntPtr data_ptr(this Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        if (tensor.device_type != DeviceType.CPU)
            throw new ArgumentException($"data_ptr needs a CPU tensor, got one on {tensor.device}", nameof(tensor));
        if (tensor.NumberOfElements == 0) return IntPtr.Zero;
        // A one-element view at the same storage offset: TorchSharp's `bytes` hands out a span at its data pointer.
        using var first = tensor.as_strided([1], [1], tensor.storage_offset());
        unsafe
        {
            return (IntPtr)Unsafe.AsPointer(ref MemoryMarshal.GetReference(first.bytes));
        }
    }
}
