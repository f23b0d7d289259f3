"""Agreement metrics between two models' logits over the same token positions (numpy, float64)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class LogitComparison:
    positions: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float  # fraction of positions where both models' argmax agree
    mean_kl: float  # mean KL(reference || export) in nats
    greedy_match: int  # leading positions where the export's argmax equals the reference's next token
    nll_reference: float  # mean negative log-likelihood of the target tokens
    nll_export: float
    # At the first position where the export's argmax leaves the targets: the reference's top-1 minus top-2
    # logit there. A small margin (below the quant mode's logit error) means a near tie, not a broken export.
    divergence_margin: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare_logits(reference: np.ndarray, export: np.ndarray, targets: np.ndarray) -> LogitComparison:
    """reference/export: [positions, vocab] logits predicting `targets` [positions] (teacher-forced)."""
    diff = np.abs(reference.astype(np.float64) - export.astype(np.float64))
    ref_lp, exp_lp = log_softmax(reference), log_softmax(export)
    kl = (np.exp(ref_lp) * (ref_lp - exp_lp)).sum(axis=-1)
    export_top1 = export.argmax(axis=-1)
    agree = reference.argmax(axis=-1) == export_top1
    mismatches = np.flatnonzero(export_top1 != targets)
    rows = np.arange(len(targets))
    margin = None
    if len(mismatches):
        top2 = np.partition(reference[mismatches[0]].astype(np.float64), -2)[-2:]
        margin = float(top2[1] - top2[0])
    return LogitComparison(
        positions=len(targets),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        top1_agreement=float(agree.mean()),
        mean_kl=float(kl.mean()),
        greedy_match=int(mismatches[0]) if len(mismatches) else len(targets),
        nll_reference=float(-ref_lp[rows, targets].mean()),
        nll_export=float(-exp_lp[rows, targets].mean()),
        divergence_margin=margin,
    )
