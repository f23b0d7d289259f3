"""Choosing the next token from a logits vector: pure numpy functions, no state except an explicit RNG.

Order of the filters follows Hugging Face transformers (temperature, then top-k, then top-p) so that the
same settings give the same distribution as the reference model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from .errors import RequestError

Sampler = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (the default) or greedy=True means greedy decoding; top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        # NaN passes every comparison below unnoticed and would sample garbage: numbers must be finite.
        if not _finite_number(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _integer(self.seed) or self.seed < 0):
            raise RequestError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        if not isinstance(self.greedy, bool | np.bool_):
            raise RequestError(f"greedy must be True or False, got {self.greedy!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def _integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool | np.bool_)


def _finite_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool | np.bool_) and math.isfinite(value)


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def probabilities(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> np.ndarray:
    """The sampling distribution over the vocabulary; tokens removed by top-k/top-p get exactly 0."""
    # float64: with a 50k vocabulary, float32 softmax sums drift enough to matter at the nucleus edge.
    scores = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    if 0 < top_k < scores.size:
        # Ties with the k-th score are kept, as transformers does.
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Smallest prefix of the sorted tokens whose mass reaches top_p (always at least one token).
        keep = min(int(np.searchsorted(cumulative, top_p)) + 1, probs.size)
        mask = np.zeros(probs.size, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    if config.is_greedy:
        return greedy(logits)
    probs = probabilities(logits, config.temperature, config.top_k, config.top_p)
    # Inverse-CDF draw: a zero-probability token owns an empty interval, so it can never be chosen.
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= probs.size:  # u * total rounded up to total: take the last token that has any mass
        index = int(np.flatnonzero(probs)[-1])
    return index


def make_sampler(config: SamplingConfig) -> Sampler:
    """A `logits -> token id` function; sampled ones own a Generator seeded from `config.seed`."""
    if config.is_greedy:
        return greedy
    rng = np.random.default_rng(config.seed)
    return lambda logits: sample(logits, config, rng)
