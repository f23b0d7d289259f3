// In-browser chat with a smolexport export through transformers.js. No bundler: the library and the
// onnxruntime-web wasm files come from the local server (server.mjs), never from a CDN or the Hub.
// This file is the page; the model runs in worker.js so that the page stays responsive while it computes.
//
// URL parameters: ?model=NAME (one of /models/index.json), &device=wasm|webgpu, &max_new_tokens=N.
// State for scripts and tests: document.body.dataset.state (loading|ready|generating|error) and
// window.webChat = {state, model, device, load_ms, wasm_threads, answers (count), lastResult: {text, tokens,
// prompt_tokens, ttft_ms, ms_per_token, stopped}, error}.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const webChat = (window.webChat = { state: 'loading', answers: 0, lastResult: null, error: null });

function setState(state, status) {
    webChat.state = state;
    document.body.dataset.state = state;
    if (status !== undefined) $('status').textContent = status;
    const busy = state !== 'ready';
    $('prompt').disabled = busy;
    $('send').disabled = busy;
    $('stop').disabled = state !== 'generating';
}

function bubble(role, text = '') {
    const div = document.createElement('div');
    div.className = `msg ${role}`;
    const body = document.createElement('span');
    body.textContent = text;
    div.append(body);
    $('messages').append(div);
    div.scrollIntoView({ block: 'end' });
    return { div, body };
}

function fail(error) {
    console.error(error);
    webChat.error = String(error?.message ?? error);
    bubble('error', webChat.error);
    setState('error', 'error');
}

async function main() {
    const { models } = await (await fetch('/models/index.json')).json();
    if (!models.length) throw new Error('the server serves no model (start it with --model-dir DIR)');
    const name = params.get('model') ?? models[0].name;
    const device = params.get('device') ?? 'wasm';
    for (const m of models) $('model').append(new Option(m.dtype ? `${m.name} (${m.dtype})` : m.name, m.name));
    $('model').value = name;
    $('device').value = device;
    if (params.has('max_new_tokens')) $('max-new-tokens').value = params.get('max_new_tokens');
    // A change of model or device reloads the page with the new parameters.
    for (const id of ['model', 'device']) {
        $(id).addEventListener('change', () => {
            params.set(id, $(id).value);
            location.search = params.toString();
        });
    }
    Object.assign(webChat, { model: name, device });
    if (device === 'webgpu' && !navigator.gpu) {
        throw new Error('WebGPU is not available in this browser; choose the wasm device');
    }

    const worker = new Worker(new URL('worker.js', location.href), { type: 'module' });
    const history = [];
    const progress = {};
    let answer = null;

    worker.addEventListener('error', (e) => fail(e.message || 'the worker failed to start'));
    worker.addEventListener('message', ({ data }) => {
        switch (data.type) {
            case 'progress': {
                progress[data.file] = data.fraction;
                const parts = Object.entries(progress).map(([f, v]) => `${f} ${Math.round(v * 100)}%`);
                $('status').textContent = `loading ${name}: ${parts.join(', ')}`;
                break;
            }
            case 'ready':
                Object.assign(webChat, { load_ms: data.load_ms, wasm_threads: data.wasm_threads });
                setState('ready', `${name} on ${device}, loaded in ${(data.load_ms / 1000).toFixed(1)} s`);
                break;
            case 'text':
                answer.body.textContent += data.piece;
                answer.div.scrollIntoView({ block: 'end' });
                break;
            case 'done': {
                const result = data.result;
                answer.body.textContent = result.text;
                history.push({ role: 'assistant', content: result.text });
                const meta = document.createElement('span');
                meta.className = 'meta';
                const speed = result.ms_per_token ? ` · ${result.ms_per_token.toFixed(1)} ms/token` : '';
                meta.textContent = `${result.tokens.length} tokens${speed}${result.stopped ? ' · stopped' : ''}`;
                answer.div.append(meta);
                webChat.lastResult = result;
                webChat.answers += 1;
                setState('ready', `${name} on ${device}`);
                break;
            }
            case 'error':
                fail(data.message);
                break;
        }
    });
    // Stop works through shared memory while the worker computes (server.mjs makes the page cross-origin
    // isolated); without it, through a message the worker reads only once the answer is complete.
    const stopFlag = self.crossOriginIsolated ? new Int32Array(new SharedArrayBuffer(4)) : null;
    worker.postMessage({ type: 'load', model: name, device, stop_flag: stopFlag });

    $('stop').addEventListener('click', () => {
        if (stopFlag) Atomics.store(stopFlag, 0, 1);
        worker.postMessage({ type: 'stop' });
    });
    $('prompt').addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && !e.shiftKey) {
            e.preventDefault();
            $('composer').requestSubmit();
        }
    });
    $('composer').addEventListener('submit', (e) => {
        e.preventDefault();
        const text = $('prompt').value.trim();
        if (!text || webChat.state !== 'ready') return;
        $('prompt').value = '';
        history.push({ role: 'user', content: text });
        bubble('user', text);
        answer = bubble('assistant');
        setState('generating', 'generating…');
        if (stopFlag) Atomics.store(stopFlag, 0, 0);
        const maxNewTokens = Math.max(1, Number($('max-new-tokens').value) || 256);
        worker.postMessage({ type: 'generate', messages: history, max_new_tokens: maxNewTokens });
    });
}

main().catch(fail);
