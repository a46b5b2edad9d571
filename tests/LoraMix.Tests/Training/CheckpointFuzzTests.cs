using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using CsCheck;
using Xunit.Abstractions;
using LoraMix.Checkpoints;
using LoraMix.Training;
using static TorchSharp.torch;

namespace LoraMix.Tests.Training;

/// <summary>
/// Property: a real checkpoint with random damage to its metadata files (trainer_state.json, scheduler.json,
/// training_args.json), its RNG state, its optimizer state or its weights either resumes, or fails with a
/// <see cref="LoraMixException"/> — never another exception type, never a native abort (which would kill the test host),
/// and within a bounded time. Each property samples for 6 seconds (as many mutated checkpoints as fit, one at a time).
/// </summary>
public sealed class CheckpointFuzzTests(CheckpointFixture fx, ITestOutputHelper output) : IClassFixture<CheckpointFixture>
{
    private static readonly string[] Files =
        [Trainer.StateFile, Trainer.SchedulerFile, Trainer.ArgsFile, Trainer.RngFile, Trainer.OptimizerFile, "adapter_model.safetensors"];

    /// <summary>One deterministic way of damaging one file of a checkpoint.</summary>
    public sealed record Mutation(int File, int Kind, int A, int B)
    {
        public override string ToString() => $"{Files[File]}: kind {Kind} ({A}, {B})";
    }

    private static Gen<Mutation> GenMutation(int firstFile, int lastFile) =>
        Gen.Select(Gen.Int[firstFile, lastFile], Gen.Int[0, 6], Gen.Int[0, int.MaxValue], Gen.Int[0, int.MaxValue])
            .Select((f, k, a, b) => new Mutation(f, k, a, b));

    // ------------------------------------------------------------------ JSON damage

    private static readonly string[] JsonValues =
    [
        "\"x\"", "\"\"", "-1", "0", "1", "2", "3", "2147483648", "-9223372036854775809", "1e308", "1.5", "-0.0", "true", "null",
        "[]", "{}", "[1,\"a\",null]", "{\"step\":\"a\",\"loss\":[]}", "\"\\u0000\"", "\"checkpoint-2\"", "99999999999999999999999", "1e-400",
        "\"latest\"", "\"cosine\"", "[[[[[[[[]]]]]]]]",
    ];

    private static readonly string[] JsonFiles =
    [
        "", "{", "}", "[]", "null", "\"text\"", "1", "{}", "{\"global_step\":2,\"global_step\":2}", "\uFEFF{}", "{\"a\":\"\\ud800\"}",
        new string('[', 65) + new string(']', 65), "{\"global_step\":2} trailing", "\u0000\u0001\u0002",
    ];

    private static void DamageJson(string path, Mutation m)
    {
        var bytes = File.ReadAllBytes(path);
        if (m.Kind is 0 or 1 or 5 && JsonNode.Parse(bytes) is null)
        {
            File.WriteAllText(path, JsonValues[m.B % JsonValues.Length]);   // the file is JSON null: replace it instead
            return;
        }
        switch (m.Kind)
        {
            case 0:   // replace one value anywhere in the tree
            {
                var root = JsonNode.Parse(bytes)!;
                var nodes = new List<JsonNode>();
                Walk(root, nodes);
                var target = nodes[m.A % nodes.Count];
                var value = JsonNode.Parse(JsonValues[m.B % JsonValues.Length]);
                if (target.Parent is JsonObject po) po[target.GetPropertyName()] = value;
                else if (target.Parent is JsonArray pa) pa[target.GetElementIndex()] = value;
                else root = value ?? JsonValue.Create("null-root")!;
                File.WriteAllText(path, root.ToJsonString());
                return;
            }
            case 1:   // remove one key anywhere
            {
                var root = JsonNode.Parse(bytes)!;
                var nodes = new List<JsonNode>();
                Walk(root, nodes);
                var keyed = nodes.Where(n => n.Parent is JsonObject).ToList();
                if (keyed.Count > 0)
                {
                    var n = keyed[m.A % keyed.Count];
                    ((JsonObject)n.Parent!).Remove(n.GetPropertyName());
                }
                File.WriteAllText(path, root.ToJsonString());
                return;
            }
            case 2:   // flip a bit
                if (bytes.Length > 0) bytes[m.A % bytes.Length] ^= (byte)(1 << (m.B % 8));
                File.WriteAllBytes(path, bytes);
                return;
            case 3:   // truncate
                File.WriteAllBytes(path, bytes[..(m.A % Math.Max(1, bytes.Length))]);
                return;
            case 4:   // another file altogether
                File.WriteAllText(path, JsonFiles[m.B % JsonFiles.Length]);
                return;
            case 5:   // a duplicate (or new) key at the root
            {
                var root = JsonNode.Parse(bytes)!.AsObject();
                var keys = root.Select(p => p.Key).Append("extra").ToList();
                string text = Encoding.UTF8.GetString(bytes);
                int brace = text.IndexOf('{', StringComparison.Ordinal);
                text = text[..(brace + 1)] + $"\"{keys[m.A % keys.Count]}\": {JsonValues[m.B % JsonValues.Length]}, " + text[(brace + 1)..];
                File.WriteAllText(path, text);
                return;
            }
            default:
                File.Delete(path);
                return;
        }
    }

    private static void Walk(JsonNode? node, List<JsonNode> into)
    {
        if (node is null) return;
        into.Add(node);
        if (node is JsonObject o) foreach (var (_, v) in o.ToList()) Walk(v, into);
        if (node is JsonArray a) foreach (var v in a.ToList()) Walk(v, into);
    }

    // ------------------------------------------------------------------ safetensors damage

    private static readonly string[] MetadataValues =
        ["", "abc", "-1", "0", "1", "2", "3", "99999999999999999999", "1e3", " 2", "0x10", "2.0", "loramix-adamw", "loramix-rng", "٣"];

    private static readonly int[] RngOffsets = [8, 12, 16, 20, 5040, 5052, 5024, 5048, 0, 24];
    private static readonly long[] RngValues = [0, 1, -1, 2, 623, 624, 625, int.MaxValue, int.MinValue, 1L << 32];

    private static void DamageSafetensors(string path, Mutation m)
    {
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 8)
        {
            File.WriteAllBytes(path, [.. bytes, (byte)m.B]);   // already truncated: grow it by a byte instead
            return;
        }
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        long dataStart = headerLength <= (ulong)(bytes.Length - 8) ? 8 + (long)headerLength : bytes.Length;   // no data when the header is damaged
        switch (m.Kind)
        {
            case 0:   // flip a bit anywhere
                bytes[m.A % bytes.Length] ^= (byte)(1 << (m.B % 8));
                File.WriteAllBytes(path, bytes);
                return;
            case 1:   // flip a bit in the data
                if (dataStart < bytes.Length) bytes[dataStart + m.A % (bytes.Length - dataStart)] ^= (byte)(1 << (m.B % 8));
                File.WriteAllBytes(path, bytes);
                return;
            case 2:   // truncate
                File.WriteAllBytes(path, bytes[..(m.A % bytes.Length)]);
                return;
            case 3:   // a metadata value
                CheckpointFixture.RewriteSafetensors(path, (_, meta) =>
                {
                    var keys = meta.Keys.Order(StringComparer.Ordinal).Append("format").Append("extra").ToList();
                    string key = keys[m.A % keys.Count];
                    if (m.B % 17 == 16) meta.Remove(key);
                    else meta[key] = MetadataValues[m.B % MetadataValues.Length];
                });
                return;
            case 4:   // a tensor's shape, dtype, presence or values
                CheckpointFixture.RewriteSafetensors(path, (t, _) =>
                {
                    var names = t.Keys.Order(StringComparer.Ordinal).ToList();
                    if (names.Count == 0)
                    {
                        t["extra"] = zeros(3);
                        return;
                    }
                    string name = names[m.A % names.Count];
                    var x = t[name];
                    switch (m.B % 8)
                    {
                        case 0: t[name] = x.dim() == 1 ? x.reshape(1, -1) : x.reshape(-1); break;
                        case 1: t[name] = x.numel() > 1 ? x.flatten().narrow(0, 0, x.numel() - 1) : zeros(2); break;
                        case 2: t[name] = x.to(ScalarType.Float16); break;
                        case 3: t[name] = x.to(ScalarType.Int64); break;
                        case 4: t.Remove(name); break;
                        case 5: t["extra"] = zeros(3); break;
                        case 6: t[name] = x.is_floating_point() ? full_like(x, double.NaN) : full_like(x, 255); break;
                        default: t[name] = x.is_floating_point() ? full_like(x, -1e30) : x.to(ScalarType.Float32); break;
                    }
                });
                return;
            case 5:   // an integer field of the data (for the RNG state: left, seeded, next, flags)
            {
                long dataLength = bytes.Length - dataStart;
                int offset = RngOffsets[m.A % RngOffsets.Length];
                if (dataLength >= offset + 8)
                {
                    long v = m.B % 3 == 0 ? m.B : RngValues[m.B % RngValues.Length];
                    BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan((int)(dataStart + offset)), v);
                }
                File.WriteAllBytes(path, bytes);
                return;
            }
            default:
                File.Delete(path);
                return;
        }
    }

    // ------------------------------------------------------------------ the property

    private void Check(Mutation[] mutations)
    {
        var e = DamageAndResume(mutations);
        // TorchSharp 0.107 does not keep a temporary Scalar (e.g. the implicit alpha of tensor + tensor) alive across its
        // native call, so under GC pressure from parallel tests the finalizer can free it mid-call and libtorch reports a
        // garbage scalar from c10/core/Scalar.h (in the forward pass, unrelated to the checkpoint). The same damaged
        // checkpoint is then resumed once more: a second failure of any non-LoraMix kind fails the property.
        if (e is System.Runtime.InteropServices.ExternalException x && x.Message.Contains("c10/core/Scalar.h", StringComparison.Ordinal))
            e = DamageAndResume(mutations);
        if (e is not null && e is not LoraMixException)
            Assert.Fail($"{string.Join("; ", mutations.AsEnumerable())}: {e.GetType().FullName}: {e}");
    }

    /// <summary>Applies the mutations to a fresh copy of the checkpoint and resumes from it; the error, or null.</summary>
    private Exception? DamageAndResume(Mutation[] mutations)
    {
        string copy = fx.FreshCopy();
        try
        {
            foreach (var m in mutations)
            {
                string path = Path.Combine(copy, Files[m.File]);
                if (!File.Exists(path)) continue;
                try
                {
                    if (m.File <= 2) DamageJson(path, m);
                    else DamageSafetensors(path, m);
                }
                catch (Exception damageError) when (damageError is System.Text.Json.JsonException or InvalidOperationException or LoraMixException or ArgumentException)
                {
                    // an earlier mutation already made the file unreadable to the structured mutator: it stays as it is
                }
            }
            var clock = Stopwatch.StartNew();
            var e = fx.Resume(copy);
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"resume took {clock.Elapsed} after {string.Join("; ", mutations.AsEnumerable())}");
            return e;
        }
        finally
        {
            try { Directory.Delete(Path.GetDirectoryName(copy)!, recursive: true); } catch (IOException) { }
        }
    }

    [Fact]
    public void DamagedMetadataFilesResumeOrFailWithALoraMixException() =>
        GenMutation(0, 2).Array[1, 2].Sample(Check, writeLine: output.WriteLine, time: 6, threads: 1);

    [Fact]
    public void DamagedRngStatesResumeOrFailWithALoraMixException() =>
        GenMutation(3, 3).Array[1, 2].Sample(Check, writeLine: output.WriteLine, time: 6, threads: 1);

    [Fact]
    public void DamagedOptimizerStatesAndWeightsResumeOrFailWithALoraMixException() =>
        GenMutation(4, 5).Array[1, 2].Sample(Check, writeLine: output.WriteLine, time: 6, threads: 1);
}
