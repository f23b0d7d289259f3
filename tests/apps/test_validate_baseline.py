"""The CI regression gate: `smolexport validate --baseline/--markdown`, the latency in the report, and the
copyable CI example (pytest file and GitHub Actions workflow) in sample_apps/ci_validation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from smolexport.cli import main
from smolexport.errors import SmolexportError, UsageError
from smolexport.validate.baseline import Tolerances, compare, load_baseline

from .conftest import REPO

EXAMPLE = REPO / "sample_apps" / "ci_validation"

REPORT = {
    "quant": "int8",
    "overall": {"top1_agreement": 0.95, "mean_kl": 0.01, "ppl_ratio": 1.01},
    "latency": {"prefill_ms": 20.0, "decode_ms_per_token": 5.0},
}


def changed(**values):
    report = copy.deepcopy(REPORT)
    for key, value in values.items():
        section, metric = key.split("__")
        report[section][metric] = value
    return report


def failing(result):
    return [c["metric"] for c in result["checks"] if not c["passed"]]


def test_compare_passes_within_tolerances():
    current = changed(
        overall__top1_agreement=0.941, overall__mean_kl=0.0125, overall__ppl_ratio=1.0199, latency__prefill_ms=29.9
    )
    result = compare(current, REPORT)
    assert result["passed"] and failing(result) == [] and len(result["checks"]) == 5


@pytest.mark.parametrize(
    ("change", "metric"),
    [
        ({"overall__top1_agreement": 0.93}, "top1_agreement"),
        ({"overall__mean_kl": 0.0127}, "mean_kl"),
        ({"overall__ppl_ratio": 1.03}, "ppl_ratio"),
        ({"latency__prefill_ms": 31.0}, "latency.prefill_ms"),
        ({"latency__decode_ms_per_token": 7.6}, "latency.decode_ms_per_token"),
    ],
)
def test_compare_fails_each_regression(change, metric):
    result = compare(changed(**change), REPORT)
    assert not result["passed"] and failing(result) == [metric]


def test_compare_tolerances_notes_and_kl_floor():
    slower = changed(latency__decode_ms_per_token=50.0)
    assert compare(slower, REPORT, Tolerances(latency_increase=float("inf")))["passed"]
    assert not compare(slower, REPORT, Tolerances(latency_increase=5.0))["passed"]
    assert compare(changed(overall__top1_agreement=0.9), REPORT, Tolerances(top1_drop=0.06))["passed"]
    # fp32 noise: KL 1e-11 -> 5e-11 is no regression
    tiny = changed(overall__mean_kl=1e-11)
    assert compare(changed(overall__mean_kl=5e-11), tiny)["passed"]
    old = {k: v for k, v in REPORT.items() if k != "latency"}  # a report from before latency was measured
    result = compare(changed(overall__ppl_ratio=1.0), {**old, "quant": "int4"})
    assert result["passed"] and len(result["checks"]) == 3
    assert any("latency" in n for n in result["notes"]) and any("int4" in n for n in result["notes"])
    with pytest.raises(UsageError):
        Tolerances(top1_drop=-0.1)


def test_load_baseline_refuses_what_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    for content, words in [
        (None, "does not exist"),
        ("{oops", "not readable JSON"),
        ("[1]", "not a smolexport validation report"),
        ('{"overall": {"top1_agreement": 1}}', "lacks mean_kl, ppl_ratio"),
    ]:
        if content is not None:
            bad.write_text(content)
        with pytest.raises(SmolexportError, match=words):
            load_baseline(bad if content is not None else tmp_path / "missing.json")


@pytest.fixture(scope="module")
def fast_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "prompts.json").write_text(json.dumps(["w5 w6 w7", "w40 w41"]))
    (folder / "text.txt").write_text(" ".join(f"w{i}" for i in range(3, 80)))
    return ["--prompts", str(folder / "prompts.json"), "--text", str(folder / "text.txt"), "--max-new-tokens", "6"]


def test_validate_writes_latency_markdown_and_gates_on_a_baseline(tiny_export, tiny_source, fast_inputs, tmp_path):
    runner = CliRunner()
    first_json, first_md = tmp_path / "first.json", tmp_path / "first.md"
    # A local original is not recorded in the export (no build-machine paths): it is named again.
    args = ["validate", str(tiny_export), "--reference", str(tiny_source), *fast_inputs, "-q"]
    result = runner.invoke(main, [*args, "--json", str(first_json), "--markdown", str(first_md)])
    assert result.exit_code == 0, result.output
    report = json.loads(first_json.read_text())
    latency = report["latency"]
    assert latency["prefill_ms"] > 0 and latency["decode_ms_per_token"] > 0 and latency["decode_steps"] == 2 * 5
    assert latency["prefill_tokens"] > 0 and latency["decode_tokens_per_s"] > 0
    assert {"passed", "overall", "checks", "prompts", "text", "seconds"} <= set(report)  # the keys it always had
    assert "latency: prefill" in result.output
    markdown = first_md.read_text()
    assert markdown.startswith("## smolexport validation: passed") and "| top1_agreement |" in markdown
    assert "ms/token" in markdown and "w40 w41" in markdown

    # A baseline that was much better: the same export now counts as a regression (exit 1).
    better = copy.deepcopy(report)
    better["overall"]["mean_kl"] = 0.0
    better["overall"]["ppl_ratio"] -= 0.5
    better["latency"]["decode_ms_per_token"] /= 100
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    second_json, second_md = tmp_path / "second.json", tmp_path / "second.md"
    gated = [*args, "--baseline", str(baseline), "--json", str(second_json), "--markdown", str(second_md)]
    gated += ["--max-latency-increase", "20"]  # sub-millisecond timings are noisy; 100x slower still fails
    result = runner.invoke(main, gated)
    assert result.exit_code == 1, result.output
    assert "REGRESSED" in result.output and "FAIL  ppl_ratio" in result.output
    second = json.loads(second_json.read_text())
    assert second["passed"] is True  # the bounds still pass: only the baseline gate failed
    assert second["baseline"]["file"] == str(baseline) and second["baseline"]["passed"] is False
    assert failing(second["baseline"]) == ["ppl_ratio", "latency.decode_ms_per_token"]
    assert "**REGRESSED**" in second_md.read_text()

    # With looser tolerances the same comparison passes.
    loose = ["--max-ppl-increase", "1", "--max-latency-increase", "inf"]
    result = runner.invoke(main, [*args, "--baseline", str(baseline), *loose])
    assert result.exit_code == 0 and "NO REGRESSION" in result.output


def test_validate_refuses_a_bad_baseline_before_working(tiny_export, tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tiny_export), "--baseline", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and result.output.startswith("error: baseline report")
    assert "Traceback" not in result.output


def test_ci_example_pytest_file(tiny_source, fast_inputs, tmp_path):
    """Runs the copyable pytest example on the tiny model, the way a CI job would run it."""
    reports = tmp_path / "reports"
    env = {
        **os.environ,
        "SMOLEXPORT_MODEL": str(tiny_source),
        "SMOLEXPORT_QUANT": "fp32",
        "SMOLEXPORT_REPORT_DIR": str(reports),
        "SMOLEXPORT_BASELINE": str(tmp_path / "no-baseline-yet.json"),
        "SMOLEXPORT_VALIDATE_ARGS": " ".join(fast_inputs),
        "SMOLEXPORT_THRESHOLDS": "top1_agreement=0.99",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "test_export_quality.py")]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((reports / "validation.json").read_text())
    assert report["passed"] and "baseline" not in report and (reports / "validation.md").is_file()

    # The next run gates on that report as its baseline (latency ignored: the two runs may differ in speed).
    (reports / "validation.json").rename(tmp_path / "baseline.json")
    env |= {"SMOLEXPORT_BASELINE": str(tmp_path / "baseline.json")}
    env["SMOLEXPORT_VALIDATE_ARGS"] += " --max-latency-increase inf"
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads((reports / "validation.json").read_text())["baseline"]["passed"]


def test_ci_example_workflow_is_valid():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((EXAMPLE / ".github" / "workflows" / "validate.yml").read_text())
    steps = workflow["jobs"]["validate"]["steps"]
    scripts = "\n".join(step.get("run", "") for step in steps)
    assert "smolexport onnx" in scripts and "smolexport validate" in scripts and "--baseline" in scripts
    assert "--json reports/validation.json" in scripts and "--markdown reports/validation.md" in scripts
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/"
    assert (EXAMPLE / "README.md").is_file()
