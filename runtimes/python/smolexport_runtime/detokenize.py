"""Incremental detokenization with stop strings.

Token boundaries are not character boundaries: a byte-level BPE splits one emoji over several tokens and
a stop string like "\\n\\n" can arrive as two tokens. So each step decodes the whole generated id list
and yields only the new suffix, holding back (1) trailing U+FFFD, the mark of an incomplete UTF-8
sequence, and (2) any tail that could still grow into a stop string. Decoding the whole list also keeps
tokenizer decoders that look at neighbouring tokens (e.g. Metaspace spaces) correct.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

from .errors import RequestError

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in `text[start:]`, or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_length(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Length of the longest tail of `text[start:]` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StreamingDetokenizer:
    """Feed token ids with `add`; each call returns the text that became final (possibly "")."""

    def __init__(
        self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything yielded so far
        self.stopped = False  # a stop string was found; nothing more will be yielded

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(self._decode().rstrip(REPLACEMENT_CHAR), final=False)

    def finish(self) -> str:
        """Releases held-back text once generation has ended for another reason (eos, length)."""
        return self._advance(self._decode(), final=True)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        # Decoding is append-only for the tokenizers we export, so text[:len(self.text)] was yielded already.
        start = len(self.text)
        hit = find_stop(text, self.stop, start)
        if hit is not None:
            self.stopped = True
            end = hit
        elif final:
            end = len(text)
        else:
            end = len(text) - partial_stop_length(text, self.stop, start)
        if end <= start:
            return ""
        piece = text[start:end]
        self.text += piece
        return piece
