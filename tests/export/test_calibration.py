"""The layer-by-layer numpy forward used for calibration follows transformers' hidden states."""

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
            power = calibration.layer(*_layer_weights(state.get, i))
            if i < model.config.num_hidden_layers - 1:  # the last entry of hidden_states is after the final norm
                np.testing.assert_allclose(calibration.hidden, hidden[i + 1][0].numpy(), atol=1e-4, rtol=1e-4)
            assert set(power) == {"qkv", "o", "gate_up", "down"}
            down = power["down"].power
            assert down.shape == (model.config.intermediate_size,) and np.all(down >= 0)
            np.testing.assert_allclose(np.diag(power["down"].hessian()), down, rtol=1e-4)


def test_act_mse_export_records_its_calibration(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", algo="act-mse", calibration_file=text))
    quant = json.loads((tmp_path / "e" / "smolexport.json").read_text())["quant"]
    assert quant["algo"] == "act-mse" and quant["calibration"]["text"] == str(text)
