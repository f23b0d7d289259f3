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
    latency: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None  # a comparison with a stored report (see baseline.py), when asked
    # The export's quantization recipe as its manifest names it: {"preset": ..., "recipe": ...} (empty for
    # Core ML exports and folders exported before recipes were recorded).
    recipe: dict[str, Any] = field(default_factory=dict)
    passed: bool = field(init=False)

    def __post_init__(self):
        self.passed = all(check["passed"] for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "export": self.export,
            "reference": self.reference,
            "quant": self.quant,
            "recipe": self.recipe,
            "overall": self.overall,
            "checks": self.checks,
            "prompts": self.prompts,
            "text": self.text,
            "seconds": round(self.seconds, 1),
            "latency": self.latency,
            **({"baseline": self.baseline} if self.baseline is not None else {}),
        }

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        o = self.overall
        lines = [
            f"export {self.export} ({self.quant}{_recipe_note(self.recipe)}) vs {self.reference}",
            f"  prompts: {len(self.prompts)}, greedy identical: {o['greedy_identical_fraction']:.0%}, "
            f"tokens compared: {o['positions']}",
            *(
                f"  diverged at token {p['greedy_match'] + 1}/{p['positions']} where the reference's top-2 "
                f"margin was {p['divergence_margin']:.3g}: {p['prompt'][:50]!r}"
                for p in self.prompts
                if not p["greedy_identical"]
            ),
            f"  top-1 agreement {o['top1_agreement']:.4f}   mean KL {o['mean_kl']:.3g}   "
            f"max |logit diff| {o['max_abs_logit_diff']:.3g}   mean {o['mean_abs_logit_diff']:.3g}",
            f"  perplexity: reference {self.text['ppl_reference']:.3f}, export {self.text['ppl_export']:.3f}, "
            f"ratio {o['ppl_ratio']:.4f}{_interval(self.text)}",
        ]
        if self.latency:
            lat = self.latency
            lines.append(
                f"  latency: prefill {lat['prefill_ms']:.1f} ms (median prompt {lat['prefill_tokens']} tokens), "
                f"decode {lat['decode_ms_per_token']:.2f} ms/token ({lat['decode_tokens_per_s']:.1f} tokens/s)"
                f"{_latency_note(lat)}"
            )
        for c in self.checks:
            op = "<=" if c["kind"] == "max" else ">="
            lines.append(
                f"  {'PASS' if c['passed'] else 'FAIL'}  {c['metric']} = {c['value']:.4g} ({op} {c['limit']:g})"
            )
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The report as Markdown, e.g. for a CI job summary or a pull-request comment."""
        o = self.overall
        lines = [
            f"## smolexport validation: {'passed' if self.passed else 'FAILED'}",
            "",
            f"Export `{self.export}` ({self.quant}{_recipe_note(self.recipe)}) against `{self.reference}`, "
            f"{len(self.prompts)} prompts, "
            f"{o['positions']} tokens compared, {self.seconds:.0f} s.",
            "",
            "| check | value | bound | result |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            op = "≤" if c["kind"] == "max" else "≥"
            lines.append(
                f"| {c['metric']} | {c['value']:.4g} | {op} {c['limit']:g} | {'pass' if c['passed'] else '**FAIL**'} |"
            )
        greedy = sum(p["greedy_identical"] for p in self.prompts)
        lines += [
            "",
            "| metric | value |",
            "|---|---|",
            f"| top-1 agreement | {o['top1_agreement']:.4f} |",
            f"| mean KL (nats) | {o['mean_kl']:.3g} |",
            f"| max / mean abs logit diff | {o['max_abs_logit_diff']:.3g} / {o['mean_abs_logit_diff']:.3g} |",
            f"| perplexity (reference, export, ratio) | {self.text['ppl_reference']:.3f}, "
            f"{self.text['ppl_export']:.3f}, {o['ppl_ratio']:.4f}{_interval(self.text)} |",
            f"| greedy identical | {greedy}/{len(self.prompts)} prompts |",
        ]
        if self.latency:
            lat = self.latency
            lines += [
                f"| prefill | {lat['prefill_ms']:.1f} ms (median prompt, {lat['prefill_tokens']} tokens) |",
                f"| decode | {lat['decode_ms_per_token']:.2f} ms/token ({lat['decode_tokens_per_s']:.1f} tokens/s)"
                f"{_latency_note(lat)} |",
            ]
        if self.baseline is not None:
            from .baseline import baseline_markdown

            lines += ["", baseline_markdown(self.baseline)]
        lines += [
            "",
            "<details><summary>Per prompt</summary>",
            "",
            "| prompt | tokens | top-1 | mean KL | greedy match |",
            "|---|---|---|---|---|",
        ]
        for p in self.prompts:
            lines.append(
                f"| {_md_cell(p['prompt'], 60)} | {p['prompt_tokens']} | {p['top1_agreement']:.3f} | "
                f"{p['mean_kl']:.3g} | {p['greedy_match']}/{p['positions']} |"
            )
        lines += ["", "</details>", ""]
        return "\n".join(lines)

    def write_markdown(self, path: Path) -> None:
        Path(path).write_text(self.to_markdown())


def _recipe_note(recipe: dict[str, Any]) -> str:
    if not recipe.get("recipe"):
        return ""
    preset = f"preset {recipe['preset']}: " if recipe.get("preset") else ""
    return f", {preset}{recipe['recipe']}"


def _md_cell(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _recorded_reference(source: dict) -> str:
    """The original named in the manifest: a hub id or bundled alias. A local source is recorded by name only
    (exports ship inside apps, without the build machine's paths), so it has to be given again."""
    spec, kind = source.get("spec"), source.get("kind")
    if isinstance(spec, str) and kind in ("hub", "alias-gguf"):
        return spec
    if isinstance(source.get("path"), str):  # exported before paths were left out
        return source["path"]
    raise SmolexportError(
        f"this export was made from a local model ({spec!r}), whose path the export does not record; "
        "pass it with --reference PATH"
    )


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
    if _format(export_dir) == "smolexport-coreml":
        from ..coreml.runner import load_coreml_for_validation

        export, manifest = load_coreml_for_validation(export_dir)
    else:
        export = load(export_dir, providers="cpu")
        manifest = export.manifest
    quant = manifest.quant["mode"]
    bounds = bounds_for(quant, thresholds)
    reference = reference or _recorded_reference(manifest.source)
    progress.step(f"loading the PyTorch reference {reference}")
    torch_model = load_torch_model(resolve_path(reference)[1])
    if torch_model.config.vocab_size != manifest.model.vocab_size:
        raise SmolexportError(f"reference {reference} does not match the export (vocabulary size differs)")
    eos_ids = sorted(export.eos_token_ids)

    timings = _Timings()
    _warm_up(export.decoder)
    prompt_results, comparisons = [], []
    for n, prompt in enumerate(prompts, 1):
        progress.count("prompts", n - 1, len(prompts))
        prompt_ids = export.encode(prompt, chat=True)
        room = manifest.model.context_length - len(prompt_ids)
        if room < 1:
            raise SmolexportError(f"prompt {n} has {len(prompt_ids)} tokens, over the export's context")
        continuation = _reference_greedy(torch_model, prompt_ids, min(max_new_tokens, room), eos_ids)
        tokens = np.array(prompt_ids + continuation)
        ref_logits = _torch_logits(torch_model, tokens)[len(prompt_ids) - 1 : -1]
        exp_logits = _export_logits_cached(export.decoder, prompt_ids, continuation, timings)
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

    progress.count("prompts", len(prompts), len(prompts))
    progress.step("scoring the text")
    text_ids = export.encode(text, chat=False)
    if len(text_ids) < 2:
        raise SmolexportError("the perplexity text is too short (needs at least two tokens)")
    text_ids = text_ids[: manifest.model.context_length]
    ref_logits = _torch_logits(torch_model, np.array(text_ids))[:-1]
    exp_logits = _export_logits_uncached(export.decoder, text_ids)[:-1]
    text_cmp = compare_logits(ref_logits, exp_logits, np.array(text_ids[1:]))
    text_result = {**text_cmp.to_dict(), **text_perplexity(text_cmp)}

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
        recipe={key: manifest.quant[key] for key in ("preset", "recipe") if manifest.quant.get(key)},
        prompts=prompt_results,
        text=text_result,
        overall=overall,
        checks=checks,
        seconds=time.perf_counter() - started,
        latency=timings.summary(export.decoder),
    )


def text_perplexity(text_cmp: LogitComparison) -> dict[str, Any]:
    """The text's perplexity under each model and the ratio's interval, as the report's `text` carries them."""
    return {
        "ppl_reference": float(np.exp(text_cmp.nll_reference)),
        "ppl_export": float(np.exp(text_cmp.nll_export)),
        "ppl_ratio_interval": text_cmp.ppl_ratio_interval(),
    }


def _interval(text: dict) -> str:
    interval = text.get("ppl_ratio_interval")
    return "" if interval is None else f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})"


def _format(export_dir: Path) -> str | None:
    try:
        return json.loads((Path(export_dir) / "smolexport.json").read_text()).get("format")
    except (OSError, ValueError):
        return None  # the loader reports a missing or corrupt manifest properly


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
        # The widest reference margin at which any prompt's greedy path diverged (0 when none did).
        "max_divergence_margin": max((p["divergence_margin"] or 0.0 for p in prompts), default=0.0),
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


def _export_logits_cached(
    decoder, prompt_ids: list[int], continuation: list[int], timings: _Timings | None = None
) -> np.ndarray:
    """Logits predicting each continuation token: prefill the prompt, then feed the continuation one by one."""
    timings = timings if timings is not None else _Timings()
    n = len(prompt_ids)
    start = time.perf_counter()
    logits, cache = decoder.forward(
        np.array([prompt_ids], dtype=np.int64),
        np.ones((1, n), np.int64),
        np.arange(n, dtype=np.int64)[None, :],
        decoder.empty_cache(1),
    )
    timings.prefill(n, time.perf_counter() - start)
    rows = [logits[0, -1]]
    for token in continuation[:-1]:
        start = time.perf_counter()
        logits, cache = decoder.forward(
            np.array([[token]], dtype=np.int64), np.ones((1, n + 1), np.int64), np.array([[n]], dtype=np.int64), cache
        )
        timings.decode(time.perf_counter() - start)
        rows.append(logits[0, -1])
        n += 1
    return np.stack(rows)


# --- latency -------------------------------------------------------------------------------------


def _latency_note(latency: dict[str, Any]) -> str:
    providers = latency.get("providers", [])
    if "Interpreter" in providers:
        return " on the NumPy reference interpreter: not Core ML's speed"
    return f" on {', '.join(providers)}" if providers else ""


class _Timings:
    """Wall time of the export's ONNX calls during validation: the prompt prefills and the cached decode steps.
    Medians, so one slow call (a page fault, another process) does not move the result."""

    def __init__(self) -> None:
        self.prefills: list[tuple[int, float]] = []
        self.decodes: list[float] = []

    def prefill(self, tokens: int, seconds: float) -> None:
        self.prefills.append((tokens, seconds))

    def decode(self, seconds: float) -> None:
        self.decodes.append(seconds)

    def summary(self, decoder=None) -> dict[str, Any]:
        if not self.prefills:
            return {}
        decode_ms = float(np.median(self.decodes)) * 1e3 if self.decodes else float("nan")
        session = getattr(decoder, "session", None)
        return {
            "prefill_ms": round(float(np.median([s for _, s in self.prefills])) * 1e3, 3),
            "prefill_tokens": int(np.median([t for t, _ in self.prefills])),
            "decode_ms_per_token": round(decode_ms, 3),
            "decode_tokens_per_s": round(1e3 / decode_ms, 1) if self.decodes else 0.0,
            "decode_steps": len(self.decodes),
            "providers": list(session.get_providers() if session is not None else getattr(decoder, "providers", [])),
        }


def _warm_up(decoder) -> None:
    """One short call first: onnxruntime's first run allocates and plans, which is not what an app sees after."""
    decoder.forward(
        np.array([[0]], dtype=np.int64), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64), decoder.empty_cache(1)
    )
