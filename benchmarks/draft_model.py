"""Speculative decoding with a draft model: acceptance rate, decode tokens/s with and without, and whether the
greedy text is the same, in one process.

    .venv/bin/python benchmarks/draft_model.py TARGET_EXPORT DRAFT_EXPORT [--draft-tokens 2 4 6] [--threads 2]

The prompts are the dev set's (benchmarks/dev/prompts.json: open questions, not input-grounded); each runs
plain, then with each draft length, from empty caches each time, alternating so the CPU's drift hits all.
Here the only real weights are the 135M's, so the pair measured is the 135M int4 drafting for the 135M fp32:
their acceptance is an upper bound for 135M drafting 1.7B (a different model agrees less often). Combine the
acceptance with benchmarks/verify_cost.py's step costs for what a 1.7B target would gain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smolexport_runtime import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import cpu_model  # noqa: E402

PROMPTS = json.loads((Path(__file__).resolve().parent / "dev" / "prompts.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    target = load(args.target, providers="cpu", threads=args.threads)
    draft = load(args.draft, providers="cpu", threads=args.threads)
    variants = [0, *args.draft_tokens]
    seconds = dict.fromkeys(variants, 0.0)
    kept, drafted, same = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0), dict.fromkeys(variants, 0)
    tokens = 0
    for prompt in PROMPTS:
        texts = {}
        for k in variants:
            target.reset()
            options = {"draft_model": draft, "draft_tokens": k} if k else {}
            texts[k] = target.generate(prompt, max_new_tokens=args.max_new_tokens, greedy=True, **options)
            stats = target.last_stats
            seconds[k] += stats.total_s - stats.ttft_s
            kept[k] += stats.accepted_tokens
            drafted[k] += stats.draft_tokens
            same[k] += texts[k] == texts[0]
        tokens += len(target.tokenizer.encode(texts[0], add_special_tokens=False).ids)
    rows = {
        k: {
            "decode_speedup": round(seconds[0] / seconds[k], 2),
            "acceptance": round(kept[k] / drafted[k], 3) if drafted[k] else None,
            "same_text": f"{same[k]}/{len(PROMPTS)}",
        }
        for k in args.draft_tokens
    }
    print(json.dumps({"target": args.target, "draft": args.draft, "cpu": cpu_model(), "threads": args.threads,
                      "prompts": len(PROMPTS), "tokens": tokens, "plain_decode_s": round(seconds[0], 2),
                      "draft_tokens": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
