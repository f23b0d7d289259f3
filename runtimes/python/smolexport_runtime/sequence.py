"""One generation's own state, and the single-stream token loop that drives it.

A `SequenceState` holds everything a generation carries from token to token: its sampler (with its grammar, if
constrained), stop strings (in the detokenizer), eos ids, token budget, stats and timing. Each loop owns its
forward passes and asks the state two things per step: `next_tokens(logits)`, the tokens to feed next (the
sampled one, plus those a grammar forces after it), and `accept(tokens)`, which records them and returns their
text; `finished` then says whether to stop. `run_sequence` below is the loop for one sequence on a
`CacheState` (Model.stream, conversations, `stream_generate`); the batch engine (batching.py) drives one state
per slot. So eos, stop strings, length, constraints, stats and speculation live in one place.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from .constraints import ConstrainedSampler
from .detokenize import StreamingDetokenizer
from .errors import RequestError
from .generate import Decoder, FinishReason, GenerationStats, fit_to_context
from .kv_state import CacheState
from .sampling import Sampler, greedy
from .speculation import Drafter, accepted_length


@dataclass(eq=False)
class SequenceState:
    """A generation's sampler, stops, budget and stats. Loops call `next_tokens` then `accept` each step."""

    sampler: Sampler
    detokenizer: StreamingDetokenizer
    eos: frozenset[int]
    max_new_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)
    started: float = field(default_factory=time.perf_counter)  # time to first token counts from here
    first_token_at: float = 0.0

    @classmethod
    def create(
        cls,
        sampler: Sampler,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        max_new_tokens: int,
        eos_token_ids: Collection[int] = (),
        stop: Iterable[str] = (),
        stats: GenerationStats | None = None,
    ) -> SequenceState:
        """Built where the request is made, so that a bad stop string fails the caller."""
        if stats is None:
            stats = GenerationStats()
        else:  # a caller's object, maybe filled by an earlier run: its finish_reason would end this one
            stats.__init__()
        stats.prompt_tokens = prompt_tokens
        detokenizer = StreamingDetokenizer(tokenizer, stop)
        return cls(sampler, detokenizer, frozenset(eos_token_ids), max_new_tokens, stats)

    @property
    def finished(self) -> bool:
        return self.stats.finish_reason is not None

    @property
    def remaining(self) -> int:
        """Tokens the budget still allows."""
        return self.max_new_tokens - self.stats.completion_tokens

    @property
    def constrained(self) -> bool:
        return isinstance(self.sampler, ConstrainedSampler)

    @property
    def drafts_allowed(self) -> bool:
        """Speculation keeps only what greedy decoding would choose: plain greedy only."""
        return self.sampler is greedy

    def next_tokens(self, logits: np.ndarray) -> list[int]:
        """The next token, and under a grammar the tokens it forces after it (a schema's fixed keys and
        punctuation), within the budget: the loop feeds them all as one multi-token step."""
        token = self.sampler(logits)
        if self.constrained:
            return [token, *self.sampler.forced(self.remaining - 1)]
        return [token]

    def accept(self, tokens: Sequence[int]) -> str:
        """Records generated tokens in order and returns their text. eos, a stop string or the budget ends the
        sequence (`finished`); tokens after the end are dropped, and the detokenizer's held-back text is
        released with the last piece."""
        now = time.perf_counter()
        stats, pieces = self.stats, []
        if stats.completion_tokens == 0 and tokens:
            self.first_token_at = now
            stats.ttft_s = now - self.started
        for token in tokens:
            stats.completion_tokens += 1
            if token in self.eos:
                stats.finish_reason = "stop"
                break
            pieces.append(self.detokenizer.add(token))
            if self.detokenizer.stopped:
                stats.finish_reason = "stop"
                break
            if stats.completion_tokens >= self.max_new_tokens:
                stats.finish_reason = "length"
                break
        if stats.completion_tokens > 1 and now > self.first_token_at:
            stats.decode_tok_s = (stats.completion_tokens - 1) / (now - self.first_token_at)
        if self.finished:
            pieces.append(self.detokenizer.finish())
        return "".join(pieces)

    def accept_draft(self, drafted: int, kept: Sequence[int]) -> str:
        """`accept` for the draft tokens a verification kept (`drafted` were proposed). Accepted counts only
        those the sequence took: eos, a stop string or the budget can end it inside the draft."""
        before = self.stats.completion_tokens
        text = self.accept(kept)
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += self.stats.completion_tokens - before
        return text

    def end(self, reason: FinishReason) -> str:
        """Ends the sequence for a reason outside its tokens (no room left: "length"); returns the text
        held back."""
        self.stats.finish_reason = reason
        return self.detokenizer.finish()

    def close(self) -> None:
        """Called once the loop is done with it, finished or not (closed early: finish_reason stays None)."""
        self.stats.total_s = time.perf_counter() - self.started


def run_sequence(
    state: CacheState,
    sequence: SequenceState,
    prompt_ids: Sequence[int],
    reuse_generated: bool = False,
    drafter: Drafter | None = None,
) -> Iterator[str]:
    """Generates on a kept cache, prefilling only what the cache does not hold yet, and yields text pieces.
    The next forward pass runs only when the caller asks for more text, so stopping costs no wasted step,
    and the token that ends the sequence is never fed.

    `drafter` (speculative decoding, plain greedy only; speculation.py): each step also checks the tokens it
    proposes, all in one forward pass, and keeps them up to the first one greedy would not have chosen. On
    float exports that is exactly greedy's text."""
    sequence.started = time.perf_counter()
    try:
        if sequence.max_new_tokens <= 0:
            sequence.end("length")
            return
        sequence.stats.cached_tokens = state.reuse(prompt_ids, reuse_generated)
        state.reserve(len(prompt_ids) + sequence.max_new_tokens)
        logits = state.extend(prompt_ids[state.length :])
        drafter = drafter if sequence.drafts_allowed else None
        while True:
            step = sequence.next_tokens(logits)
            # The step's text goes out before any drafting, and a step that ends the sequence drafts nothing.
            if piece := sequence.accept(step):
                yield piece
            if sequence.finished:
                return
            draft = drafter.propose(state.tokens + step, sequence.remaining) if drafter is not None else []
            if draft:
                piece, logits = verify_draft(state, sequence, step, draft)
                if piece:
                    yield piece
                if sequence.finished:
                    return
            else:  # forced tokens run as one multi-token step
                logits = state.feed(step)
    finally:
        sequence.close()


def verify_draft(
    state: CacheState, sequence: SequenceState, step: Sequence[int], draft: Sequence[int]
) -> tuple[str, np.ndarray]:
    """Feeds `step` (already accepted) and `draft` as one step, keeps the draft up to its first token greedy
    would not have chosen, and records the kept ones in `sequence`. Returns their text and the logits after
    the last kept token (the verified step's row for it: the next token's logits)."""
    rows = state.verify([*step, *draft])
    accepted = accepted_length(rows, draft)
    state.truncate(state.length - (len(draft) - accepted))
    return sequence.accept_draft(len(draft), draft[:accepted]), rows[accepted]


def stream_generate(
    decoder: Decoder,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    *,
    max_new_tokens: int,
    eos_token_ids: Collection[int] = (),
    stop: Iterable[str] = (),
    context_length: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Streams text pieces from a fresh cache. Arguments are checked here, before the first `next()`, so a
    prompt that does not fit raises at the call site rather than inside the consumer's loop."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise RequestError("the prompt is empty: at least one token is needed to start generation")
    max_new_tokens = fit_to_context(len(prompt_ids), max_new_tokens, context_length)
    sequence = SequenceState.create(
        sampler, tokenizer, len(prompt_ids), max_new_tokens, eos_token_ids, stop, stats
    )
    return run_sequence(CacheState(decoder, limit=context_length), sequence, prompt_ids)
