#!/usr/bin/env node
// A tiny static server for the web chat (Node standard library only).
//
//   node server.mjs --model-dir DIR [--model-dir NAME=DIR ...] [--port 8000] [--host 127.0.0.1]
//
// Serves
//   /                     this folder's index.html, app.js, worker.js, style.css
//   /vendor/transformers/ @huggingface/transformers/dist (the browser bundle)
//   /vendor/ort/          onnxruntime-web/dist (the wasm files; nothing comes from a CDN)
//   /models/NAME/         each export folder (NAME defaults to the folder's name)
//   /models/index.json    the list of served models
// with the COOP/COEP headers that make the page cross-origin isolated (multi-threaded wasm where the
// machine has the cores for it). Prints "listening on URL" once ready; --port 0 picks a free port.
// WEB_CHAT_LOG=1 logs each request to stderr.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

const TYPES = {
    '.html': 'text/html; charset=utf-8',
    '.js': 'text/javascript; charset=utf-8',
    '.mjs': 'text/javascript; charset=utf-8',
    '.css': 'text/css; charset=utf-8',
    '.json': 'application/json; charset=utf-8',
    '.jinja': 'text/plain; charset=utf-8',
    '.wasm': 'application/wasm',
    '.png': 'image/png',
    '.svg': 'image/svg+xml',
    '.map': 'application/json; charset=utf-8',
};

/** The first of `candidates` that exists, else an error naming them all. */
function firstDir(what, candidates) {
    const found = candidates.find((d) => fs.existsSync(d));
    if (!found) {
        throw new Error(`${what} not found (looked in ${candidates.join(', ')}); run \`npm ci\` in ${HERE}`);
    }
    return found;
}

export function vendorDirs(root = HERE) {
    const tjsPkg = path.join(root, 'node_modules', '@huggingface', 'transformers');
    const transformers = firstDir('@huggingface/transformers', [path.join(tjsPkg, 'dist')]);
    // onnxruntime-web is transformers.js's own dependency: hoisted, or nested under its package.
    const ort = firstDir('onnxruntime-web', [
        path.join(tjsPkg, 'node_modules', 'onnxruntime-web', 'dist'),
        path.join(root, 'node_modules', 'onnxruntime-web', 'dist'),
    ]);
    return { transformers, ort };
}

/** transformers.js looks a name up under env.localModelPath only when it reads as a Hub model id. */
function isModelName(name) {
    return /^[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$/.test(name) && !name.includes('--') && !name.includes('..');
}

function parseArgs(argv) {
    const args = { models: [], port: 8000, host: '127.0.0.1' };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '--model-dir') {
            const spec = argv[++i];
            const eq = spec.indexOf('=');
            const dir = path.resolve(eq > 0 ? spec.slice(eq + 1) : spec);
            const name = eq > 0 ? spec.slice(0, eq) : path.basename(dir);
            if (!isModelName(name)) {
                throw new Error(`model name "${name}": use letters, digits, ".", "_" and single "-" (--model-dir NAME=DIR)`);
            }
            args.models.push({ name, dir });
        } else if (a === '--port') args.port = Number(argv[++i]);
        else if (a === '--host') args.host = argv[++i];
        else if (a === '-h' || a === '--help') args.help = true;
        else throw new Error(`unknown argument ${a}`);
    }
    return args;
}

function modelInfo({ name, dir }) {
    let tjs = {};
    try {
        tjs = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'))['transformers.js_config'] ?? {};
    } catch {
        // the page reports a missing or broken config.json when it loads the model
    }
    return { name, dtype: tjs.dtype ?? null };
}

/** A request path under `root`, or null when it would leave it. */
function safeJoin(root, rel) {
    const full = path.resolve(root, '.' + path.posix.normalize('/' + rel));
    return full === root || full.startsWith(root + path.sep) ? full : null;
}

export function createServer({ models, root = HERE }) {
    const vendor = vendorDirs(root);
    const mounts = [
        ['/vendor/transformers/', vendor.transformers],
        ['/vendor/ort/', vendor.ort],
        ...models.map((m) => [`/models/${encodeURIComponent(m.name)}/`, m.dir]),
    ];
    const appFiles = new Set(['index.html', 'app.js', 'worker.js', 'style.css']);
    const index = JSON.stringify({ models: models.map(modelInfo) });

    const log = process.env.WEB_CHAT_LOG ? (...a) => console.error(...a) : () => {};
    return http.createServer((req, res) => {
        res.on('finish', () => log(`${req.method} ${req.url} ${res.statusCode}`));
        const headers = {
            'Cross-Origin-Opener-Policy': 'same-origin',
            'Cross-Origin-Embedder-Policy': 'require-corp',
            'Cache-Control': 'no-cache',
        };
        const send = (status, body, type = 'text/plain; charset=utf-8') => {
            res.writeHead(status, { ...headers, 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
            res.end(req.method === 'HEAD' ? undefined : body);
        };
        if (req.method !== 'GET' && req.method !== 'HEAD') return send(405, 'method not allowed');
        let urlPath;
        try {
            urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
        } catch {
            return send(400, 'bad request');
        }
        if (urlPath === '/models/index.json') return send(200, index, TYPES['.json']);

        let file = null;
        if (urlPath === '/') file = path.join(root, 'index.html');
        else if (appFiles.has(urlPath.slice(1))) file = path.join(root, urlPath.slice(1));
        else {
            for (const [prefix, dir] of mounts) {
                if (urlPath.startsWith(decodeURIComponent(prefix))) {
                    file = safeJoin(dir, urlPath.slice(decodeURIComponent(prefix).length));
                    break;
                }
            }
        }
        let stat;
        try {
            stat = file && fs.statSync(file);
        } catch {
            stat = null;
        }
        if (!stat || !stat.isFile()) return send(404, 'not found');
        const type = TYPES[path.extname(file)] ?? 'application/octet-stream';
        res.writeHead(200, { ...headers, 'Content-Type': type, 'Content-Length': stat.size });
        if (req.method === 'HEAD') return res.end();
        fs.createReadStream(file).pipe(res);
    });
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    if (args.help || args.models.length === 0) {
        console.error('usage: node server.mjs --model-dir DIR [--model-dir NAME=DIR ...] [--port 8000] [--host 127.0.0.1]');
        process.exit(args.help ? 0 : 2);
    }
    for (const m of args.models) {
        if (!fs.existsSync(path.join(m.dir, 'config.json'))) {
            console.error(`warning: ${m.dir} has no config.json; is it an export folder?`);
        }
    }
    const server = createServer({ models: args.models });
    server.listen(args.port, args.host, () => {
        const { port } = server.address();
        const host = args.host.includes(':') ? `[${args.host}]` : args.host;
        console.log(`listening on http://${host}:${port}/`);
        for (const m of args.models) console.log(`  /models/${m.name}/ -> ${m.dir}`);
    });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
    try {
        await main();
    } catch (err) {
        console.error(`error: ${err?.message ?? err}`);
        process.exit(2);
    }
}
