using LoraMix.Adapters.Lora;
using LoraMix.Cli;
using LoraMix.Modeling;
using LoraMix.Tests.Cli;
using LoraMix.Tests.Training;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Checkpoints;

/// <summary>
/// Whole-directory outputs appear complete or not at all (<see cref="AtomicDirectory"/>, <c>loramix merge</c>), and the
/// temporaries a killed save leaves behind are removed by the next run — only LoraMix's own, only of dead processes.
/// </summary>
public sealed class AtomicOutputTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>A process id that cannot be running (above Linux's and Windows' limits).</summary>
    private const int DeadPid = 999_999_999;

    private static string Guid32() => Guid.NewGuid().ToString("N");

    private static string[] Listing(string dir) =>
        Directory.EnumerateFileSystemEntries(dir, "*", SearchOption.AllDirectories).Select(p => Path.GetRelativePath(dir, p)).Order(StringComparer.Ordinal).ToArray();

    // ------------------------------------------------------------------ AtomicDirectory

    [Fact]
    public void AFailureMidWriteLeavesNoPartialDirectory()
    {
        string target = _dir.File("out");
        var e = Assert.Throws<IOException>(() => AtomicDirectory.Write(target, temp =>
        {
            File.WriteAllText(Path.Combine(temp, "config.json"), "{}");
            throw new IOException("No space left on device");
        }, overwrite: false));
        Assert.Equal("No space left on device", e.Message);
        Assert.False(Path.Exists(target));
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path));   // no temporary left either
    }

    [Fact]
    public void AnExistingDirectoryIsReplacedOnlyWhenTheNewOneIsCompleteAndOnlyWhenAllowed()
    {
        string target = _dir.File("out");
        Directory.CreateDirectory(target);
        File.WriteAllText(Path.Combine(target, "config.json"), "old");
        File.WriteAllText(Path.Combine(target, "model.safetensors"), "old weights");

        // not allowed: refused before building anything
        bool built = false;
        var refused = Assert.Throws<LoraMixException>(() => AtomicDirectory.Write(target, _ => built = true, overwrite: false));
        Assert.Contains("already exists and is not empty", refused.Message);
        Assert.False(built);

        // allowed, but the build fails halfway: the old directory is intact
        Assert.Throws<InvalidOperationException>(() => AtomicDirectory.Write(target, temp =>
        {
            File.WriteAllText(Path.Combine(temp, "config.json"), "new");
            throw new InvalidOperationException("injected");
        }, overwrite: true));
        Assert.Equal(["config.json", "model.safetensors"], Listing(target));
        Assert.Equal("old", File.ReadAllText(Path.Combine(target, "config.json")));

        // allowed and complete: replaced as a whole (the old weights do not survive beside the new config)
        AtomicDirectory.Write(target, temp => File.WriteAllText(Path.Combine(temp, "config.json"), "new"), overwrite: true);
        Assert.Equal(["config.json"], Listing(target));
        Assert.Equal("new", File.ReadAllText(Path.Combine(target, "config.json")));
        Assert.Equal(["out"], Directory.EnumerateFileSystemEntries(_dir.Path).Select(Path.GetFileName));

        // an empty directory may be filled without overwrite; a file is refused
        string empty = _dir.File("empty");
        Directory.CreateDirectory(empty);
        AtomicDirectory.Write(empty, temp => File.WriteAllText(Path.Combine(temp, "a"), "a"), overwrite: false);
        Assert.Equal(["a"], Listing(empty));
        File.WriteAllText(_dir.File("file"), "x");
        Assert.Contains("existing file", Assert.Throws<LoraMixException>(() => AtomicDirectory.Write(_dir.File("file"), _ => { }, overwrite: true)).Message);
    }

    [Fact]
    public void AMergedExportThatFailsBeforeTheTokenizerCopyLeavesNothing()
    {
        using var model = ModelPresets.CreateRandom("tiny", 3);
        LoraAdapters.Attach(model, TrainingFixtures.Lora, seed: 1);
        string target = _dir.File("merged");
        Assert.Throws<IOException>(() => AtomicDirectory.Write(target, temp =>
        {
            LoraAdapters.ExportMerged(model, temp);
            Assert.True(File.Exists(Path.Combine(temp, "config.json")) && File.Exists(Path.Combine(temp, "model.safetensors")));
            throw new IOException("No space left on device");     // e.g. while copying the tokenizer files
        }, overwrite: false));
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path));
    }

    // ------------------------------------------------------------------ loramix merge

    private string TinyAdapter(string model)
    {
        string adapter = _dir.File("adapter");
        using var m = LlamaForCausalLM.FromPretrained(model);
        LoraAdapters.Attach(m, TrainingFixtures.Lora, seed: 1);
        LoraAdapters.Save(m, TrainingFixtures.Lora, adapter);
        return adapter;
    }

    [Fact]
    public void MergeRefusesToClobberAndReplacesWithOverwrite()
    {
        string model = RecipeFixtures.TinyByteModel(_dir.File("base"));
        string adapter = TinyAdapter(model);
        string outDir = _dir.File("merged");
        Directory.CreateDirectory(outDir);
        File.WriteAllText(Path.Combine(outDir, "notes.txt"), "mine");

        var refused = CliRun.Run("merge", "--model", model, "--adapter", adapter, "--out", outDir);
        Assert.Equal(CliApp.ExitError, refused.Code);
        Assert.Contains("--overwrite", refused.Err);
        Assert.Equal(["notes.txt"], Listing(outDir));

        var inside = CliRun.Run("merge", "--model", model, "--adapter", adapter, "--out", _dir.Path, "--overwrite");
        Assert.Equal(CliApp.ExitError, inside.Code);
        Assert.Contains("would delete the input", inside.Err);
        Assert.True(File.Exists(Path.Combine(model, "model.safetensors")));

        var ok = CliRun.Run("merge", "--model", model, "--adapter", adapter, "--out", outDir, "--overwrite");
        Assert.True(ok.Code == 0, ok.Err);
        Assert.False(File.Exists(Path.Combine(outDir, "notes.txt")));
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json" })
            Assert.True(File.Exists(Path.Combine(outDir, f)), f);
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path, ".*"));
    }

    [Fact]
    public void AMergeThatFailsMidWriteLeavesNoOutput()
    {
        if (OperatingSystem.IsWindows()) return;   // needs a dangling symbolic link
        string model = RecipeFixtures.TinyByteModel(_dir.File("base"));
        string adapter = TinyAdapter(model);
        // the weights and config.json are written, then copying this tokenizer file fails
        File.CreateSymbolicLink(Path.Combine(model, "tokenizer.model"), _dir.File("does-not-exist"));
        string outDir = _dir.File("merged");

        var r = CliRun.Run("merge", "--model", model, "--adapter", adapter, "--out", outDir);
        Assert.Equal(CliApp.ExitError, r.Code);
        Assert.False(Path.Exists(outDir));
        Assert.Empty(Directory.EnumerateFileSystemEntries(_dir.Path, ".*"));
    }

    // ------------------------------------------------------------------ stale temporaries

    /// <summary>Fake leftovers of a killed run (to be removed) and look-alikes that are not LoraMix's or not stale (to be kept).</summary>
    private static (string[] Stale, string[] Kept) PlantLeftovers(string dir)
    {
        Directory.CreateDirectory(dir);
        string g = Guid32();
        var staleDirs = new[] { $".checkpoint-3.{DeadPid}.{g}.tmp", $".checkpoint-2.{Guid32()}.tmp" };
        var staleFiles = new[]
        {
            $".model.safetensors.{DeadPid}.{Guid32()}.tmp", $".adapter_model.safetensors.{DeadPid}.{Guid32()}.tmp",
            $".model-00001-of-00002.safetensors.{DeadPid}.{Guid32()}.partial", $".trainer_state.json.{DeadPid}.{Guid32()}.tmp",
        };
        foreach (var d in staleDirs)
        {
            Directory.CreateDirectory(Path.Combine(dir, d));
            File.WriteAllText(Path.Combine(dir, d, "optimizer.safetensors"), "partial");
        }
        foreach (var f in staleFiles) File.WriteAllText(Path.Combine(dir, f), "partial");
        var kept = new[]
        {
            "notes.txt", ".hidden", "keep.tmp", ".model.safetensors.tmp", $".model.safetensors.{DeadPid}.nothex.tmp",
            $".model.safetensors.{Environment.ProcessId}.{Guid32()}.tmp",            // a live process: maybe still writing
            $".model.safetensors.{DeadPid}.{Guid32().ToUpperInvariant()}.tmp",       // not LoraMix's spelling
            $"model.safetensors.{DeadPid}.{Guid32()}.tmp", $".x.{DeadPid}.{Guid32()}.bak",
        };
        foreach (var f in kept) File.WriteAllText(Path.Combine(dir, f), "keep");
        Directory.CreateDirectory(Path.Combine(dir, ".cache"));
        File.WriteAllText(Path.Combine(dir, ".cache", $".model.safetensors.{DeadPid}.{Guid32()}.tmp"), "nested: not ours to judge");
        return (staleDirs.Concat(staleFiles).ToArray(), kept.Append(".cache").ToArray());
    }

    [Fact]
    public void StaleTemporariesRemovesOnlyLoraMixLeftoversOfDeadProcesses()
    {
        string dir = _dir.File("out");
        var (stale, kept) = PlantLeftovers(dir);
        string link = Path.Combine(dir, $".linked.{DeadPid}.{Guid32()}.tmp");
        if (!OperatingSystem.IsWindows()) Directory.CreateSymbolicLink(link, _dir.Path);    // a link is never followed or removed

        var removed = StaleTemporaries.Remove(dir);
        Assert.Equal(stale.Order(StringComparer.Ordinal), removed.Select(Path.GetFileName).Order(StringComparer.Ordinal));
        foreach (var s in stale) Assert.False(Path.Exists(Path.Combine(dir, s)), s);
        foreach (var k in kept) Assert.True(Path.Exists(Path.Combine(dir, k)), k);
        Assert.Single(Directory.GetFiles(Path.Combine(dir, ".cache")));
        if (!OperatingSystem.IsWindows()) Assert.True(Directory.Exists(link) && Directory.Exists(_dir.Path));

        // only one output's temporaries when asked; a killed swap's .old is put back when its directory is gone
        string old = Path.Combine(dir, $".merged.{DeadPid}.{Guid32()}.old");
        Directory.CreateDirectory(old);
        File.WriteAllText(Path.Combine(old, "config.json"), "previous");
        File.WriteAllText(Path.Combine(dir, $".other.{DeadPid}.{Guid32()}.tmp"), "x");
        Assert.Single(StaleTemporaries.Remove(dir, "merged"));
        Assert.Equal("previous", File.ReadAllText(Path.Combine(dir, "merged", "config.json")));
        Assert.Single(Directory.GetFiles(dir, ".other.*"));
    }

    [Fact]
    public void ATrainingRunCleansTheLeftoversOfAKilledRunInItsOutputDirectory()
    {
        string outDir = _dir.File("run");
        var (stale, kept) = PlantLeftovers(outDir);
        var target = TrainingFixtures.TinyLora(out var model);
        using var _ = model;
        var rec = new TrainingFixtures.Recorder();
        new Trainer(target, TrainingFixtures.Options(outDir) with { MaxSteps = 1, SaveSteps = 1 }, progress: rec).Train(TrainingFixtures.RandomExamples(2, 1));

        foreach (var s in stale) Assert.False(Path.Exists(Path.Combine(outDir, s)), s);
        foreach (var k in kept) Assert.True(Path.Exists(Path.Combine(outDir, k)), k);
        Assert.Contains(rec.Messages, m => m.StartsWith($"removed {stale.Length} temporary file(s)", StringComparison.Ordinal));
        Assert.True(File.Exists(Path.Combine(outDir, "checkpoint-1", Trainer.StateFile)));
    }
}
