"""How far an export's logits move with how its tokens are grouped into steps: the same tokens fed one a step,
in one multi-token step, and as rows of a batch of single-token steps; each path's distance from a
reference export (KL, top-1 agreement). On int4 at accuracy level 4 the grouping changes near ties, which is
why batch and speculation tests compare texts on fp32 (benchmarks/README.md, constrained serving).

    .venv/bin/python benchmarks/step_grouping.py REFERENCE_EXPORT EXPORT [--text FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from smolexport_runtime import load
from smolexport_runtime.generate import decode_one_token, prefill

from smolexport.validate.metrics import log_softmax

# Not a text any test or calibration uses.
TEXT = (
    "The history of the city of Oslo begins in the eleventh century, when King Harald Hardrada founded a "
    "trading town at the head of the fjord. Over the centuries it burned many times and was rebuilt, and in "
    "1624 the king moved it west under the fortress."
)
PREFIX = 8  # tokens prefilled before the compared positions


def one_a_step(model, ids: list[int]) -> np.ndarray:
    """Logits after each of ids[PREFIX:-1], fed one decode step at a time."""
    logits, cache, length = prefill(model.decoder, ids[:PREFIX], capacity=len(ids))
    rows = []
    for token in ids[PREFIX:-1]:
        logits, cache, length = decode_one_token(model.decoder, token, cache, length)
        rows.append(logits)
    return np.stack(rows)


def one_step(model, ids: list[int]) -> np.ndarray:
    """The same positions' logits from one multi-token step."""
    _, cache, length = prefill(model.decoder, ids[:PREFIX], capacity=len(ids))
    rest = ids[PREFIX:-1]
    mask = np.ones((1, length + len(rest)), np.int64)
    positions = np.arange(length, length + len(rest))[None]
    logits, _ = model.decoder.forward(np.array([rest], np.int64), mask, positions, cache, logits_to_keep=0)
    return logits[0]


def batch_rows(model, ids: list[int]) -> np.ndarray:
    """Row 0's logits when two copies of the sequence decode together, one token a step."""
    decoder, length = model.decoder, PREFIX
    cache = decoder.empty_cache(2, capacity=len(ids))
    prompt = np.array([ids[:PREFIX]] * 2, np.int64)
    _, cache = decoder.forward(prompt, np.ones((2, length), np.int64), np.arange(length)[None].repeat(2, 0), cache)
    rows = []
    for token in ids[PREFIX:-1]:
        step = np.array([[token]] * 2, np.int64)
        logits, cache = decoder.forward(step, np.ones((2, length + 1), np.int64), np.full((2, 1), length), cache)
        rows.append(logits[0, -1])
        length += 1
    return np.stack(rows)


def distance(reference: np.ndarray, other: np.ndarray) -> dict:
    p, q = log_softmax(reference), log_softmax(other)
    return {
        "kl": round(float((np.exp(p) * (p - q)).sum(-1).mean()), 4),
        "top1_agree": round(float((reference.argmax(-1) == other.argmax(-1)).mean()), 3),
        "max_abs": round(float(np.abs(reference - other).max()), 4),
        "median_max_abs": round(float(np.median(np.abs(reference - other).max(-1))), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("export", type=Path)
    parser.add_argument("--text", type=Path, help="a text file to feed instead of the built-in passage")
    args = parser.parse_args()
    text = args.text.read_text() if args.text else TEXT
    reference, model = load(args.reference, providers="cpu"), load(args.export, providers="cpu")
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    reference_logits = one_step(reference, ids)
    paths = {"one_a_step": one_a_step(model, ids), "one_step": one_step(model, ids), "batch": batch_rows(model, ids)}
    report = {
        "tokens": len(ids) - PREFIX - 1,
        "one_a_step_vs_one_step": distance(paths["one_a_step"], paths["one_step"]),
        "one_a_step_vs_batch_rows": distance(paths["one_a_step"], paths["batch"]),
        **{f"{name}_vs_reference": distance(reference_logits, logits) for name, logits in paths.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
