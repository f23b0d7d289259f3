"""`smolexport bench` on a tiny export: the workload runs and reports every documented key."""

from __future__ import annotations

import json

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
