#!/usr/bin/env node
// Run a transformers.js-layout smolexport folder in Node with transformers.js (onnxruntime-node, CPU).
//
//   node node_example.mjs DIR "What is the capital of France?" [--max-new-tokens 256] [--sample] [--json]
//
// DIR is an export folder in the transformers.js layout (see README.md): config.json (with
// "transformers.js_config"), tokenizer.json, tokenizer_config.json (with "chat_template") and
// onnx/model{,_q4,_fp16}.onnx + its .onnx_data. The answer streams to stdout; --json prints one JSON
// object instead: {text, tokens, prompt_tokens, load_ms, ttft_ms, ms_per_token}.
//
// Importable: loadChatModel(dir) and chat(loaded, messagesOrPrompt, options).
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { AutoModelForCausalLM, AutoTokenizer, TextStreamer, env } from '@huggingface/transformers';

// Local folders only: never reach for the Hugging Face Hub.
env.allowRemoteModels = false;
env.allowLocalModels = true;

/**
 * What keeps `dir` from loading in transformers.js, as a list of messages (empty when it looks right).
 * transformers.js reads config.json, tokenizer.json, tokenizer_config.json and onnx/model{suffix}.onnx.
 * @param {string} dir
 */
export function layoutProblems(dir) {
    const problems = [];
    for (const name of ['config.json', 'tokenizer.json', 'tokenizer_config.json']) {
        if (!fs.existsSync(path.join(dir, name))) problems.push(`${name} is missing`);
    }
    if (!fs.existsSync(path.join(dir, 'onnx'))) {
        problems.push('onnx/ is missing (transformers.js loads onnx/model.onnx, onnx/model_q4.onnx, ...)');
    }
    if (problems.length === 0) {
        const tc = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
        if (!tc.chat_template) problems.push('tokenizer_config.json has no "chat_template"');
    }
    return problems;
}

/**
 * Loads the tokenizer and the model of an export folder. The folder is given as an absolute path:
 * transformers.js reads a relative "a/b" as a model id under env.localModelPath, not as a path.
 * @param {string} dir export folder (transformers.js layout)
 * @param {object} [options] passed to from_pretrained (e.g. {device: 'cpu'}); none are needed
 */
export async function loadChatModel(dir, options = {}) {
    const folder = path.resolve(dir);
    const problems = layoutProblems(folder);
    if (problems.length) {
        throw new Error(`${folder} is not an export in the transformers.js layout: ${problems.join('; ')}`);
    }
    const start = performance.now();
    const tokenizer = await AutoTokenizer.from_pretrained(folder);
    const model = await AutoModelForCausalLM.from_pretrained(folder, options);
    return { tokenizer, model, load_ms: performance.now() - start };
}

/**
 * Generates an answer. `prompt` is a string (one user message) or a list of {role, content} messages.
 * onText(piece) receives the answer as it streams. Greedy unless sample is true.
 * Returns {text, tokens, prompt_tokens, ttft_ms, ms_per_token}; ms_per_token is the decode time per token
 * after the first one (null when fewer than two tokens came).
 */
export async function chat({ tokenizer, model }, prompt, { maxNewTokens = 256, sample = false, onText = null } = {}) {
    const messages = typeof prompt === 'string' ? [{ role: 'user', content: prompt }] : prompt;
    const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
    const promptTokens = inputs.input_ids.dims[1];
    const stamps = [];
    const start = performance.now();
    const streamer = new TextStreamer(tokenizer, {
        skip_prompt: true,
        skip_special_tokens: true,
        callback_function: (text) => onText?.(text),
        token_callback_function: () => stamps.push(performance.now()),
    });
    const output = await model.generate({
        ...inputs,
        max_new_tokens: maxNewTokens,
        do_sample: sample,
        ...(sample ? { temperature: 0.7, top_p: 0.9 } : {}),
        streamer,
    });
    const tokens = Array.from(output.slice(null, [promptTokens, null]).data, Number);
    const text = tokenizer.decode(tokens, { skip_special_tokens: true });
    const decodeSteps = stamps.length - 1;
    return {
        text,
        tokens,
        prompt_tokens: promptTokens,
        ttft_ms: stamps.length ? stamps[0] - start : null,
        ms_per_token: decodeSteps > 0 ? (stamps.at(-1) - stamps[0]) / decodeSteps : null,
    };
}

function parseArgs(argv) {
    const args = { positional: [], maxNewTokens: 256, sample: false, json: false };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '--max-new-tokens') args.maxNewTokens = Number(argv[++i]);
        else if (a === '--sample') args.sample = true;
        else if (a === '--json') args.json = true;
        else if (a === '-h' || a === '--help') args.help = true;
        else args.positional.push(a);
    }
    return args;
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    if (args.help || args.positional.length < 1) {
        console.error('usage: node node_example.mjs DIR ["prompt"] [--max-new-tokens N] [--sample] [--json]');
        process.exit(args.help ? 0 : 2);
    }
    const [dir, prompt = 'What is the capital of France?'] = args.positional;
    const loaded = await loadChatModel(dir);
    const onText = args.json ? null : (piece) => process.stdout.write(piece);
    const result = await chat(loaded, prompt, { maxNewTokens: args.maxNewTokens, sample: args.sample, onText });
    if (args.json) {
        console.log(JSON.stringify({ ...result, load_ms: loaded.load_ms }));
    } else {
        process.stdout.write('\n');
        const speed = result.ms_per_token ? `, ${result.ms_per_token.toFixed(1)} ms/token` : '';
        console.error(`[${result.tokens.length} tokens${speed}]`);
    }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
    try {
        await main();
    } catch (err) {
        console.error(`error: ${err?.message ?? err}`);
        process.exit(1);
    }
}
