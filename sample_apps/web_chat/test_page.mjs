#!/usr/bin/env node
// Drives the web chat in headless Chromium: starts server.mjs on a free port, opens the page, asks one
// question and prints one JSON line:
//   {"text", "tokens", "prompt_tokens", "ms_per_token", "ttft_ms", "load_ms", "device", "model", "wasm_threads",
//    "cross_origin_isolated"}
//
//   node test_page.mjs --model-dir DIR [--prompt TEXT] [--max-new-tokens 32] [--device wasm|webgpu]
//                      [--swiftshader] [--chromium /usr/bin/chromium] [--screenshot PAGE.png] [--timeout 600]
//
// Exit status 0 with the JSON on stdout; 1 with {"error": ...} when the page failed. Browser console
// lines go to stderr. Needs playwright-core (npm ci) and a Chromium (Debian: apt-get install chromium);
// it never downloads a browser.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
    const args = {
        modelDir: null,
        prompt: 'What is the capital of France?',
        maxNewTokens: 32,
        device: 'wasm',
        chromium: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
        screenshot: null,
        timeout: 600,
        swiftshader: false,
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const next = () => argv[++i];
        if (a === '--model-dir') args.modelDir = next();
        else if (a === '--prompt') args.prompt = next();
        else if (a === '--max-new-tokens') args.maxNewTokens = Number(next());
        else if (a === '--device') args.device = next();
        else if (a === '--chromium') args.chromium = next();
        else if (a === '--screenshot') args.screenshot = next();
        else if (a === '--timeout') args.timeout = Number(next());
        else if (a === '--swiftshader') args.swiftshader = true;
        else throw new Error(`unknown argument ${a}`);
    }
    if (!args.modelDir) throw new Error('--model-dir DIR is required');
    return args;
}

/** Starts server.mjs on a free port; resolves with {url, child} once it listens. */
function startServer(modelDir) {
    return new Promise((resolve, reject) => {
        const child = spawn(
            process.execPath,
            [path.join(HERE, 'server.mjs'), '--model-dir', `model=${modelDir}`, '--port', '0'],
            { stdio: ['ignore', 'pipe', 'inherit'] },
        );
        let out = '';
        child.stdout.on('data', (chunk) => {
            out += chunk;
            const m = out.match(/listening on (http:\/\/\S+)/);
            if (m) resolve({ url: m[1], child });
        });
        child.on('exit', (code) => reject(new Error(`server.mjs exited with ${code} before listening`)));
    });
}

async function run(args) {
    const { url, child } = await startServer(path.resolve(args.modelDir));
    const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'web-chat-profile-'));
    let context;
    try {
        context = await chromium.launchPersistentContext(profile, {
            executablePath: args.chromium,
            headless: true,
            viewport: { width: 900, height: 700 },
            args: [
                '--no-sandbox',
                '--disable-background-networking',
                '--disable-component-update',
                '--disable-sync',
                '--no-first-run',
                // WebGPU needs the GPU process; --swiftshader gives a software adapter on machines without a GPU
                // (it checks that the WebGPU path works; its speed says nothing about a real GPU).
                ...(args.device === 'webgpu' ? ['--enable-unsafe-webgpu'] : ['--disable-gpu']),
                ...(args.swiftshader ? ['--use-webgpu-adapter=swiftshader'] : []),
            ],
        });
        const page = context.pages()[0] ?? (await context.newPage());
        page.on('console', (msg) => console.error(`[page ${msg.type()}] ${msg.text()}`));
        page.on('pageerror', (err) => console.error(`[page error] ${err.message}`));
        const timeout = args.timeout * 1000;
        const query = new URLSearchParams({ model: 'model', device: args.device, max_new_tokens: String(args.maxNewTokens) });
        await page.goto(`${url}?${query}`);

        const stateIs = (states) =>
            page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout, polling: 100 });
        await stateIs(['ready', 'error']);
        if ((await page.evaluate(() => window.webChat.state)) === 'ready') {
            console.error('[test_page] model loaded; asking');
            await page.fill('#prompt', args.prompt);
            await page.click('#send');
            // The answer count, not the state: a short answer can go generating -> ready between two polls.
            await page.waitForFunction(() => window.webChat.answers > 0 || window.webChat.state === 'error', null, {
                timeout,
                polling: 100,
            });
        }
        const chat = await page.evaluate(() => ({ ...window.webChat, isolated: globalThis.crossOriginIsolated }));
        if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
        if (chat.state !== 'ready' || !chat.lastResult) {
            return { error: chat.error ?? `page ended in state ${chat.state}` };
        }
        return {
            ...chat.lastResult,
            load_ms: chat.load_ms,
            device: chat.device,
            model: path.resolve(args.modelDir),
            wasm_threads: chat.wasm_threads,
            cross_origin_isolated: chat.isolated,
        };
    } finally {
        await context?.close();
        child.kill();
        fs.rmSync(profile, { recursive: true, force: true });
    }
}

let result;
try {
    result = await run(parseArgs(process.argv.slice(2)));
} catch (err) {
    result = { error: String(err?.message ?? err) };
}
console.log(JSON.stringify(result));
process.exit(result.error ? 1 : 0);
