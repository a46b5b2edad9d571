using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using LoraMix.Adapters;
using LoraMix.Adapters.Lora;
using LoraMix.Adapters.MixLora;
using LoraMix.Checkpoints;
using LoraMix.Modeling;
using LoraMix.Tokenization;

namespace LoraMix.Tests.Checkpoints;

/// <summary>A fact that needs FIFOs, sockets and /dev (skipped at discovery on Windows).</summary>
internal sealed class UnixFactAttribute : FactAttribute
{
    public UnixFactAttribute()
    {
        if (OperatingSystem.IsWindows()) Skip = "needs a Unix file system (FIFOs, sockets, /dev)";
    }
}

/// <summary>Every loader refuses non-regular files (FIFO, socket, device, directory) by name, and JSON with duplicate keys.</summary>
public sealed class InputFilesTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [DllImport("libc", EntryPoint = "mkfifo", SetLastError = true)]
    private static extern int MkFifo([MarshalAs(UnmanagedType.LPUTF8Str)] string path, uint mode);

    private static void Fifo(string path) =>
        Assert.True(MkFifo(path, 0x1B6) == 0, $"mkfifo {path} failed: errno {Marshal.GetLastPInvokeError()}");

    /// <summary>Runs a loader that must fail at once; a loader that opened the FIFO would block forever, so the test
    /// fails (instead of hanging) if it has not returned after a generous 30 s.</summary>
    private static T Refuses<T>(Action load) where T : Exception
    {
        var task = Task.Run(() => Record.Exception(load));
        Assert.True(task.Wait(TimeSpan.FromSeconds(30)), "the loader blocked on a non-regular file");
        return Assert.IsAssignableFrom<T>(task.Result);
    }

    [UnixFact]
    public void KindOf_TellsFileTypesApart()
    {
        string regular = _dir.File("regular");
        File.WriteAllText(regular, "x");
        string fifo = _dir.File("fifo");
        Fifo(fifo);
        string socketPath = _dir.File("sock");
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Bind(new UnixDomainSocketEndPoint(socketPath));
        string link = _dir.File("link-to-zero");
        File.CreateSymbolicLink(link, "/dev/zero");

        Assert.Equal(InputFileKind.Regular, InputFiles.KindOf(regular));
        Assert.Equal(InputFileKind.Fifo, InputFiles.KindOf(fifo));
        Assert.Equal(InputFileKind.Socket, InputFiles.KindOf(socketPath));
        Assert.Equal(InputFileKind.CharacterDevice, InputFiles.KindOf("/dev/null"));
        Assert.Equal(InputFileKind.CharacterDevice, InputFiles.KindOf(link));
        Assert.Equal(InputFileKind.Directory, InputFiles.KindOf(_dir.Path));
        Assert.Equal(InputFileKind.Missing, InputFiles.KindOf(_dir.File("absent")));
        var e = Assert.Throws<LoraMixException>(() => InputFiles.RequireRegular(fifo, r => new LoraMixException($"{fifo}: {r}")));
        Assert.Contains("FIFO", e.Message);
        InputFiles.RequireRegular(regular, r => new LoraMixException(r));
        InputFiles.RequireRegular(_dir.File("absent"), r => new LoraMixException(r));
    }

    [UnixFact]
    public void ModelLoaders_RefuseFifosDevicesAndDirectories_NamingThePath()
    {
        // config.json as a FIFO, and as a link to /dev/zero (which would never end)
        string a = _dir.File("a");
        Directory.CreateDirectory(a);
        Fifo(Path.Combine(a, "config.json"));
        var ce = Refuses<ModelConfigException>(() => LlamaConfig.Load(Path.Combine(a, "config.json")));
        Assert.Contains(Path.Combine(a, "config.json"), ce.Message);
        Assert.Contains("FIFO", ce.Message);
        string zero = _dir.File("zero.json");
        File.CreateSymbolicLink(zero, "/dev/zero");
        Assert.Contains("character device", Refuses<ModelConfigException>(() => LlamaConfig.Load(zero)).Message);

        // model.safetensors as a FIFO, a directory; a shard as a FIFO; the index as a FIFO
        string b = _dir.File("b");
        Directory.CreateDirectory(b);
        Fifo(Path.Combine(b, "model.safetensors"));
        var se = Refuses<SafetensorsFormatException>(() => SafetensorsCheckpoint.OpenDirectory(b));
        Assert.Contains(Path.Combine(b, "model.safetensors"), se.Message);
        string c = _dir.File("c");
        Directory.CreateDirectory(Path.Combine(c, "model.safetensors"));
        Assert.Contains("a directory", Refuses<SafetensorsFormatException>(() => SafetensorsCheckpoint.OpenDirectory(c)).Message);
        string d = _dir.File("d");
        Directory.CreateDirectory(d);
        File.WriteAllText(Path.Combine(d, "model.safetensors.index.json"), "{\"weight_map\": {\"w\": \"s1.safetensors\"}}");
        Fifo(Path.Combine(d, "s1.safetensors"));
        Assert.Contains("s1.safetensors", Refuses<SafetensorsFormatException>(() => SafetensorsCheckpoint.OpenDirectory(d)).Message);
        string e = _dir.File("e");
        Directory.CreateDirectory(e);
        Fifo(Path.Combine(e, "model.safetensors.index.json"));
        Assert.Contains("index.json", Refuses<CheckpointFormatException>(() => SafetensorsCheckpoint.OpenDirectory(e)).Message);
        // torch zip checkpoints
        Refuses<CheckpointFormatException>(() => TorchPickleReader.Read(Path.Combine(b, "model.safetensors")));
        Refuses<CheckpointFormatException>(() => TorchPickleReader.ReadEntries(Path.Combine(b, "model.safetensors")));
    }

    [UnixFact]
    public void UserFileLoaders_RefuseFifosAndDevices_NamingThePath()
    {
        foreach (var name in new[] { "chat.json", "data.jsonl", "data.txt", "recipe.yaml" })
        {
            string fifo = _dir.File("fifo-" + name);
            Fifo(fifo);
            Exception e = name switch
            {
                "chat.json" => Refuses<LoraMix.Tokenization.ChatFileException>(() => LoraMix.Tokenization.ChatFile.Load(fifo)),
                "recipe.yaml" => Refuses<LoraMix.Configuration.ConfigFileException>(() => LoraMix.Configuration.ConfigDocument.Load(fifo)),
                _ => Refuses<LoraMix.Data.DatasetFileException>(() => LoraMix.Data.DatasetReader.Load(fifo)),
            };
            Assert.Contains(fifo, e.Message);
            Assert.Contains("FIFO", e.Message);
        }
        string zero = _dir.File("zero.jsonl");
        File.CreateSymbolicLink(zero, "/dev/zero");
        Assert.Contains("character device", Refuses<LoraMix.Data.DatasetFileException>(() => LoraMix.Data.DatasetReader.Load(zero)).Message);
    }

    [UnixFact]
    public void TokenizerLoaders_RefuseFifos()
    {
        foreach (var name in new[] { "tokenizer.json", "tokenizer.model" })
        {
            string dir = _dir.File("tok-" + name);
            Directory.CreateDirectory(dir);
            Fifo(Path.Combine(dir, name));
            var e = Refuses<TokenizerFileException>(() => TextTokenizer.FromDirectory(dir));
            Assert.Contains(name, e.FilePath);
        }
        string withConfig = _dir.File("tok-config");
        ByteLevelTokenizerFiles.Write(withConfig);
        File.Delete(Path.Combine(withConfig, "tokenizer_config.json"));
        Fifo(Path.Combine(withConfig, "tokenizer_config.json"));
        Assert.EndsWith("tokenizer_config.json", Refuses<TokenizerFileException>(() => TextTokenizer.FromDirectory(withConfig)).FilePath);
    }

    [UnixFact]
    public void AdapterLoaders_RefuseFifos()
    {
        using var model = LoraMix.Tests.Modeling.TestModels.Random(LoraMix.Tests.Modeling.TestModels.Llama, 1);
        string a = _dir.File("adapter-a");
        Directory.CreateDirectory(a);
        Fifo(Path.Combine(a, "adapter_config.json"));
        Assert.Equal(Path.Combine(a, "adapter_config.json"), Refuses<AdapterConfigException>(() => AdapterDirectory.Detect(a)).ConfigSource);
        Refuses<AdapterConfigException>(() => LoraAdapters.Load(model, a));
        Refuses<AdapterConfigException>(() => MixLoraAdapters.Load(model, a));

        // a valid config next to a FIFO weight file (bin: MixLoRA's fallback; safetensors: preferred)
        string b = _dir.File("adapter-b");
        Directory.CreateDirectory(b);
        File.WriteAllText(Path.Combine(b, "adapter_config.json"), new MixLoraConfig { R = 2, LoraAlpha = 4, NumExperts = 2, TopK = 1 }.ToJson());
        Fifo(Path.Combine(b, "adapter_model.bin"));
        Assert.Contains("adapter_model.bin", Refuses<CheckpointFormatException>(() => MixLoraAdapters.Load(model, b)).Message);
        Fifo(Path.Combine(b, "adapter_model.safetensors"));
        Assert.Contains("adapter_model.safetensors", Refuses<SafetensorsFormatException>(() => MixLoraAdapters.Load(model, b)).Message);
        Assert.Empty(MixLoraAdapters.AdapterNames(model));
    }

    [Theory]
    [InlineData("{\"a\": 1, \"a\": 2}", "a")]
    [InlineData("{\"a\": 1, \"\\u0061\": 2}", "a")]
    [InlineData("{\"x\": {\"b\": 1, \"c\": {\"d\": 1, \"d\": 1}}}", "x.c.d")]
    [InlineData("{\"list\": [1, {\"k\": 1}, {\"k\": 1, \"k\": 2}]}", "list[2].k")]
    [InlineData("{\"list\": [[], [{\"z\": 1, \"z\": 1}]]}", "list[1][0].z")]
    public void ValidateJson_NamesThePath(string json, string path)
    {
        var e = Assert.Throws<LoraMixException>(() =>
            InputFiles.ValidateJson(Encoding.UTF8.GetBytes(json), default, key => new LoraMixException(key)));
        Assert.Equal(path, e.Message);
    }

    [Theory]
    [InlineData("{\"a\": 1, \"b\": {\"a\": 2}, \"c\": [{\"a\": 1}, {\"a\": 2}]}")]
    [InlineData("[{\"a\": 1}, {\"a\": 1}]")]
    [InlineData("{}")]
    public void ValidateJson_AcceptsTheSameKeyInDifferentObjects(string json) =>
        InputFiles.ValidateJson(Encoding.UTF8.GetBytes(json), default, key => new LoraMixException(key));

    [Fact]
    public void ValidateJson_MalformedJson_IsJsonException() =>
        Assert.ThrowsAny<JsonException>(() =>
            InputFiles.ValidateJson(Encoding.UTF8.GetBytes("{\"a\": [1, 2}"), default, key => new LoraMixException(key)));

    [Fact]
    public void ReadAllBytes_RefusesFilesOverTheLimit_BeforeReading()
    {
        string path = _dir.File("big.json");
        File.WriteAllBytes(path, new byte[1000]);
        Assert.Equal(1000, InputFiles.ReadAllBytes(path, 1000, r => new LoraMixException(r)).Length);
        var e = Assert.Throws<LoraMixException>(() => InputFiles.ReadAllBytes(path, 999, r => new LoraMixException(r)));
        Assert.Contains("999-byte limit", e.Message);
    }

    [Fact]
    public void DuplicateKeys_InEveryJsonFileTheLoadersRead_AreErrorsNamingFileAndKey()
    {
        // config.json
        string cfg = _dir.File("config.json");
        File.WriteAllText(cfg, ModelPresets.Get("tiny").ToJson().ToJsonString().TrimEnd('}') + ", \"hidden_size\": 96}");
        var ce = Assert.Throws<ModelConfigException>(() => LlamaConfig.Load(cfg));
        Assert.Equal(("hidden_size", cfg), (ce.Key, ce.FilePath));
        Assert.Contains("twice", ce.Message);

        // adapter_config.json (LoRA and MixLoRA)
        string lora = _dir.File("lora");
        Directory.CreateDirectory(lora);
        File.WriteAllText(Path.Combine(lora, "adapter_config.json"), new LoraConfig().ToPeftJson().TrimEnd().TrimEnd('}') + ", \"r\": 64}");
        var le = Assert.Throws<AdapterConfigException>(() => LoraConfig.Load(Path.Combine(lora, "adapter_config.json")));
        Assert.Equal("r", le.Key);
        string mix = _dir.File("mix");
        Directory.CreateDirectory(mix);
        File.WriteAllText(Path.Combine(mix, "adapter_config.json"),
            new MixLoraConfig().ToJson().TrimEnd().TrimEnd('}') + ", \"num_experts\": 64}");
        Assert.Equal("num_experts", Assert.Throws<AdapterConfigException>(() => MixLoraConfig.Load(Path.Combine(mix, "adapter_config.json"))).Key);
        Assert.Equal("num_experts", Assert.Throws<AdapterConfigException>(() => AdapterDirectory.Detect(mix)).Key);

        // tokenizer_config.json and tokenizer.json
        string tok = _dir.File("tok");
        ByteLevelTokenizerFiles.Write(tok);
        string tc = Path.Combine(tok, "tokenizer_config.json");
        string original = File.ReadAllText(tc);
        File.WriteAllText(tc, original.TrimEnd().TrimEnd('}') + ", \"add_bos_token\": true, \"add_bos_token\": false}");
        var te = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(tok));
        Assert.Equal(("add_bos_token", tc), (te.Key, te.FilePath));
        File.WriteAllText(tc, original);
        string tj = Path.Combine(tok, "tokenizer.json");
        File.WriteAllText(tj, File.ReadAllText(tj).Replace("\"model\": {", "\"model\": {\"type\": \"BPE\", ", StringComparison.Ordinal)
            .Replace("\"model\":{", "\"model\":{\"type\":\"BPE\",", StringComparison.Ordinal));
        var je = Assert.Throws<TokenizerFileException>(() => TextTokenizer.FromDirectory(tok));
        Assert.Equal("model.type", je.Key);
    }
}
