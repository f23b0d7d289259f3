"""Core ML export on Linux: spec structure, and the NumPy reference interpreter against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from smolexport_runtime.coreml import causal_mask, load_coreml  # noqa: E402

from smolexport.coreml.export import CoreMLExportOptions, export_coreml  # noqa: E402
from smolexport.coreml.interpreter import Interpreter  # noqa: E402


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    folder, model = tiny_models["gqa_tied"]
    root = tmp_path_factory.mktemp("coreml")
    for quant in ("fp16", "int4", "int8"):
        export_coreml(str(folder), root / quant, CoreMLExportOptions(quant=quant, context_length=64))
    export_coreml(str(folder), root / "all", CoreMLExportOptions(quant="fp16", context_length=64, all_logits=True))
    return root, model


def run_cached(package, ids):
    interpreter = Interpreter(package)
    state = interpreter.new_state()
    rows = []
    out = interpreter.predict({"input_ids": np.array([ids[:3]], np.int32), "causal_mask": causal_mask(3, 3)}, state)
    rows.append(out["logits"][0, -1])
    for n in range(3, len(ids)):
        step = {"input_ids": np.array([[ids[n]]], np.int32), "causal_mask": causal_mask(1, n + 1)}
        rows.append(interpreter.predict(step, state)["logits"][0, -1])
    return np.stack(rows).astype(np.float32)


def test_spec_has_states_fused_attention_and_compressed_weights(exports):
    root, _ = exports
    ops = [op.op_type for op in Interpreter(root / "int4" / "model.mlpackage").ops]
    assert ops.count("read_state") == 2 and ops.count("coreml_update_state") >= 2
    assert "scaled_dot_product_attention" in ops
    assert ops.count("constexpr_blockwise_shift_scale") == 1 + 7 * 2  # tied embedding once, 7 per layer
    names = Interpreter(root / "fp16" / "model.mlpackage").state_names()
    assert sorted(names) == ["key_cache", "value_cache"]


def test_interpreter_with_states_matches_pytorch(exports):
    root, model = exports
    ids = [5, 9, 11, 40, 7, 13]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, 2:].numpy()
    got = run_cached(root / "fp16" / "model.mlpackage", ids)
    np.testing.assert_allclose(got, expected, atol=0.05, rtol=0)  # fp16 compute
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    int4 = run_cached(root / "int4" / "model.mlpackage", ids)
    assert np.abs(int4 - expected).max() < 2.0 and np.abs(int4 - got).max() > 1e-3  # compressed, still close


def test_int8_is_per_channel_and_close(exports):
    root, model = exports
    ids = [5, 9, 11, 40, 7, 13]
    ops = Interpreter(root / "int8" / "model.mlpackage").ops
    compressed = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(compressed) == 1 + 7 * 2
    assert all(op.inputs["scale"].shape[1] == 1 for op in compressed)  # one scale per output channel
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, 2:].numpy()
    got = run_cached(root / "int8" / "model.mlpackage", ids)
    assert np.abs(got - expected).max() < 0.1


def test_all_logits_export_returns_every_position(exports):
    """--all-logits: a prefill returns one row per new token, and the runtime passes them through."""
    root, model = exports
    ids = [5, 9, 11, 40, 7]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    runtime = load_coreml(root / "all", runner=Interpreter(root / "all" / "model.mlpackage"))
    decoder = runtime.decoder
    cache = decoder.empty_cache(1)
    n = len(ids)
    logits, cache = decoder.forward(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], cache)
    assert logits.shape == (1, n, expected.shape[-1])
    np.testing.assert_allclose(logits[0], expected, atol=0.05)
    last, _ = decoder.forward(np.array([[3]]), np.ones((1, n + 1), np.int64), np.array([[n]]), cache, 1)
    assert last.shape == (1, 1, expected.shape[-1])


def test_mha_untied_model_with_the_interpreter_matches_pytorch(tiny_models, tmp_path):
    """No GQA tiling, a separate lm_head constant: the other shape of Llama."""
    folder, model = tiny_models["mha_untied"]
    export_coreml(str(folder), tmp_path / "e", CoreMLExportOptions(quant="fp16", context_length=32))
    ops = [op.op_type for op in Interpreter(tmp_path / "e" / "model.mlpackage").ops]
    assert "tile" not in ops
    ids = [5, 9, 11, 40, 7, 13]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, 2:].numpy()
    got = run_cached(tmp_path / "e" / "model.mlpackage", ids)
    np.testing.assert_allclose(got, expected, atol=0.05, rtol=0)


def test_block_size_that_does_not_divide_the_model_is_refused(tiny_models, tmp_path):
    from smolexport.errors import UsageError

    folder, model = tiny_models["gqa_tied"]
    widths = {model.config.hidden_size, model.config.intermediate_size}
    block = next(b for b in (128, 64, 32, 16) if any(w % b for w in widths))
    with pytest.raises(UsageError, match="does not divide"):
        export_coreml(str(folder), tmp_path / "e", CoreMLExportOptions("int4", context_length=64, block_size=block))
    assert not (tmp_path / "e").exists()


def test_a_conversation_on_core_ml_states_reuses_its_prefix(exports):
    """Prefix reuse through the Core ML decoder: truncating is a shorter length in the state, and a diverging
    prompt answers as a fresh state does."""
    root, _ = exports
    package = root / "fp16" / "model.mlpackage"
    runtime = load_coreml(root / "fp16", runner=Interpreter(package))
    conversation = runtime.conversation()
    first = conversation.generate("w5 w6 w7 w8 w9", chat=False, max_new_tokens=4)
    second = conversation.generate("w5 w6 w7 w20 w21", chat=False, max_new_tokens=6)
    assert conversation.last_stats.cached_tokens == 3
    fresh = load_coreml(root / "fp16", runner=Interpreter(package))
    assert second == fresh.generate("w5 w6 w7 w20 w21", chat=False, max_new_tokens=6)
    assert first == fresh.generate("w5 w6 w7 w8 w9", chat=False, max_new_tokens=4)
