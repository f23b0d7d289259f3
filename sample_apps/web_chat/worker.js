// The model side of the web chat, in a module Web Worker so that inference never blocks the page.
// Messages in:  {type: 'load', model, device, stop_flag} | {type: 'generate', messages, max_new_tokens}
//               | {type: 'stop'}
// Messages out: {type: 'progress', file, fraction} | {type: 'ready', load_ms, wasm_threads}
//               {type: 'text', piece} | {type: 'done', result} | {type: 'error', message}
import {
    AutoModelForCausalLM,
    AutoTokenizer,
    InterruptableStoppingCriteria,
    TextStreamer,
    env,
} from '/vendor/transformers/transformers.min.js';

// Local files only: the export folder is served under /models/NAME/. A path, not a full URL: transformers.js
// skips its local-file checks for http(s):// values (the tokenizer then finds no tokenizer_config.json).
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = '/models/';
// The files come from localhost: caching them again in the browser's Cache Storage gains nothing and would
// keep serving stale weights after a re-export into the same folder name.
env.useBrowserCache = false;
// The wasm runtime from the local copy of onnxruntime-web (the build transformers.js picks by default).
env.backends.onnx.wasm.wasmPaths = {
    mjs: new URL('/vendor/ort/ort-wasm-simd-threaded.asyncify.mjs', self.location.href).href,
    wasm: new URL('/vendor/ort/ort-wasm-simd-threaded.asyncify.wasm', self.location.href).href,
};

let tokenizer = null;
let model = null;
const stopper = new InterruptableStoppingCriteria();
// An Int32Array on a SharedArrayBuffer (cross-origin isolated pages only) that the page sets to 1 to stop.
// A 'stop' message alone would wait: generate() keeps this worker busy until the answer is complete.
let stopFlag = null;

async function load({ model: name, device, stop_flag }) {
    stopFlag = stop_flag ?? null;
    const start = performance.now();
    const progress_callback = (p) => {
        if (p.status === 'progress' && p.total) {
            self.postMessage({ type: 'progress', file: p.file, fraction: p.loaded / p.total });
        }
    };
    // No options beyond the device: the folder's config.json ("transformers.js_config") names the dtype,
    // hence the file (onnx/model_q4.onnx, onnx/model.onnx, ...) and its external data.
    tokenizer = await AutoTokenizer.from_pretrained(name, { progress_callback });
    model = await AutoModelForCausalLM.from_pretrained(name, {
        ...(device === 'wasm' ? {} : { device }),
        progress_callback,
    });
    self.postMessage({
        type: 'ready',
        load_ms: performance.now() - start,
        // onnxruntime-web settles its thread count when the first session starts (more than 1 needs a
        // cross-origin isolated page, which server.mjs's headers give, and more than 2 cores).
        wasm_threads: env.backends.onnx.wasm.numThreads ?? null,
    });
}

async function generate({ messages, max_new_tokens }) {
    const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
    const promptTokens = inputs.input_ids.dims[1];
    const stamps = [];
    const t0 = performance.now();
    const streamer = new TextStreamer(tokenizer, {
        skip_prompt: true,
        skip_special_tokens: true,
        callback_function: (piece) => self.postMessage({ type: 'text', piece }),
        token_callback_function: () => {
            stamps.push(performance.now());
            if (stopFlag && Atomics.load(stopFlag, 0) === 1) stopper.interrupt();
        },
    });
    stopper.reset();
    const output = await model.generate({
        ...inputs,
        max_new_tokens,
        do_sample: false,
        streamer,
        stopping_criteria: stopper,
    });
    const tokens = Array.from(output.slice(null, [promptTokens, null]).data, Number);
    const steps = stamps.length - 1;
    self.postMessage({
        type: 'done',
        result: {
            text: tokenizer.decode(tokens, { skip_special_tokens: true }),
            tokens,
            prompt_tokens: promptTokens,
            ttft_ms: stamps.length ? stamps[0] - t0 : null,
            // decode time per token after the first one
            ms_per_token: steps > 0 ? (stamps.at(-1) - stamps[0]) / steps : null,
            stopped: stopper.interrupted,
        },
    });
}

self.addEventListener('message', async ({ data }) => {
    if (data.type === 'stop') {
        stopper.interrupt(); // seen only once generate() yields; the shared stop flag acts at the next token
        return;
    }
    try {
        if (data.type === 'load') await load(data);
        else if (data.type === 'generate') await generate(data);
    } catch (err) {
        self.postMessage({ type: 'error', message: String(err?.message ?? err) });
    }
});
