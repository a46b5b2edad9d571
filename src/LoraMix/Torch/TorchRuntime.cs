using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoraMix.Torch;

/// <summary>Device and dtype selection at run time, and a clear error when libtorch cannot be loaded.</summary>
public static class TorchRuntime
{
    /// <summary>Names accepted for dtypes (CLI <c>--dtype</c>, configs).</summary>
    public static readonly IReadOnlyList<string> DTypeNames = ["f32", "bf16", "f16"];

    /// <summary>Parses <c>cpu</c>, <c>cuda</c> or <c>cuda:N</c>; fails clearly when CUDA is asked for but absent.</summary>
    public static Device ParseDevice(string name)
    {
        EnsureLoaded();
        string n = name.Trim().ToLowerInvariant();
        if (n == "cpu") return CPU;
        if (n == "cuda" || n.StartsWith("cuda:", StringComparison.Ordinal))
        {
            if (!cuda.is_available())
                throw new LoraMixException(
                    $"device '{name}' was requested but CUDA is not available: this build references the CPU libtorch " +
                    "(TorchSharp-cpu). Reference TorchSharp-cuda-linux (or -windows) instead of TorchSharp-cpu, on a machine " +
                    "with an NVIDIA driver, and pass --device cuda.");
            return new Device(n);
        }
        throw new LoraMixException($"unknown device '{name}'; expected cpu, cuda or cuda:N");
    }

    /// <summary>Parses <c>f32</c>/<c>float32</c>/<c>fp32</c>, <c>bf16</c>/<c>bfloat16</c>, <c>f16</c>/<c>float16</c>/<c>fp16</c>.</summary>
    public static ScalarType ParseDType(string name) => name.Trim().ToLowerInvariant() switch
    {
        "f32" or "fp32" or "float32" or "float" => ScalarType.Float32,
        "bf16" or "bfloat16" => ScalarType.BFloat16,
        "f16" or "fp16" or "float16" or "half" => ScalarType.Float16,
        _ => throw new LoraMixException($"unknown dtype '{name}'; expected one of {string.Join(", ", DTypeNames)}"),
    };

    /// <summary>The Hugging Face <c>torch_dtype</c> name of a dtype.</summary>
    public static string HfName(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => "float32",
        ScalarType.BFloat16 => "bfloat16",
        ScalarType.Float16 => "float16",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a model dtype"),
    };

    private static bool s_loaded;

    /// <summary>The OpenMP wait policy LoraMix asks for when the environment does not name one.</summary>
    public const string DefaultOmpWaitPolicy = "PASSIVE";

    /// <summary>
    /// Loads libtorch, turning the loader's failure into an actionable message. Before the first load it sets the native
    /// environment's <c>OMP_WAIT_POLICY</c> to <see cref="DefaultOmpWaitPolicy"/> unless it is already set (see
    /// <see cref="ConfigureOpenMP"/>): call this before any other TorchSharp call for the setting to take effect.
    /// </summary>
    public static void EnsureLoaded()
    {
        if (s_loaded) return;
        ConfigureOpenMP();
        try
        {
            _ = TorchSharp.torch.__version__;
            using var probe = ones(1);
            s_loaded = true;
        }
        catch (Exception e) when (e is TypeInitializationException or DllNotFoundException or NotSupportedException)
        {
            throw new LoraMixException(
                "libtorch could not be loaded. On Debian 12 / Ubuntu 22.04 TorchSharp's libLibTorchSharp.so needs a newer " +
                "libstdc++ (GLIBCXX_3.4.32); LoraMix's build patches its own copy of that library automatically (see " +
                "build/LoraMix.NativeFix.targets): build through the LoraMix projects, or set LoraMixSkipNativeFix=false. " +
                $"Loader error: {e.GetBaseException().Message}", e);
        }
    }

    /// <summary>
    /// Makes libtorch's OpenMP threads sleep, not spin, while they wait (<c>OMP_WAIT_POLICY=PASSIVE</c>), unless the
    /// process environment already says otherwise. libtorch's CPU build uses GNU OpenMP, whose threads otherwise spin at a
    /// barrier for up to ~300,000 iterations: when another busy process shares the cores, a spinning thread burns the time
    /// slice that the thread it waits for needs, and training slowed 3–20x on 2 cores (measured, docs/BENCHMARKS.md);
    /// sleeping threads cost about 1–3 % when the machine is idle. The variable is read once, when libgomp loads, so it is
    /// set in the native environment (<c>setenv</c>; .NET's <see cref="Environment.SetEnvironmentVariable(string, string)"/>
    /// does not reach native code on Unix) before libtorch is first touched. Returns the policy in effect, or null when it
    /// could not be set (not Linux/macOS, or libtorch already loaded by other code).
    /// </summary>
    public static string? ConfigureOpenMP()
    {
        if (s_ompPolicy is not null) return s_ompPolicy;
        string? existing = Environment.GetEnvironmentVariable("OMP_WAIT_POLICY");
        if (!string.IsNullOrEmpty(existing)) return s_ompPolicy = existing;
        if (!(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS())) return null;
        try
        {
            if (SetEnv("OMP_WAIT_POLICY", DefaultOmpWaitPolicy, 0) != 0) return null;
            Environment.SetEnvironmentVariable("OMP_WAIT_POLICY", DefaultOmpWaitPolicy);   // keep the managed view in step (child processes)
            return s_ompPolicy = DefaultOmpWaitPolicy;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }

    private static string? s_ompPolicy;

    [DllImport("libc", EntryPoint = "setenv", CharSet = CharSet.Ansi)]
    private static extern int SetEnv(string name, string value, int overwrite);

    private static bool s_allocatorTuned;

    /// <summary>
    /// Keeps large CPU tensor buffers in the process heap instead of fresh <c>mmap</c> regions (glibc only). libtorch's CPU
    /// allocator uses <c>malloc</c>; glibc serves blocks above 128 KiB with <c>mmap</c> and unmaps them on free, so every
    /// activation of a forward pass is page-faulted anew (the 65 MB logits of a 512-token prefill cost ~100 ms of
    /// faults on 2 cores). Raising the mmap and trim thresholds makes freed blocks reusable, as jemalloc/tcmalloc do for
    /// PyTorch users. Idempotent; a no-op off Linux or on a libc without <c>mallopt</c>. Returns whether it took effect.
    /// </summary>
    public static bool TuneNativeAllocator()
    {
        if (s_allocatorTuned) return true;
        if (!OperatingSystem.IsLinux()) return false;
        try
        {
            const int M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3;
            // glibc caps the mmap threshold (32 MiB on older releases); try larger first so that logits-sized blocks stay too.
            bool ok = (Mallopt(M_MMAP_THRESHOLD, 256 << 20) == 1 || Mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1)
                      && Mallopt(M_TRIM_THRESHOLD, 512 << 20) == 1;
            s_allocatorTuned = ok;
            return ok;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
    }

    [DllImport("libc", EntryPoint = "mallopt")]
    private static extern int Mallopt(int parameter, int value);
}
