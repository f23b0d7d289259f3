"""Conversation workloads for `smolexport bench`: a replayed multi-turn chat, and cold start.

- Replayed chat: a system prompt, then CHAT_QUESTIONS one by one, each answered with greedy tokens, while
  the history keeps FIXED_ANSWER as the assistant's reply, so every runtime sees the same ids every turn.
  Time to first token per turn, once on a conversation that keeps its cache (what an app calling
  `model.stream(history)` gets) and once re-prefilling the whole history (what it paid before).
- Cold start: a new Python process that imports the runtime, loads the export (sha256 of every file, session
  creation) and produces its first token; the time from spawning it to that token.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .kv_state import CacheState
from .sampling import greedy
from .sequence import SequenceState, run_sequence

SYSTEM_PROMPT = (
    "You are a helpful assistant inside a note-taking app. Answer briefly and concretely, in plain "
    "sentences, and say so when you are not sure."
)
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "How long does it take to boil an egg?",
    "Give me a name for a grey cat.",
    "What is a good way to remember a shopping list?",
    "Why is the sky blue?",
    "Suggest a short title for my notes about a trip to Lisbon.",
    "How many minutes are there in a day?",
    "Summarise our conversation in one sentence.",
]
# The assistant's reply kept in the history after every turn (about 60 tokens), whatever the model said.
FIXED_ANSWER = (
    "Here is a short answer. I kept it brief so that the conversation stays easy to read, and I can add "
    "more detail, sources or examples if you ask for them. Let me know whether this helps, or what you would "
    "like me to change."
)


def chat_turns(model) -> list[list[int]]:
    """The token ids of each turn's prompt: the whole history so far, rendered by the chat template."""
    history = [{"role": "system", "content": SYSTEM_PROMPT}]
    turns = []
    for question in CHAT_QUESTIONS:
        history.append({"role": "user", "content": question})
        turns.append(model.encode(history))
        history.append({"role": "assistant", "content": FIXED_ANSWER})
    return turns


def replay_turns(model, turns: list[list[int]], answer_tokens: int, keep: bool) -> list[float]:
    """Seconds to the first token of each turn. keep=True: one cache across turns; False: a fresh one each."""
    decoder, limit, tokenizer = model.decoder, model.context_length, model.tokenizer
    state = CacheState(decoder, limit)
    ttfts = []
    for ids in turns:
        if not keep:
            state = CacheState(decoder, limit)
        # No eos: every turn runs its full answer_tokens.
        sequence = SequenceState.create(greedy, tokenizer, len(ids), answer_tokens)
        for _ in run_sequence(state, sequence, ids):
            pass
        ttfts.append(sequence.stats.ttft_s)
    return ttfts


def replay_chat(model, answer_tokens: int = 16, runs: int = 3) -> dict:
    """Medians over `runs` replays (after one warm-up) of each turn's time to first token, both ways."""
    turns = chat_turns(model)
    replay_turns(model, turns[:2], answer_tokens, keep=True)  # warm-up
    kept = [replay_turns(model, turns, answer_tokens, keep=True) for _ in range(runs)]
    fresh = [replay_turns(model, turns, answer_tokens, keep=False) for _ in range(runs)]
    kept_ms = [round(1000 * statistics.median(t), 1) for t in zip(*kept, strict=True)]
    fresh_ms = [round(1000 * statistics.median(t), 1) for t in zip(*fresh, strict=True)]
    return {
        "turn_prompt_tokens": [len(t) for t in turns],
        "answer_tokens": answer_tokens,
        "ttft_ms_reused": kept_ms,
        "ttft_ms_reprefill": fresh_ms,
        "last_turn_ratio": round(kept_ms[-1] / fresh_ms[-1], 3),
    }


COLD_START_CHILD = """
import sys, time
from smolexport_runtime import load
model = load(sys.argv[1], providers=sys.argv[2], threads=int(sys.argv[3]))
for _ in model.stream("What is the capital of France?", max_new_tokens=1):
    break
print("first-token", flush=True)
"""


def cold_start(export_dir: Path, threads: int, providers: str = "cpu", runs: int = 3) -> dict:
    """Seconds from spawning a new process to its first token (imports, sha256 checks, session, prefill)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", COLD_START_CHILD, str(export_dir), providers, str(threads)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = child.stdout.readline()
        elapsed = time.perf_counter() - start
        child.wait()
        if child.returncode != 0 or "first-token" not in line:
            raise RuntimeError(f"the cold-start process failed (exit {child.returncode})")
        times.append(elapsed)
    return {
        "cold_start_s": round(statistics.median(times), 2),
        "cold_start_runs_s": [round(t, 2) for t in times],
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .model import load

    parser = argparse.ArgumentParser(
        prog="python -m smolexport_runtime.bench_chat", description=__doc__.splitlines()[0]
    )
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--cold", action="store_true", help="measure cold start instead of the replayed chat")
    args = parser.parse_args(argv)
    if args.cold:
        result = cold_start(args.export_dir, args.threads, args.providers, args.runs)
    else:
        model = load(args.export_dir, providers=args.providers, threads=args.threads, verify=False)
        result = replay_chat(model, runs=args.runs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
