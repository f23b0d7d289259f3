"""`smolexport bench` on a tiny export (the structured scenario on the bundled 135M): the workloads run and report
every documented key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from smolexport.cli import main
from smolexport.onnx.export import OnnxExportOptions, export_onnx

KEYS = {"ttft_ms_chat", "ttft_ms_long", "decode_tok_s", "decode_gb_s", "peak_rss_mb", "artifact_mb"}


def test_bench_reports_the_workload(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", context_length=256))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "e"), "--runs", "1", "--context", "128",
                                       "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) >= KEYS
    assert (
        report["decode_tok_s"] > 0 and report["ttft_ms_long"] > 0 and report["long_prompt_tokens"] == 255
    )  # 512, capped by the context
    assert report["peak_rss_mb"] > 10 and 0 < report["artifact_mb"] < 5


def test_bench_on_a_missing_export_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.output.startswith("error: ")


REAL_EXPORT = Path(__file__).resolve().parents[2] / "exports" / "smollm2-135m-int4"
STRUCTURED_KEYS = {"compile_ms", "mask_us_p50", "mask_us_p99", "masked_tokens", "free_tok_s", "json_tok_s",
                   "json_over_free", "vocab_size", "grammar_tokenizer_s", "json_complete"}  # fmt: skip


@pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason=f"{REAL_EXPORT} not exported (README's first command)")
def test_bench_structured_reports_mask_compile_and_speed(tmp_path):
    """--scenario structured on the bundled 135M int4 (the tiny models' word-level tokenizers have no decoder,
    which llguidance needs)."""
    out = tmp_path / "bench.json"
    args = ["bench", str(REAL_EXPORT), "--scenario", "structured", "--runs", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"structured"}  # only the scenario asked for
    structured = report["structured"]
    assert set(structured) >= STRUCTURED_KEYS
    assert structured["vocab_size"] == 49152 and structured["json_complete"] is True
    assert 0 < structured["mask_us_p50"] <= structured["mask_us_p99"]
    assert structured["compile_ms"] > 0 and structured["grammar_tokenizer_s"] > 0
    assert structured["free_tok_s"] > 0 and structured["json_tok_s"] > 0
    # The grammar forces the order's fixed keys and punctuation: fewer masks than tokens.
    assert 0 < structured["masked_tokens"] < structured["json_tokens"]
