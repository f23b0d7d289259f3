"""Runs an export and its PyTorch original on the same inputs and gathers the comparison into a report.

Per prompt: the reference model's greedy continuation is generated once; then both models score
prompt + continuation teacher-forced. The export runs the way an app runs it (prefill the prompt, then one
token at a time through its KV cache), the reference in one uncached forward pass, so the comparison also
checks the cached path against the uncached one. "greedy_match" is where the export's argmax first leaves the
reference's continuation: up to there its own greedy output would be identical.
Text: both models score the whole text in one pass, for perplexity.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SmolexportError
from ..progress import SILENT, Progress
from .inputs import load_prompts, load_text
from .metrics import LogitComparison, compare_logits
from .thresholds import bounds_for


@dataclass
class ValidationReport:
    export: str
    reference: str
    quant: str
    prompts: list[dict[str, Any]]
    text: dict[str, Any]
    overall: dict[str, float]
    checks: list[dict[str, Any]]
    seconds: float
    passed: bool = field(init=False)

    def __post_init__(self):
        self.passed = all(check["passed"] for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "export": self.export,
            "reference": self.reference,
            "quant": self.quant,
            "overall": self.overall,
            "checks": self.checks,
            "prompts": self.prompts,
            "text": self.text,
            "seconds": round(self.seconds, 1),
        }

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        o = self.overall
        lines = [
            f"export {self.export} ({self.quant}) vs {self.reference}",
            f"  prompts: {len(self.prompts)}, greedy identical: {o['greedy_identical_fraction']:.0%}, "
            f"tokens compared: {o['positions']}",
            f"  top-1 agreement {o['top1_agreement']:.4f}   mean KL {o['mean_kl']:.3g}   "
            f"max |logit diff| {o['max_abs_logit_diff']:.3g}   mean {o['mean_abs_logit_diff']:.3g}",
            f"  perplexity: reference {self.text['ppl_reference']:.3f}, export {self.text['ppl_export']:.3f}, "
            f"ratio {o['ppl_ratio']:.4f}",
        ]
        for c in self.checks:
            op = "<=" if c["kind"] == "max" else ">="
            lines.append(
                f"  {'PASS' if c['passed'] else 'FAIL'}  {c['metric']} = {c['value']:.4g} ({op} {c['limit']:g})"
            )
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def validate_export(
    export_dir: Path,
    reference: str | None = None,
    prompts_file: Path | None = None,
    text_file: Path | None = None,
    max_new_tokens: int = 32,
    thresholds: dict[str, float] | None = None,
    progress: Progress = SILENT,
) -> ValidationReport:
    from smolexport_runtime import load

    from ..sources import load_torch_model, resolve_path

    started = time.perf_counter()
    prompts, text = load_prompts(prompts_file), load_text(text_file)
    progress.step(f"loading export {export_dir}")
    export = load(export_dir, providers="cpu")
    manifest = export.manifest
    quant = manifest.quant["mode"]
    bounds = bounds_for(quant, thresholds)
    reference = reference or manifest.source["spec"]
    progress.step(f"loading the PyTorch reference {reference}")
    torch_model = load_torch_model(resolve_path(reference)[1])
    if torch_model.config.vocab_size != manifest.model.vocab_size:
        raise SmolexportError(f"reference {reference} does not match the export (vocabulary size differs)")
    eos_ids = sorted(export.eos_token_ids)

    prompt_results, comparisons = [], []
    for n, prompt in enumerate(prompts, 1):
        progress.count("prompts", n, len(prompts))
        prompt_ids = export.encode(prompt, chat=True)
        continuation = _reference_greedy(torch_model, prompt_ids, max_new_tokens, eos_ids)
        tokens = np.array(prompt_ids + continuation)
        ref_logits = _torch_logits(torch_model, tokens)[len(prompt_ids) - 1 : -1]
        exp_logits = _export_logits_cached(export.decoder, prompt_ids, continuation)
        comparison = compare_logits(ref_logits, exp_logits, np.array(continuation))
        comparisons.append(comparison)
        prompt_results.append(
            {
                "prompt": prompt,
                "prompt_tokens": len(prompt_ids),
                "reference_text": export.tokenizer.decode(continuation),
                "greedy_identical": comparison.greedy_match == len(continuation),
                **comparison.to_dict(),
            }
        )

    progress.step("scoring the text")
    text_ids = export.encode(text, chat=False)
    if len(text_ids) < 2:
        raise SmolexportError("the perplexity text is too short (needs at least two tokens)")
    text_ids = text_ids[: manifest.model.context_length]
    ref_logits = _torch_logits(torch_model, np.array(text_ids))[:-1]
    exp_logits = _export_logits_uncached(export.decoder, text_ids)[:-1]
    text_cmp = compare_logits(ref_logits, exp_logits, np.array(text_ids[1:]))
    text_result = {
        **text_cmp.to_dict(),
        "ppl_reference": float(np.exp(text_cmp.nll_reference)),
        "ppl_export": float(np.exp(text_cmp.nll_export)),
    }

    overall = _overall(comparisons + [text_cmp], prompt_results, text_result)
    checks = [
        {
            "metric": b.metric,
            "value": overall[b.metric],
            "limit": b.limit,
            "kind": b.kind,
            "passed": b.check(overall[b.metric]),
        }
        for b in bounds
    ]
    return ValidationReport(
        export=str(export_dir),
        reference=reference,
        quant=quant,
        prompts=prompt_results,
        text=text_result,
        overall=overall,
        checks=checks,
        seconds=time.perf_counter() - started,
    )


def _overall(comparisons: list[LogitComparison], prompts: list[dict], text: dict) -> dict[str, float]:
    weights = np.array([c.positions for c in comparisons], dtype=np.float64)

    def pooled(attr: str) -> float:
        return float(np.average([getattr(c, attr) for c in comparisons], weights=weights))

    return {
        "positions": int(weights.sum()),
        "max_abs_logit_diff": max(c.max_abs_logit_diff for c in comparisons),
        "mean_abs_logit_diff": pooled("mean_abs_logit_diff"),
        "top1_agreement": pooled("top1_agreement"),
        "mean_kl": pooled("mean_kl"),
        "greedy_identical_fraction": float(np.mean([p["greedy_identical"] for p in prompts])),
        "ppl_ratio": text["ppl_export"] / text["ppl_reference"],
    }


# --- running the two models ----------------------------------------------------------------------


def _reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )
    return out[0, len(prompt_ids) :].tolist()


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor(ids[None, :])).logits[0].float().numpy()


def _export_logits_uncached(decoder, ids: list[int]) -> np.ndarray:
    n = len(ids)
    logits, _ = decoder.forward(
        np.array([ids], dtype=np.int64),
        np.ones((1, n), np.int64),
        np.arange(n, dtype=np.int64)[None, :],
        decoder.empty_cache(1),
    )
    return logits[0]


def _export_logits_cached(decoder, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """Logits predicting each continuation token: prefill the prompt, then feed the continuation one by one."""
    n = len(prompt_ids)
    logits, cache = decoder.forward(
        np.array([prompt_ids], dtype=np.int64),
        np.ones((1, n), np.int64),
        np.arange(n, dtype=np.int64)[None, :],
        decoder.empty_cache(1),
    )
    rows = [logits[0, -1]]
    for token in continuation[:-1]:
        logits, cache = decoder.forward(
            np.array([[token]], dtype=np.int64), np.ones((1, n + 1), np.int64), np.array([[n]], dtype=np.int64), cache
        )
        rows.append(logits[0, -1])
        n += 1
    return np.stack(rows)
