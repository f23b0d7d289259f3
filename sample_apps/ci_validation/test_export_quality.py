"""Export quality gate as a pytest test: export the model, validate the export against its PyTorch original,
and fail when it misses its bounds or regressed past a stored baseline report. Copy it into your tests.

    pytest sample_apps/ci_validation/test_export_quality.py

Settings (environment variables):
    SMOLEXPORT_MODEL          what to export (default: the bundled smollm2-135m-instruct)
    SMOLEXPORT_QUANT          int4 | int8 | fp16 | fp32 (default: int4)
    SMOLEXPORT_THRESHOLDS     extra bounds, "metric=value,metric=value" (e.g. "top1_agreement=0.6")
    SMOLEXPORT_BASELINE       a previous report (validation.json) to gate against (default: ci/validation-baseline.json)
    SMOLEXPORT_REPORT_DIR     where validation.json and validation.md go (default: reports/)
    SMOLEXPORT_VALIDATE_ARGS  more `smolexport validate` options, e.g. "--max-latency-increase inf"
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = os.environ.get("SMOLEXPORT_MODEL", "smollm2-135m-instruct")
QUANT = os.environ.get("SMOLEXPORT_QUANT", "int4")
THRESHOLDS = [t.strip() for t in os.environ.get("SMOLEXPORT_THRESHOLDS", "").split(",") if t.strip()]
BASELINE = Path(os.environ.get("SMOLEXPORT_BASELINE", "ci/validation-baseline.json"))
REPORT_DIR = Path(os.environ.get("SMOLEXPORT_REPORT_DIR", "reports"))
EXTRA_ARGS = shlex.split(os.environ.get("SMOLEXPORT_VALIDATE_ARGS", ""))
SMOLEXPORT = [sys.executable, "-m", "smolexport.cli"]  # the smolexport of the environment running pytest


def smolexport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SMOLEXPORT, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / f"model-{QUANT}"
    result = smolexport("onnx", "--model", MODEL, "--quant", QUANT, "--output", str(out), "--quiet")
    assert result.returncode == 0, f"export failed: {result.stderr}"
    return out


def test_export_matches_its_original_and_did_not_regress(export_dir):
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    json_report, markdown_report = REPORT_DIR / "validation.json", REPORT_DIR / "validation.md"
    args = ["validate", str(export_dir), "--json", str(json_report), "--markdown", str(markdown_report), "--quiet"]
    args += ["--reference", MODEL]  # the original the export came from (a local path is not recorded in it)
    for threshold in THRESHOLDS:
        args += ["--threshold", threshold]
    if BASELINE.is_file():
        args += ["--baseline", str(BASELINE)]
    result = smolexport(*args, *EXTRA_ARGS)
    print(result.stdout)  # shown by pytest when the test fails (and with -s)
    assert result.returncode in (0, 1), f"validate could not run: {result.stderr}"
    report = json.loads(json_report.read_text())
    failed = [c["metric"] for c in report["checks"] if not c["passed"]]
    assert report["passed"], f"export out of bounds ({', '.join(failed)}):\n{result.stdout}"
    if "baseline" in report:
        regressed = [c["metric"] for c in report["baseline"]["checks"] if not c["passed"]]
        assert report["baseline"]["passed"], f"regressed past {BASELINE} ({', '.join(regressed)}):\n{result.stdout}"
    assert result.returncode == 0, result.stdout + result.stderr
