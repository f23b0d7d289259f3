"""The lightweight runtime on a real export: generation matches transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch
from smolexport_runtime import load

from smolexport.onnx.export import OnnxExportOptions, export_onnx
from tests.export.test_decoder_numerics import quantized_copy


@pytest.mark.parametrize("which", ["gqa_tied", "mha_untied"])
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_runtime_greedy_generation_matches_transformers(tiny_models, tmp_path, which, quant):
    folder, model = tiny_models[which]
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant=quant))
    if quant == "int4":  # compare with the weights the int4 kernels compute with
        model = quantized_copy(model, 4, 32)
    runtime = load(tmp_path / "e")
    assert runtime.decoder.keeps_logits  # prefill computes the last position's logits only
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
