"""A regression gate: compares a validation report with a stored one (a previous `validate --json` report).

Fidelity must not drop and latency must not rise by more than a tolerance:

| metric | fails when |
|---|---|
| `top1_agreement` | current < baseline - `top1_drop` |
| `mean_kl` | current > baseline * (1 + `kl_increase`) + 1e-4 (the floor keeps fp32's ~1e-11 from failing on noise) |
| `ppl_ratio` | current > baseline + `ppl_increase` |
| `latency.prefill_ms`, `latency.decode_ms_per_token` | current > baseline * (1 + `latency_increase`) |

Latency is compared only when both reports have it; `latency_increase=inf` turns that part off (useful when
the baseline was measured on other hardware).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SmolexportError, UsageError

KL_FLOOR = 1e-4


@dataclass(frozen=True)
class Tolerances:
    top1_drop: float = 0.01  # absolute
    kl_increase: float = 0.25  # relative
    ppl_increase: float = 0.01  # absolute, on the export/reference perplexity ratio
    latency_increase: float = 0.5  # relative: shared CI machines vary by tens of percent

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:  # also refuses NaN
                raise UsageError(f"the tolerance {name} must be >= 0, got {value}")


# (report section, metric, kind, how the limit is computed from the baseline value and the tolerances)
GATES = (
    ("overall", "top1_agreement", "min", lambda b, t: b - t.top1_drop),
    ("overall", "mean_kl", "max", lambda b, t: b * (1 + t.kl_increase) + KL_FLOOR),
    ("overall", "ppl_ratio", "max", lambda b, t: b + t.ppl_increase),
    ("latency", "prefill_ms", "max", lambda b, t: b * (1 + t.latency_increase)),
    ("latency", "decode_ms_per_token", "max", lambda b, t: b * (1 + t.latency_increase)),
)


def load_baseline(path: Path) -> dict[str, Any]:
    """Reads a stored report; refuses anything that is not a `smolexport validate --json` report."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SmolexportError(f"baseline report {path} does not exist; write one with validate --json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SmolexportError(f"baseline report {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise SmolexportError(f"{path} is not a smolexport validation report (no 'overall' section)")
    missing = [m for section, m, _, _ in GATES if section == "overall" and not _is_number(data["overall"].get(m))]
    if missing:
        raise SmolexportError(f"baseline report {path} lacks {', '.join(missing)}")
    return data


def compare(current: dict[str, Any], baseline: dict[str, Any], tolerances: Tolerances | None = None) -> dict:
    """The comparison as a dict: {"passed", "tolerances", "checks": [...], "notes": [...]}; each check has
    metric, baseline, value, limit, kind and passed."""
    tolerances = tolerances or Tolerances()
    checks, notes = [], []
    for section, metric, kind, limit_of in GATES:
        base = (baseline.get(section) or {}).get(metric)
        value = (current.get(section) or {}).get(metric)
        name = metric if section == "overall" else f"{section}.{metric}"
        if not _is_number(base) or not _is_number(value):
            notes.append(f"{name} not compared: missing from the {'baseline' if not _is_number(base) else 'report'}")
            continue
        if section == "latency" and math.isinf(tolerances.latency_increase):
            continue
        limit = limit_of(base, tolerances)
        passed = value >= limit if kind == "min" else value <= limit
        checks.append(
            {"metric": name, "baseline": base, "value": value, "limit": limit, "kind": kind, "passed": passed}
        )
    if baseline.get("quant") and current.get("quant") and baseline["quant"] != current["quant"]:
        notes.append(f"the baseline is a {baseline['quant']} export, this one {current['quant']}")
    return {
        "passed": all(c["passed"] for c in checks),
        "tolerances": asdict(tolerances),
        "checks": checks,
        "notes": notes,
    }


def baseline_summary(comparison: dict[str, Any], path: Path | str | None = None) -> str:
    lines = [f"against baseline {path}:" if path else "against the baseline:"]
    for c in comparison["checks"]:
        op = ">=" if c["kind"] == "min" else "<="
        lines.append(
            f"  {'PASS' if c['passed'] else 'FAIL'}  {c['metric']} = {c['value']:.4g} "
            f"(baseline {c['baseline']:.4g}, must be {op} {c['limit']:.4g})"
        )
    lines += [f"  note: {n}" for n in comparison["notes"]]
    lines.append("NO REGRESSION" if comparison["passed"] else "REGRESSED")
    return "\n".join(lines)


def baseline_markdown(comparison: dict[str, Any]) -> str:
    source = f" (`{comparison['file']}`)" if comparison.get("file") else ""
    lines = [
        f"### Against the baseline{source}: {'no regression' if comparison['passed'] else '**REGRESSED**'}",
        "",
        "| metric | baseline | now | limit | result |",
        "|---|---|---|---|---|",
    ]
    for c in comparison["checks"]:
        op = "≥" if c["kind"] == "min" else "≤"
        result = "pass" if c["passed"] else "**FAIL**"
        lines.append(f"| {c['metric']} | {c['baseline']:.4g} | {c['value']:.4g} | {op} {c['limit']:.4g} | {result} |")
    lines += [f"\n_{n}_" for n in comparison["notes"]]
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
