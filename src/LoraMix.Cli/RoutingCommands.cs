using System.CommandLine;
using LoraMix.Adapters;
using LoraMix.Adapters.MixLora;
using LoraMix.Evaluation;
using LoraMix.Inference;
using LoraMix.Routing;
using LoraMix.Tokenization;
using LoraMix.Torch;

namespace LoraMix.Cli;

/// <summary>Verbs that look at a MixLoRA adapter's routing.</summary>
internal static class RoutingCommands
{
    public const string TraceFileName = "trace.json";
    public const string HeatmapFileName = "routing.png";

    public static Command InspectRouting()
    {
        var model = ModelCommands.ModelOption();
        var adapter = new Option<string>("--adapter") { Description = "A MixLoRA adapter directory (adapter_config.json with peft_type MIXLORA).", Required = true };
        var chat = new Option<string>("--chat") { Description = "A JSON file: a list of {\"role\", \"content\"} (roles system, user, assistant, tool, data).", Required = true };
        var output = new Option<string>("--out", "-o") { Description = $"Output directory for {TraceFileName} and {HeatmapFileName}.", Required = true };
        var routerOptions = new RouterPolicyOptions();
        var (policy, snapshot) = (routerOptions.Policy, routerOptions.Snapshot);
        var template = new Option<string?>("--template") { Description = $"Chat template: {string.Join(", ", ChatTemplate.Names)} (default: from tokenizer_config.json)." };
        var generate = new Option<int>("--generate") { Description = "Greedy tokens to generate and trace after the prompt (default 0: the prompt only).", DefaultValueFactory = _ => 0 };
        var ignoreEos = new Option<bool>("--ignore-eos") { Description = "Generate all --generate tokens: do not stop at EOS or end-of-turn tokens." };
        var device = ModelCommands.DeviceOption();
        var dtype = ModelCommands.DTypeOption("f32");
        var cmd = new Command("inspect-routing",
            $"Trace a MixLoRA adapter's routing over a conversation (and greedy continuation): per token and layer the experts and " +
            $"weights, with privilege labels, in {TraceFileName}, and a token x layer heatmap of the top expert in {HeatmapFileName}.")
        {
            model, adapter, chat, output, policy, snapshot, template, generate, ignoreEos, device, dtype,
        };
        cmd.Validators.Add(r =>
        {
            if (r.GetValue(generate) < 0) r.AddError("--generate must be 0 or more");
        });
        cmd.SetAction(p =>
        {
            // Everything that can be checked without the model is checked first: bad input fails fast and writes nothing.
            string adapterDir = p.GetValue(adapter)!, outDir = p.GetValue(output)!;
            var messages = ChatFile.Load(p.GetValue(chat)!);
            var mix = AdapterMethods.MixLora;
            var method = AdapterMethods.Detect(adapterDir);
            if (method != mix)
                throw new LoraMixException($"{adapterDir} is a {method.DisplayName} adapter, but inspect-routing needs a {mix.DisplayName} adapter (peft_type {mix.PeftType}): " +
                                           $"plain {method.DisplayName} has no router. Train one with adapter type {mix.Name} (see examples/).");
            var config = (MixLoraConfig)mix.LoadConfig(adapterDir);
            var policyOverride = ResolvePolicy(config, p.GetValue(policy), p.GetValue(snapshot));
            if (File.Exists(outDir)) throw new LoraMixException($"--out {outDir} is a file; give a directory");
            var dev = TorchRuntime.ParseDevice(p.GetValue(device)!);
            var dt = TorchRuntime.ParseDType(p.GetValue(dtype)!);

            using var engine = ChatEngine.Load(p.GetValue(model)!, new EngineOptions
            {
                Device = dev, DType = dt, Adapters = [adapterDir], Template = p.GetValue(template),
            });
            var result = engine.TraceRouting(messages, policyOverride, p.GetValue(generate), stopAtStopTokens: !p.GetValue(ignoreEos));

            byte[] json = result.ToJson();
            string tracePath = Path.GetFullPath(Path.Combine(outDir, TraceFileName));
            string pngPath = Path.GetFullPath(Path.Combine(outDir, HeatmapFileName));
            RoutingHeatmap.Write(pngPath, result.TopExperts(), result.NumExperts, result.Tokens.Select(t => t.Piece).ToList(),
                result.Tokens.Select(t => t.Privilege).ToList(), $"routing: top expert per token and layer ({result.PolicyDescription})");
            AtomicFile.Write(tracePath, s => s.Write(json));

            var o = p.InvocationConfiguration.Output;
            string source = policyOverride is null ? "the adapter's router_policy" : "from the command line";
            o.WriteLine($"{result.Tokens.Count} tokens ({result.PromptTokens} prompt + {result.GeneratedTokens} generated" +
                        (result.FinishReason == FinishReason.Stop ? ", stopped at a stop token" : "") +
                        $"), {result.LayerIndices.Count} MoE layers, {result.NumExperts} experts");
            o.WriteLine($"router policy: {result.PolicyDescription} ({source})");
            o.WriteLine(result.FirstUntrustedPosition >= 0
                ? $"first untrusted token: {result.FirstUntrustedPosition}" +
                  (result.Policy is PrivilegedRouterPolicy ? " (routing frozen from there on)" : "")
                : "no untrusted token (no tool or data message)");
            o.WriteLine($"wrote {tracePath}");
            o.WriteLine($"wrote {pngPath}");
            return 0;
        });
        return cmd;
    }

    public const string ScalingsFileName = "scalings.json";

    /// <summary><c>inspect-scalings</c>: an X-LoRA adapter's per-token scalings over a conversation, as JSON and one heatmap
    /// per expert.</summary>
    public static Command InspectScalings()
    {
        var model = ModelCommands.ModelOption();
        var adapter = new Option<string>("--adapter") { Description = "An X-LoRA directory (PEFT layout or the xlora package's).", Required = true };
        var chat = new Option<string?>("--chat") { Description = "A JSON file: a list of {\"role\", \"content\"} (roles system, user, assistant, tool, data)." };
        var prompt = new Option<string?>("--prompt") { Description = "A single user message (instead of --chat)." };
        var output = new Option<string>("--out", "-o") { Description = $"Output directory for {ScalingsFileName} and one scalings-<expert>.png per expert.", Required = true };
        var policy = new Option<string?>("--router-policy") { Description = "Freeze the scalings with this policy instead of the adapter's router_policy: free or privileged." };
        policy.AcceptOnlyFromAmong([.. MixLoraConfig.RouterPolicies]);
        var snapshot = new Option<string?>("--privileged-snapshot") { Description = "Snapshot of the privileged policy: last or pooled." };
        snapshot.AcceptOnlyFromAmong([.. MixLoraConfig.PrivilegedSnapshots]);
        var template = new Option<string?>("--template") { Description = $"Chat template: {string.Join(", ", ChatTemplate.Names)} (default: from tokenizer_config.json)." };
        var generate = new Option<int>("--generate") { Description = "Greedy tokens to generate and trace after the prompt (default 0: the prompt only).", DefaultValueFactory = _ => 0 };
        var ignoreEos = new Option<bool>("--ignore-eos") { Description = "Generate all --generate tokens: do not stop at EOS or end-of-turn tokens." };
        var device = ModelCommands.DeviceOption();
        var dtype = ModelCommands.DTypeOption("f32");
        var cmd = new Command("inspect-scalings",
            $"Trace an X-LoRA adapter's scalings over a conversation (and greedy continuation): per token, wrapped module and expert, " +
            $"with privilege labels, in {ScalingsFileName}, and a token x module heatmap per expert (scalings-<expert>.png).")
        {
            model, adapter, chat, prompt, output, policy, snapshot, template, generate, ignoreEos, device, dtype,
        };
        cmd.Validators.Add(r =>
        {
            if (r.GetValue(generate) < 0) r.AddError("--generate must be 0 or more");
            if ((r.GetValue(chat) is null) == (r.GetValue(prompt) is null)) r.AddError("give exactly one of --chat FILE and --prompt TEXT");
        });
        cmd.SetAction(p =>
        {
            string adapterDir = p.GetValue(adapter)!, outDir = p.GetValue(output)!;
            var messages = p.GetValue(chat) is { } chatFile ? ChatFile.Load(chatFile) : [ChatMessage.User(p.GetValue(prompt)!)];
            var xlora = AdapterMethods.XLora;
            var method = AdapterMethods.Detect(adapterDir);
            if (method != xlora)
                throw new LoraMixException($"{adapterDir} is a {method.DisplayName} adapter, but inspect-scalings needs an {xlora.DisplayName} adapter " +
                                           $"(peft_type {xlora.PeftType}){(method == AdapterMethods.MixLora ? "; for MixLoRA use inspect-routing" : "")}");
            var config = (Adapters.XLora.XLoraConfig)xlora.LoadConfig(adapterDir);
            string? policyName = p.GetValue(policy), snap = p.GetValue(snapshot);
            IRouterPolicy? policyOverride = null;
            if (policyName is not null || snap is not null)
            {
                string name = policyName ?? config.RouterPolicy;
                if (name != MixLoraConfig.PrivilegedPolicy && snap is not null)
                    throw new LoraMixException($"--privileged-snapshot applies to the privileged policy only, but the policy is '{name}'; add --router-policy privileged");
                policyOverride = (config with { RouterPolicy = name, PrivilegedSnapshot = snap ?? MixLoraConfig.LastSnapshot }).CreatePolicy();
            }
            if (File.Exists(outDir)) throw new LoraMixException($"--out {outDir} is a file; give a directory");
            var dev = TorchRuntime.ParseDevice(p.GetValue(device)!);
            var dt = TorchRuntime.ParseDType(p.GetValue(dtype)!);

            using var engine = ChatEngine.Load(p.GetValue(model)!, new EngineOptions
            {
                Device = dev, DType = dt, Adapters = [adapterDir], Template = p.GetValue(template), RouterPolicy = policyOverride,
            });
            var result = engine.TraceScalings(messages, p.GetValue(generate), stopAtStopTokens: !p.GetValue(ignoreEos));

            Directory.CreateDirectory(outDir);
            var written = new List<string>();
            var pieces = result.Tokens.Select(t => t.Piece).ToList();
            var privileges = result.Tokens.Select(t => t.Privilege).ToList();
            double min = config.EnableSoftmax || config.EnableSoftmaxTopk ? 0 : result.Tokens.Min(t => t.Scalings.Min());
            double max = config.EnableSoftmax || config.EnableSoftmaxTopk ? 1 : result.Tokens.Max(t => t.Scalings.Max());
            var moduleLabels = result.Modules.Select(ShortModule).ToList();
            var used = new HashSet<string>(StringComparer.Ordinal);
            for (int i = 0; i < result.Experts.Count; i++)
            {
                string stem = SafeFileStem(result.Experts[i], i);
                if (!used.Add(stem)) stem = $"{stem}-{i}";
                string png = Path.GetFullPath(Path.Combine(outDir, $"scalings-{stem}.png"));
                RoutingHeatmap.WriteValues(png, result.ExpertMap(i), moduleLabels, min, max, "scaling", pieces, privileges,
                    $"X-LoRA scalings of expert {i} '{result.Experts[i]}' ({result.Policy.Describe()})", "module");
                written.Add(png);
            }
            string jsonPath = Path.GetFullPath(Path.Combine(outDir, ScalingsFileName));
            byte[] json = result.ToJson();
            AtomicFile.Write(jsonPath, s => s.Write(json));

            var o = p.InvocationConfiguration.Output;
            o.WriteLine($"{result.Tokens.Count} tokens ({result.PromptTokens} prompt + {result.GeneratedTokens} generated), " +
                        $"{result.Modules.Count} wrapped modules, {result.Experts.Count} experts");
            o.WriteLine($"router policy: {result.Policy.Describe()} ({(policyOverride is null ? "the adapter's router_policy" : "from the command line")})");
            o.WriteLine(result.FirstUntrustedPosition >= 0
                ? $"first untrusted token: {result.FirstUntrustedPosition}" + (result.Policy is PrivilegedRouterPolicy ? " (scalings frozen from there on)" : "")
                : "no untrusted token (no tool or data message)");
            o.WriteLine($"wrote {jsonPath}");
            foreach (var png in written) o.WriteLine($"wrote {png}");
            return 0;
        });
        return cmd;

        static string ShortModule(string path) =>
            path.StartsWith("model.layers.", StringComparison.Ordinal) && path.Split('.') is [_, _, var layer, _, var proj]
                ? $"L{layer}.{proj.Replace("_proj", "", StringComparison.Ordinal)}" : path;

        static string SafeFileStem(string name, int index)
        {
            var chars = name.Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' ? c : '_').ToArray();
            return chars.Length == 0 ? $"expert{index}" : new string(chars);
        }
    }

    /// <summary><c>--router-policy</c> and <c>--privileged-snapshot</c>, shared by every verb that runs a MixLoRA adapter
    /// (generate, chat, eval, inspect-routing), and the notice of the active policy.</summary>
    internal sealed class RouterPolicyOptions
    {
        public Option<string?> Policy { get; } = new("--router-policy")
        {
            Description = "Route the MixLoRA adapter with this policy instead of its router_policy: free or privileged (frozen from the first tool/data message on).",
        };

        public Option<string?> Snapshot { get; } = new("--privileged-snapshot")
        {
            Description = "Snapshot of the privileged policy: last or pooled (default: the adapter's, else last).",
        };

        public RouterPolicyOptions()
        {
            Policy.AcceptOnlyFromAmong([.. MixLoraConfig.RouterPolicies]);
            Snapshot.AcceptOnlyFromAmong([.. MixLoraConfig.PrivilegedSnapshots]);
        }

        public IEnumerable<Option> All => [Policy, Snapshot];

        /// <summary>The override the command line asks for, or null. Checked before any model loads: the options need the
        /// adapters <paramref name="options"/> runs to include a MixLoRA adapter.</summary>
        public IRouterPolicy? Resolve(ParseResult p, EngineOptions options)
        {
            string? name = p.GetValue(Policy), snap = p.GetValue(Snapshot);
            if (name is null && snap is null) return null;
            var plan = ChatEngine.PlanAdapters(options);
            if (plan.MixLoraInUse is { } mixLora)
                return ResolvePolicy((MixLoraConfig)AdapterMethods.MixLora.LoadConfig(mixLora.Directory), name, snap);
            if (plan.Adapters.FirstOrDefault(a => a.Method == AdapterMethods.XLora && plan.Use.Terms.Any(t => t.Name == a.Name)) is { Directory: not null } x)
            {
                var xc = (Adapters.XLora.XLoraConfig)AdapterMethods.XLora.LoadConfig(x.Directory);
                return ResolvePolicy(new MixLoraConfig { RouterPolicy = xc.RouterPolicy, PrivilegedSnapshot = xc.PrivilegedSnapshot }, name, snap);
            }
            throw new LoraMixException((name is not null ? "--router-policy" : "--privileged-snapshot") +
                                       " applies to a MixLoRA or X-LoRA adapter, and none was given with --adapter (LoRA adapters have no router)");
        }

        /// <summary>Loads the engine with the adapters (<c>--adapter</c>, <c>--use</c>) and the router policy the command
        /// line asks for, and says on stderr which policy a MixLoRA adapter routes with.</summary>
        public ChatEngine LoadEngine(ParseResult p, string model, AdapterOptions adapters, string device, string dtype, string? template)
        {
            var options = adapters.Apply(p, new EngineOptions
            {
                Device = TorchRuntime.ParseDevice(device),
                DType = TorchRuntime.ParseDType(dtype),
                Template = template,
            });
            options = options with { RouterPolicy = Resolve(p, options) };
            var engine = ChatEngine.Load(model, options);
            Announce(engine, p.InvocationConfiguration.Error);
            return engine;
        }

        /// <summary>Writes, once, which router policy the engine's MixLoRA adapter routes with and where it came from;
        /// nothing when no adapter has a router.</summary>
        public static void Announce(ChatEngine engine, TextWriter error)
        {
            if (engine.RouterPolicy is not { } active) return;
            var mixLora = engine.LoadedAdapters.First(a => a.MixLora is not null && engine.DefaultAdapters.Terms.Any(t => t.Name == a.Name));
            string path = Path.Combine(mixLora.Directory, MixLoraAdapters.ConfigFileName);
            string source = engine.RouterPolicySource switch
            {
                RouterPolicySource.Override => "from --router-policy",
                RouterPolicySource.AdapterConfig => $"router_policy of {path}",
                _ => $"{path} has no router_policy, MoE-PEFT's default: untrusted text can steer the experts; " +
                     "--router-policy privileged freezes routing from the first tool/data message",
            };
            error.WriteLine($"router policy: {active.Describe()} ({source})");
        }
    }

    /// <summary>The policy the command line asks for, or null to keep the adapter's <c>router_policy</c>. The snapshot
    /// defaults to the adapter's when it is privileged, else <c>last</c>.</summary>
    internal static IRouterPolicy? ResolvePolicy(MixLoraConfig config, string? policy, string? snapshot)
    {
        if (policy is null && snapshot is null) return null;
        string name = policy ?? config.RouterPolicy;
        if (name != MixLoraConfig.PrivilegedPolicy && snapshot is not null)
            throw new ArgumentException($"--privileged-snapshot applies to the privileged policy only, but the policy is '{name}'; " +
                                        "add --router-policy privileged");
        string snap = snapshot ?? (name == MixLoraConfig.PrivilegedPolicy && config.RouterPolicy == MixLoraConfig.PrivilegedPolicy
            ? config.PrivilegedSnapshot : MixLoraConfig.LastSnapshot);
        return (config with { RouterPolicy = name, PrivilegedSnapshot = snap }).CreatePolicy();
    }
}
