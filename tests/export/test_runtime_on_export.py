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
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant=quant, preset="rtn", accuracy_level=0))
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


def test_preallocated_cache_matches_grown_cache(tiny_models, tmp_path):
    """The fused graph's shared past/present buffers (written in place) give the same logits as a cache that
    grows by concatenation, also when the prompt is prefilled in chunks; overflowing the buffer is an error."""
    import numpy as np
    from smolexport_runtime.errors import SmolexportRuntimeError
    from smolexport_runtime.generate import decode_one_token, prefill
    from smolexport_runtime.session import KVBuffers

    folder, _ = tiny_models["gqa_tied"]
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="fp32"))
    decoder = load(tmp_path / "e").decoder
    assert decoder.prefill_chunk == 128  # CPU: small prefill chunks keep the activation arena small
    ids = [5, 9, 11, 40, 7, 13, 21, 8, 30]
    grown_logits, grown, n = prefill(decoder, ids, chunk_size=4)
    shared_logits, shared, _ = prefill(decoder, ids, chunk_size=4, capacity=len(ids) + 3)
    assert isinstance(shared, KVBuffers) and not isinstance(grown, KVBuffers)
    np.testing.assert_allclose(shared_logits, grown_logits, atol=1e-5)
    for step, token in enumerate([3, 17, 25]):
        grown_logits, grown, _ = decode_one_token(decoder, token, grown, n + step)
        shared_logits, shared, _ = decode_one_token(decoder, token, shared, n + step)
        np.testing.assert_allclose(shared_logits, grown_logits, atol=1e-5)
    with pytest.raises(SmolexportRuntimeError, match="allocated for 12 tokens"):
        decode_one_token(decoder, 4, shared, n + 3)


def prefill_and_decode(decoder, ids=(5, 9, 11, 40, 7, 13, 21, 8, 30), then=(3, 17, 25)):
    """Prefills `ids` in chunks of 4 into a cache preallocated for them and `then`, then decodes `then`:
    returns the logits of each step [1 + len(then), vocab], the cache and its length."""
    import numpy as np
    from smolexport_runtime.generate import decode_one_token, prefill

    step, cache, n = prefill(decoder, list(ids), chunk_size=4, capacity=len(ids) + len(then))
    steps = [step]
    for token in then:
        step, cache, n = decode_one_token(decoder, token, cache, n)
        steps.append(step)
    return np.stack(steps), cache, n


def test_fp16_cache_under_fp32_activations_runs_in_the_runtime(tiny_models, tmp_path):
    """--kv-cache fp16 on an int4 export: the runtime allocates fp16 buffers from the manifest, writes them in
    place, and the logits stay within fp16 rounding of the fp32-cache export's."""
    import numpy as np

    folder, _ = tiny_models["gqa_tied"]
    logits = {}
    for kv in ("fp32", "fp16"):
        export_onnx(str(folder), tmp_path / kv, OnnxExportOptions(quant="int4", preset="rtn", kv_cache=kv))
        decoder = load(tmp_path / kv).decoder
        assert decoder.kv_dtype == np.dtype("float16" if kv == "fp16" else "float32")
        logits[kv], cache, _ = prefill_and_decode(decoder)
        assert cache[0].data_type() == ("tensor(float16)" if kv == "fp16" else "tensor(float)")
    assert np.abs(logits["fp32"]).max() > 1  # logits of a real size, so the tolerance below means something
    np.testing.assert_allclose(logits["fp16"], logits["fp32"], atol=5e-2, rtol=0)
