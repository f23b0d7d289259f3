"""--kv-cache int8: GroupQueryAttention's int8 cache with per-channel scales set from the calibration text."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from smolexport_runtime import load

from smolexport.onnx.decoder import DecoderBuilder, DecoderOptions, _calibrate
from smolexport.onnx.export import OnnxExportOptions, export_onnx
from smolexport.onnx.kv_cache import MARGIN, kv_cache_scales
from tests.conftest import graph_path
from tests.export.test_cli_errors import assert_one_line_error, run_cli
from tests.export.test_runtime_on_export import prefill_and_decode


def _rotate_half(k: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """HF's rotate-half RoPE of k [tokens, heads, D] with one angle per token and channel pair."""
    half = k.shape[-1] // 2
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    k1, k2 = k[..., :half], k[..., half:]
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)


def test_key_scales_bound_every_rotation_and_value_scales_the_largest_value():
    rng = np.random.default_rng(0)
    kv_heads, head_dim, hidden, tokens = 2, 8, 16, 50
    x = rng.normal(size=(tokens, hidden)).astype(np.float32)
    attn = {"k": rng.normal(size=(kv_heads * head_dim, hidden)), "v": rng.normal(size=(kv_heads * head_dim, hidden))}
    attn["k"][3] *= 20  # an outlier channel, as real keys have
    k_scale, v_scale = kv_cache_scales(x, attn, kv_heads)
    assert k_scale.shape == v_scale.shape == (1, kv_heads, 1, head_dim) and k_scale.dtype == np.float32
    k = (x @ attn["k"].T).reshape(tokens, kv_heads, head_dim)
    v = (x @ attn["v"].T).reshape(tokens, kv_heads, head_dim)
    k_bound, v_bound = k_scale[0, :, 0] * 127 / MARGIN, v_scale[0, :, 0] * 127 / MARGIN
    np.testing.assert_allclose(v_bound, np.abs(v).max(axis=0), rtol=1e-5)
    # Any position's rotation stays within the bound, and the bound is reached: it is the tightest such bound.
    for _ in range(20):
        rotated = _rotate_half(k, rng.uniform(0, 2 * np.pi, size=(tokens, head_dim // 2)))
        assert (np.abs(rotated) <= k_bound * (1 + 1e-5)).all()
    assert np.abs(k).max(axis=0).max() < k_bound.max()  # unrotated values alone would have been too tight
    pair = np.sqrt(k[..., :4] ** 2 + k[..., 4:] ** 2).max(axis=0)
    np.testing.assert_allclose(k_bound, np.concatenate([pair, pair], axis=-1), rtol=1e-5)


def test_awq_rescaled_values_get_their_own_scales(tiny_models):
    """awq folds o_proj's scales into v_proj's rows: the cache holds the rescaled values, so their scales must
    come from the rescaled weights (the largest cached value sits exactly at the scale's bound)."""
    from smolexport.llama_config import LlamaConfig
    from smolexport.onnx.calibration import Calibration
    from smolexport.onnx.decoder import _layer_weights

    folder, model = tiny_models["gqa_tied"]
    config = LlamaConfig.from_dict(model.config.to_dict())
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    options = DecoderOptions(weight_bits=4, algo="awq", kv_dtype="int8")
    builder = DecoderBuilder(None, config, options)
    calibration = Calibration(config, state["model.embed_tokens.weight"], list(range(3, 200)))
    attn, mlp, input_norm, post_norm = _layer_weights(state.get, 0)
    v_before = attn["v"].copy()
    found, input_norm, post_norm = _calibrate(builder, calibration, 0, attn, mlp, input_norm, post_norm)
    assert not np.allclose(attn["v"], v_before)  # awq did rescale v_proj
    x = found["qkv"].x  # the rescaled inputs, as the exported graph computes them
    v = (x @ attn["v"].T).reshape(len(x), config.num_key_value_heads, -1)
    v_scale = found["kv_scales"][1]
    np.testing.assert_allclose(np.abs(v).max(axis=0) / v_scale[0, :, 0], 127 / MARGIN, rtol=1e-4)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_int8_cache_export_runs_close_to_the_float_cache(tiny_models, tmp_path, quant):
    """The runtime allocates int8 buffers from the manifest and GroupQueryAttention writes them in place; the
    first layer's cached keys/values are the float cache's rounded to the graph's per-channel scales (so the
    layouts and the scales' channel order line up), and the logits stay close to the float cache's."""
    folder, _ = tiny_models["gqa_tied"]
    # The built-in text is all unknown words to the tiny word-level tokenizer: calibrate on its own words.
    words = np.random.default_rng(2).integers(3, 320, size=600)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(f"w{i}" for i in words))
    logits, caches = {}, {}
    for kv in ("fp32", "int8"):
        options = OnnxExportOptions(quant=quant, kv_cache=kv, calibration_file=calibration)
        export_onnx(str(folder), tmp_path / kv, options)
        decoder = load(tmp_path / kv).decoder
        assert decoder.kv_dtype == np.dtype("int8" if kv == "int8" else "float32")
        logits[kv], cache, n = prefill_and_decode(decoder)
        assert cache[0].data_type() == ("tensor(int8)" if kv == "int8" else "tensor(float)")
        caches[kv] = [c.numpy()[:, :, :n] for c in cache[:2]]
    manifest = json.loads((tmp_path / "int8" / "smolexport.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "int8" and manifest["quant"]["calibration"]["text"] == str(calibration)
    graph = onnx.load(graph_path(tmp_path / "int8"))
    inits = {t.name: t for t in graph.graph.initializer}
    for which, name in enumerate(("layers.0.attn.k_scale", "layers.0.attn.v_scale")):
        scale = numpy_helper.to_array(inits[name], base_dir=str(tmp_path / "int8"))
        dequantized = caches["int8"][which].astype(np.float32) * scale
        assert np.abs(caches["int8"][which]).max() > 20  # the scales use the int8 range
        # Tokens the calibration text never had may reach past its range: those saturate at the int8 limits.
        expected = np.clip(caches["fp32"][which], -127.5 * scale, 127.5 * scale)
        assert (np.abs(dequantized - expected) <= scale / 2 + 1e-5).all()
    if quant == "int4":  # the calibration text ran for the cache's scales only: the same rtn weights (no GPTQ)
        plain = onnx.load(graph_path(tmp_path / "fp32"))
        for tensor in plain.graph.initializer:
            ours = numpy_helper.to_array(inits[tensor.name], base_dir=str(tmp_path / "int8"))
            np.testing.assert_array_equal(ours, numpy_helper.to_array(tensor, base_dir=str(tmp_path / "fp32")))
    spread = np.abs(logits["fp32"]).max()
    assert spread > 1
    assert np.abs(logits["int8"] - logits["fp32"]).max() < 0.05 * spread  # measured: 1.1% (fp32), 2.7% (int4)
    assert (logits["int8"].argmax(-1) == logits["fp32"].argmax(-1)).mean() >= 0.75


def test_int8_cache_needs_the_fused_graph_and_float_activations(tiny_models, tmp_path):
    args = ["onnx", "--model", tiny_models["gqa_tied"][0], "--kv-cache", "int8", "-q"]
    assert_one_line_error(run_cli(*args, "--standard-ops", "-o", tmp_path / "a"), 2, "needs the fused graph")
    assert_one_line_error(run_cli(*args, "--quant", "fp16", "-o", tmp_path / "b"), 2, "fp16 exports cache in fp16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
