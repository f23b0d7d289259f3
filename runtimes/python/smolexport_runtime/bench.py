"""The standard speed and memory workload for an export, run in a process of its own.

    python -m smolexport_runtime.bench EXPORT_DIR [--threads 2] [--runs 3] [--json OUT]

Measures, as medians over `runs` after a warm-up:
- ttft_ms_chat: time to the first token id of a short chat prompt (prefill + first pick)
- ttft_ms_long: the same for a 512-token prompt
- decode_tok_s: greedy decode speed over 128 tokens, eos ignored; decode_gb_s: the weight bytes that
  speed streams per second (the model's external data once per token), the figure to compare with memory
  bandwidth
- peak_rss_mb: this process's peak resident memory after filling a `--context`-token KV cache (default 2048)
- artifact_mb: the export folder's size
It imports only the runtime (no torch), so peak_rss_mb is what an app embedding the model would see.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .generate import decode_one_token, prefill
from .manifest import is_weight_data
from .model import load

CHAT_PROMPT = "What is the capital of France?"
# Filler for long prompts: plain prose, repeated as needed; only its token count matters.
FILLER = (
    "The committee met on a grey morning to review the plans for the new library. Several members argued "
    "that the reading rooms should face the river, while others preferred the quiet of the courtyard. After "
    "a long discussion about light, noise and the cost of heating, they agreed to build a model first. "
)


def prompt_of_length(model, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += model.tokenizer.encode(FILLER, add_special_tokens=False).ids
    return ids[:tokens]


def timed_first_token(decoder, ids: list[int], capacity: int):
    """Prefill as `generate` does it: the cache is allocated for `capacity` tokens (prompt + answer)."""
    start = time.perf_counter()
    logits, cache, length = prefill(decoder, ids, capacity=capacity)
    token = int(np.argmax(logits))
    return time.perf_counter() - start, token, cache, length


def run(export_dir: Path, threads: int, runs: int, decode_tokens: int, long_tokens: int, context: int,
        providers: str) -> dict:  # fmt: skip
    model = load(export_dir, providers=providers, threads=threads, verify=False)
    decoder = model.decoder
    chat_ids = model.encode(CHAT_PROMPT)
    limit = model.context_length or long_tokens + 1
    long_ids = prompt_of_length(model, min(long_tokens, limit - 1))  # a model with a short context gets less
    decode_tokens = max(1, min(decode_tokens, limit - len(chat_ids) - 1))
    chat_capacity = len(chat_ids) + max(decode_tokens, 8) + 1  # the warm-up decodes 8
    _, token, cache, length = timed_first_token(decoder, chat_ids, chat_capacity)  # warm-up
    for _ in range(8):
        logits, cache, length = decode_one_token(decoder, token, cache, length)
    timed_first_token(decoder, long_ids, len(long_ids) + 1)

    chat, decode, long = [], [], []
    for _ in range(runs):
        seconds, token, cache, length = timed_first_token(decoder, chat_ids, chat_capacity)
        chat.append(seconds)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            logits, cache, length = decode_one_token(decoder, token, cache, length)
            token = int(np.argmax(logits))
        decode.append(decode_tokens / (time.perf_counter() - start))
        long.append(timed_first_token(decoder, long_ids, len(long_ids) + 1)[0])

    # Memory with a full context: prefill context - 16 tokens, decode 16 more.
    context = min(context, limit)
    _, token, cache, length = timed_first_token(decoder, prompt_of_length(model, context - 16), context)
    for _ in range(16):
        logits, cache, length = decode_one_token(decoder, token, cache, length)
        token = int(np.argmax(logits))
    del cache

    files = model.manifest.files
    weight_bytes = (
        sum(v["bytes"] for k, v in files.items() if is_weight_data(k))
        or files[model.manifest.graph_file]["bytes"]
    )
    decode_tok_s = statistics.median(decode)
    return {
        "export": str(export_dir),
        "quant": model.manifest.quant.get("mode"),
        "providers": decoder.providers,
        "threads": threads,
        "runs": runs,
        "ttft_ms_chat": round(1000 * statistics.median(chat), 1),
        "chat_prompt_tokens": len(chat_ids),
        "ttft_ms_long": round(1000 * statistics.median(long), 1),
        "long_prompt_tokens": len(long_ids),
        "decode_tok_s": round(decode_tok_s, 1),
        "decode_tokens": decode_tokens,
        "decode_gb_s": round(decode_tok_s * weight_bytes / 1e9, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "context_tokens": context,
        "artifact_mb": round(sum(v["bytes"] for v in files.values()) / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smolexport_runtime.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=512)
    parser.add_argument(
        "--context", type=int, default=2048, help="KV-cache length for the memory measurement"
    )
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.export_dir, args.threads, args.runs, args.decode_tokens, args.long_prompt_tokens,
                 args.context, args.providers)  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
