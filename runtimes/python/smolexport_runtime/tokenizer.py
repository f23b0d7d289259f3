"""The tokenizer and the token-level facts generation needs from the export's JSON configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .chat import special_token_text
from .errors import ManifestError


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ManifestError(f"{path} is missing; the export folder is incomplete. Re-export it.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every kind of bad file
        raise ManifestError(f"{path} is not a readable tokenizer ({_first_line(exc)}); re-export") from None
    # A tokenizer.json saved with truncation on would silently cut long prompts; padding would add tokens.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the optional file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    return data


def eos_token_ids(
    generation_config: Mapping[str, Any], tokenizer_config: Mapping[str, Any], tokenizer: Tokenizer
) -> frozenset[int]:
    """Every id that ends generation: generation_config's eos_token_id(s) plus the tokenizer's eos_token.

    The tokenizer's eos is included because chat templates close each turn with it; a model whose
    generation_config names only `<|endoftext|>` would otherwise run on past `<|im_end|>`.
    """
    ids: set[int] = set()
    value = generation_config.get("eos_token_id")
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list):
        ids.update(v for v in value if isinstance(v, int))
    text = special_token_text(tokenizer_config.get("eos_token"))
    if text is not None and (token_id := tokenizer.token_to_id(text)) is not None:
        ids.add(token_id)
    return frozenset(ids)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
