"""The layer-by-layer forward used for calibration follows transformers' hidden states."""

from __future__ import annotations

import json

import numpy as np
import torch

from smolexport.llama_config import LlamaConfig
from smolexport.onnx.calibration import Calibration
from smolexport.onnx.decoder import _layer_weights
from smolexport.onnx.export import OnnxExportOptions, export_onnx


def test_calibration_hidden_states_match_transformers(tiny_models):
    for which in ("gqa_tied", "mha_untied"):
        _, model = tiny_models[which]
        state = {k: v.float().numpy() for k, v in model.state_dict().items()}
        ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 40))
        calibration = Calibration(
            LlamaConfig.from_dict(model.config.to_dict()), state["model.embed_tokens.weight"], ids
        )
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for i in range(model.config.num_hidden_layers):
            before = calibration.hidden
            power = calibration.layer(*_layer_weights(state.get, i))
            if i < model.config.num_hidden_layers - 1:  # the last entry of hidden_states is after the final norm
                # the products run in bfloat16 (relative rounding 2**-9): the layer's own update to the
                # residual stream agrees to well under a percent; a wrong op would be off by ~100%
                update, expected = calibration.hidden - before, (hidden[i + 1] - hidden[i])[0].numpy()
                assert np.linalg.norm(update - expected) < 0.01 * np.linalg.norm(expected)
            assert set(power) == {"qkv", "o", "gate_up", "down"}
            down = power["down"].power
            assert down.shape == (model.config.intermediate_size,) and np.all(down >= 0)
            np.testing.assert_allclose(np.diag(power["down"].hessian()), down, rtol=1e-4)
        final = calibration.final(state["model.norm.weight"]).x  # the lm_head's inputs
        expected = hidden[-1][0].numpy()
        assert np.linalg.norm(final - expected) < 0.01 * np.linalg.norm(expected)


def test_act_mse_export_records_its_calibration(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", algo="act-mse", calibration_file=text))
    quant = json.loads((tmp_path / "e" / "smolexport.json").read_text())["quant"]
    assert quant["algo"] == "act-mse" and quant["calibration"]["text"] == str(text)


def test_awq_scaling_keeps_the_float_layer_and_lowers_its_int4_error(tiny_models):
    """awq.scale_layer only moves scale between norms/producers and the quantized matrices: each layer's float
    output is unchanged (GQA: the o_proj scale is shared by the heads of a KV head), and the calibration
    inputs it hands on are the scaled layer's real inputs."""
    from smolexport.onnx.awq import Storage, scale_layer

    _, model = tiny_models["gqa_tied"]
    c = LlamaConfig.from_dict(model.config.to_dict())
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    ids = list(np.random.default_rng(1).integers(3, c.vocab_size, 64))
    plain = Calibration(c, state["model.embed_tokens.weight"], ids, exact=True)  # float32: an exact identity
    scaled = Calibration(c, state["model.embed_tokens.weight"], ids, exact=True)
    rescaled = 0
    for i in range(c.num_hidden_layers):
        attn, mlp, input_norm, post_norm = _layer_weights(state.get, i)
        inputs = plain.layer(attn, mlp, input_norm, post_norm)
        before = (input_norm, post_norm, attn["v"])
        input_norm, post_norm = scale_layer(attn, mlp, input_norm, post_norm, inputs, c.num_attention_heads,
                                            c.num_key_value_heads, lambda key: Storage(4, 32))  # fmt: skip
        after = (input_norm, post_norm, attn["v"])
        rescaled += sum(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        scaled_inputs = scaled.layer(attn, mlp, input_norm, post_norm)
        np.testing.assert_allclose(scaled.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
        for role in ("qkv", "o", "gate_up", "down"):
            np.testing.assert_allclose(inputs[role].x, scaled_inputs[role].x, atol=1e-4, rtol=1e-3)
    assert rescaled > 0  # the search did pick scales somewhere, so the checks above tested a real folding


def test_awq_export_runs_and_records_its_algo(tiny_models, tmp_path):
    folder, _ = tiny_models["mha_untied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", algo="awq", calibration_file=text))
    assert json.loads((tmp_path / "e" / "smolexport.json").read_text())["quant"]["algo"] == "awq"
