"""The lightweight runtime on a real export: generation matches transformers' greedy generate."""

from __future__ import annotations

import torch
from smolexport_runtime import load

from smolexport.onnx.export import OnnxExportOptions, export_onnx


def test_runtime_greedy_generation_matches_transformers(tiny_models, tmp_path):
    folder, model = tiny_models["mha_untied"]
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="fp32"))
    runtime = load(tmp_path / "e")
    prompt_ids = runtime.encode("w7 w8 w9 w10", chat=True)
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(prompt_ids) :].tolist()
    text = runtime.generate("w7 w8 w9 w10", max_new_tokens=12, greedy=True)
    ids = runtime.tokenizer.encode(text, add_special_tokens=False).ids
    expected_text_ids = [t for t in expected if t != 2]
    assert ids == expected_text_ids[: len(ids)] and len(ids) == len(expected_text_ids)
    assert runtime.last_stats.completion_tokens == len(expected)
