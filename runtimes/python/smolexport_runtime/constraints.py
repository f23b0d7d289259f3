"""Constrained decoding: the answer follows a JSON Schema, a regex or a Lark grammar, token by token.

The grammar engine is llguidance (`pip install smolexport-runtime[structured]`): it reads tokenizer.json
directly, needs no torch, and fills a bitmask over the vocabulary in tens of microseconds. Each step masks the
logits to the tokens the grammar allows, samples as usual (greedy or not), and advances the grammar with the
chosen token. When the grammar forces what comes next (a fixed key, a closing brace), those tokens are fed as
one multi-token step instead of one decode step each (`ConstrainedSampler.forced`).

Fail closed: a format the engine cannot enforce (an unknown JSON Schema keyword, a bad regex) raises
ConstraintError before anything is generated; it is never generated unconstrained.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .errors import RequestError
from .sampling import Sampler

# response_format {"type": ...} wrappers; any other mapping is a JSON Schema itself.
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "lark")


class ConstraintError(RequestError):
    """A response format that cannot be enforced (unsupported schema keyword, invalid grammar), or an answer
    that left its grammar."""


@dataclass(frozen=True)
class ResponseFormat:
    """A format as a grammar llguidance compiles. `schema`: the JSON Schema, for formats that have one."""

    kind: str  # json_schema | json_object | regex | lark
    grammar: str
    schema: dict[str, Any] | None = None


def parse_response_format(response_format: Any) -> ResponseFormat | None:
    """`response_format` as `generate` takes it: a JSON Schema (dict), a Pydantic model class, or OpenAI's
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}}, and {"type": "regex",
    "pattern": ...}, {"type": "lark", "grammar": ...}; None or {"type": "text"} means free text."""
    if response_format is None:
        return None
    LLMatcher = _llguidance().LLMatcher
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):  # Pydantic v2
        response_format = response_format.model_json_schema()
    if not isinstance(response_format, Mapping):
        raise ConstraintError(
            f"response_format must be a JSON Schema dict, a Pydantic model class or a {{'type': ...}} dict, "
            f"got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:  # a bare JSON Schema ({"type": "object", ...} or no type at all)
        return _json_schema(dict(response_format))
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_schema({"type": "object"}, kind="json_object")
    if kind == "json_schema":
        wrapper = response_format.get("json_schema", response_format)
        schema = wrapper.get("schema") if isinstance(wrapper, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ConstraintError(
                "response_format json_schema needs json_schema.schema, a JSON Schema object"
            )
        return _json_schema(dict(schema))
    text = response_format.get("pattern" if kind == "regex" else "grammar")
    if not isinstance(text, str) or not text:
        key = "pattern" if kind == "regex" else "grammar"
        raise ConstraintError(f"response_format {kind} needs {key!r}, a non-empty string")
    grammar = LLMatcher.grammar_from_regex(text) if kind == "regex" else LLMatcher.grammar_from_lark(text)
    return ResponseFormat(kind, grammar)


def _json_schema(schema: dict[str, Any], kind: str = "json_schema") -> ResponseFormat:
    LLMatcher = _llguidance().LLMatcher

    try:
        # Compact separators, no free whitespace: the model cannot pad an answer with endless spaces, and
        # the grammar forces more of the text. lenient=False: an unknown keyword is an error, not ignored.
        options = {
            "whitespace_flexible": False,
            "item_separator": ", ",
            "key_separator": ": ",
            "lenient": False,
        }
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"response_format is not a usable JSON Schema: {exc}") from None
    return ResponseFormat(kind, grammar, schema)


class GrammarTokenizer:
    """llguidance's view of the tokenizer (0.25 s to build for a 49k vocabulary: built once per
    model). `vocab_size` is the logits' width, which may exceed the tokenizer's."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        LLTokenizer = _llguidance().LLTokenizer
        self.vocab_size = vocab_size
        eos = sorted(eos_token_ids)
        try:
            self.lltokenizer = LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
        except (ValueError, RuntimeError) as exc:  # e.g. a tokenizer.json without a decoder
            raise ConstraintError(f"constrained decoding does not support this tokenizer: {exc}") from None

    def compile(self, response_format: ResponseFormat) -> ResponseFormat:
        """Checks that the grammar compiles against this vocabulary; raises ConstraintError if it does not."""
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(
            response_format.grammar, self.lltokenizer
        )
        if is_error:
            raise ConstraintError(f"response_format cannot be enforced: {_first_line(messages)}")
        return response_format

    def matcher(self, response_format: ResponseFormat):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.lltokenizer, response_format.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"response_format cannot be enforced: {_first_line([matcher.get_error()])}")
        return matcher


class ConstrainedSampler:
    """A sampler (logits -> token) that only picks tokens the grammar allows, and advances the grammar."""

    def __init__(self, sampler: Sampler, grammar: GrammarTokenizer, response_format: ResponseFormat) -> None:
        self.sampler = sampler
        self.matcher = grammar.matcher(response_format)
        self.vocab_size = grammar.vocab_size
        self._bitmask = np.full((1, (self.vocab_size + 31) // 32), -1, dtype=np.int32)
        self._precomputed: np.ndarray | None = None  # the next mask, filled by precompute_masks

    def allowed(self) -> np.ndarray:
        """The grammar's allowed tokens now, as a boolean vector over the vocabulary."""
        bitmask, self._precomputed = self._precomputed, None
        if bitmask is None:
            from llguidance.numpy import fill_next_token_bitmask

            fill_next_token_bitmask(self.matcher, self._bitmask)
            bitmask = self._bitmask
        return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def __call__(self, logits: np.ndarray) -> int:
        allowed = self.allowed()
        masked = np.where(allowed, np.asarray(logits, dtype=np.float32).reshape(-1), -np.inf)
        if not allowed.any():  # cannot happen while the grammar is intact: it always allows something (eos)
            raise ConstraintError(f"the grammar allows no token here: {self.matcher.get_error()}")
        token = self.sampler(masked)
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        return token

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next, consumed: the caller feeds them without sampling."""
        if limit <= 0 or self.matcher.is_stopped():
            return []
        tokens = list(self.matcher.compute_ff_tokens())[:limit]
        if tokens and not self.matcher.consume_tokens(tokens):
            raise ConstraintError(f"the grammar refused its own forced tokens: {self.matcher.get_error()}")
        return tokens


def precompute_masks(samplers: Sequence[ConstrainedSampler]) -> None:
    """Computes the next mask of every sampler in one llguidance call, which spreads the matchers over its
    threads while the model is idle (the batch engine calls this between its forward pass and sampling the
    rows); each sampler's next `allowed()` then uses its row."""
    if len(samplers) < 2:
        return
    from llguidance.numpy import fill_next_token_bitmask_par

    bitmask = np.full((len(samplers), samplers[0]._bitmask.shape[1]), -1, dtype=np.int32)
    fill_next_token_bitmask_par(_executor(), [(s.matcher, i) for i, s in enumerate(samplers)], bitmask)
    for i, sampler in enumerate(samplers):
        sampler._precomputed = bitmask[i : i + 1]


@functools.cache
def _executor():
    # One thread per core: masks run between forward passes, when onnxruntime's threads are idle.
    return _llguidance().LLExecutor(num_threads=max(1, os.cpu_count() or 1))


def _first_line(messages: list[str]) -> str:
    text = " ".join(m.strip() for m in messages if m and m.strip()) or "unknown error"
    return text.splitlines()[0][:300]


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(
            "constrained decoding needs llguidance: pip install 'smolexport-runtime[structured]'"
        ) from None
    return llguidance
