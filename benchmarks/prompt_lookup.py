"""Prompt lookup decoding on input-grounded tasks (rewrite, extract, quote, summarize): decode tokens/s with
and without `prompt_lookup`, drafts kept, and whether the greedy text is the same, in one process.

    .venv/bin/python benchmarks/prompt_lookup.py EXPORT [EXPORT ...] [--lookup 8] [--threads 2]

The inputs are passages of this repository's docs (not text any test or tuning used); each task runs plain
then with lookup, from an empty cache each time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from smolexport_runtime import load

DOCS = Path(__file__).resolve().parents[1] / "docs"


def tasks() -> list[str]:
    folder, quant = (DOCS / "export-folder.md").read_text(), (DOCS / "validation.md").read_text()
    return [
        f"Rewrite the following text word for word:\n\n{folder[:600]}",
        f"Extract every file name mentioned in this text, one per line:\n\n{folder[:900]}",
        f"Summarize in three sentences:\n\n{quant[:1200]}",
        f"Copy the first paragraph of this text exactly:\n\n{quant[:700]}",
        f"Which metrics does this text name? Quote them.\n\n{quant[1200:2400]}",
        f"Fix the typos in this text and return it:\n\n{folder[900:1500]}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--lookup", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
         .stdout.splitlines() if line.startswith("Model name")), "?",
    )  # fmt: skip
    for export in args.exports:
        model = load(export, providers="cpu", threads=args.threads)
        rows, plain_s, fast_s, tokens = [], 0.0, 0.0, 0
        for prompt in tasks():
            runs = []
            for lookup in (0, args.lookup):
                model.reset()
                text = model.generate(prompt, max_new_tokens=args.max_new_tokens, greedy=True, prompt_lookup=lookup)
                runs.append((text, model.last_stats))
            (plain, s0), (fast, s1) = runs
            plain_s += s0.total_s - s0.ttft_s
            fast_s += s1.total_s - s1.ttft_s
            tokens += s0.completion_tokens
            rows.append({"tokens": s0.completion_tokens, "plain_tok_s": round(s0.decode_tok_s, 1),
                         "lookup_tok_s": round(s1.decode_tok_s, 1), "kept": f"{s1.accepted_tokens}/{s1.draft_tokens}",
                         "same_text": plain == fast})  # fmt: skip
        print(json.dumps({"export": export, "cpu": cpu, "threads": args.threads, "lookup": args.lookup,
                          "decode_speedup": round(plain_s / fast_s, 2), "tokens": tokens,
                          "same_text": sum(r["same_text"] for r in rows), "tasks": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
