#!/usr/bin/env bash
# What the web tests need (tests/apps/test_web_chat.py), beside scripts/setup.sh: transformers.js and
# playwright-core for sample_apps/web_chat (npm ci, pinned by its package-lock.json), and Debian's Chromium
# for the page test (as root, through apt-get; playwright never downloads a browser here). Without them those
# tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v node >/dev/null || { echo "setup_web.sh: Node.js is not installed" >&2; exit 1; }
# .npmrc there skips onnxruntime-node's download of CUDA libraries (the CPU build ships in the npm package).
(cd sample_apps/web_chat && npm ci --no-audit --no-fund --loglevel=error)
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup_web.sh: install Chromium (Debian: apt-get install chromium) for the page test" >&2
    fi
fi
echo "web chat set up (transformers.js $(cd sample_apps/web_chat && node -p "require('./node_modules/@huggingface/transformers/package.json').version"), $(chromium --version 2>/dev/null || echo 'no chromium'))"
