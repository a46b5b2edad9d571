using System.Buffers.Binary;
using static TorchSharp.torch;

namespace LoraMix.Training;

/// <summary>
/// Validation of a libtorch CPU generator state (what <c>torch.get_rng_state()</c> returns) before it is handed to
/// <c>set_rng_state</c>. libtorch answers a state it dislikes with a native <c>c10::Error</c> that TorchSharp does not
/// catch, which aborts the process; so every condition libtorch checks, and the invariants its Mersenne Twister relies on
/// without checking, are checked here first.
/// </summary>
/// <remarks>
/// The layout is libtorch's <c>CPUGeneratorImplState</c> (5056 bytes, little-endian): <c>the_initial_seed</c> u64 @0,
/// <c>left</c> i32 @8, <c>seeded</c> i32 @12, <c>next</c> u64 @16, <c>state</c> 624 × u64 @24, <c>normal_x</c>,
/// <c>normal_y</c>, <c>normal_rho</c> f64 @5016/5024/5032, <c>normal_is_valid</c> i32 @5040, then
/// <c>next_float_normal_sample</c> f32 @5048 and <c>is_next_float_normal_sample_valid</c> u8 @5052. libtorch refuses any
/// other size (except a legacy 5048-byte layout LoraMix never writes), a state that is not seeded, <c>left</c> outside
/// 1..624 or <c>next</c> above 624. Its generator reads <c>state[next]</c> after decrementing <c>left</c> and regenerates
/// when <c>left</c> reaches 0, so a state it produced has <c>left + next = 625</c> (or left 1, next 0 right after seeding);
/// any other pair would read past the state array, and is refused too.
/// </remarks>
public static class CpuGeneratorState
{
    /// <summary>The size of the state this validator knows (libtorch's <c>sizeof(CPUGeneratorImplState)</c>).</summary>
    public const int Bytes = 5056;

    /// <summary>Mersenne Twister state words.</summary>
    public const int MersenneStateN = 624;

    private static readonly Lazy<long> s_live = new(() =>
    {
        using var state = random.get_rng_state();
        return state.numel();
    });

    /// <summary>The size of the CPU generator state of the libtorch in this process.</summary>
    public static long LiveBytes => s_live.Value;

    /// <summary>The first problem of <paramref name="state"/> as a sentence, or null when libtorch accepts it safely.</summary>
    public static string? Check(ReadOnlySpan<byte> state)
    {
        if (LiveBytes != Bytes)
            return $"this libtorch's CPU generator state is {LiveBytes} bytes, not the {Bytes}-byte layout LoraMix validates, so a saved state cannot be restored safely";
        if (state.Length != Bytes)
            return $"the state is {state.Length} bytes; libtorch's CPU generator state is {Bytes} bytes";
        int left = BinaryPrimitives.ReadInt32LittleEndian(state[8..]);
        int seeded = BinaryPrimitives.ReadInt32LittleEndian(state[12..]);
        ulong next = BinaryPrimitives.ReadUInt64LittleEndian(state[16..]);
        if (seeded != 1) return $"'seeded' is {seeded}, expected 1 (a seeded generator)";
        if (left < 1 || left > MersenneStateN) return $"'left' is {left}, expected 1..{MersenneStateN}";
        if (next > MersenneStateN) return $"'next' is {next}, expected 0..{MersenneStateN}";
        if (!(left + (long)next == MersenneStateN + 1 || (left == 1 && next == 0)))
            return $"'left' {left} and 'next' {next} are inconsistent (a generator state has left + next = {MersenneStateN + 1}, or left 1 and next 0 after seeding)";
        int normalValid = BinaryPrimitives.ReadInt32LittleEndian(state[5040..]);
        if (normalValid is not (0 or 1)) return $"'normal_is_valid' is {normalValid}, expected 0 or 1";
        double normalY = BinaryPrimitives.ReadDoubleLittleEndian(state[5024..]);
        if (normalValid == 1 && !double.IsFinite(normalY)) return $"the cached normal sample is {normalY}, expected a finite number";
        byte floatValid = state[5052];
        if (floatValid is not (0 or 1)) return $"'is_next_float_normal_sample_valid' is {floatValid}, expected 0 or 1";
        float nextFloat = BinaryPrimitives.ReadSingleLittleEndian(state[5048..]);
        if (floatValid == 1 && !float.IsFinite(nextFloat)) return $"the cached float normal sample is {nextFloat}, expected a finite number";
        return null;
    }
}
