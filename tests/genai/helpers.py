"""Greedy decoding of one export folder by onnxruntime-genai and by our runtime, token for token."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")


@cache
def genai_model(folder: Path):
    return og.Model(str(folder))


def genai_generator(folder: Path, max_length: int, min_length: int = 0):
    """A greedy generator; `min_length` (prompt + answer tokens) masks eos until the sequence is that long."""
    model = genai_model(Path(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, min_length=min_length)
    return og.Generator(model, params)


def genai_steps(generator, n: int) -> list[int]:
    """Up to `n` tokens from genai's loop, ending early where genai says it is done (an eos token)."""
    out: list[int] = []
    while len(out) < n and not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def genai_greedy(folder: Path, prompt_ids: Sequence[int], n: int, ban_eos: bool = False) -> list[int]:
    """genai's greedy tokens; with `ban_eos`, exactly `n` of them (eos masked through min_length)."""
    length = len(prompt_ids) + n
    generator = genai_generator(folder, length, min_length=length if ban_eos else 0)
    generator.append_tokens(list(prompt_ids))
    return genai_steps(generator, n)


def ours_greedy(model, prompt_ids: Sequence[int], n: int, ban_eos: bool = False) -> list[int]:
    """Our runtime's greedy tokens (prefill with logits_to_keep=1, then the preallocated cache), up to and
    including the first eos, as genai returns them; with `ban_eos`, exactly `n` tokens, eos never picked."""
    from smolexport_runtime import decode_one_token, prefill

    banned = sorted(model.eos_token_ids) if ban_eos else []
    logits, cache, length = prefill(model.decoder, list(prompt_ids), capacity=len(prompt_ids) + n)
    out: list[int] = []
    while len(out) < n:
        if banned:
            logits = np.array(logits, copy=True)
            logits[banned] = -np.inf
        token = int(np.argmax(logits))
        out.append(token)
        if token in model.eos_token_ids or len(out) == n:
            break
        logits, cache, length = decode_one_token(model.decoder, token, cache, length)
    return out
