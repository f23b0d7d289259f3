"""At MatMulNBits accuracy_level 4, ONNX Runtime's CPU kernels round the input to int8 per block: awq.py models
that rounding, and its search then moves activation outliers into the weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from smolexport.onnx.awq import Storage, _output_error, int8_round_blocks, search_scales
from smolexport.onnx.quantize import dequantize_blockwise, quantize_blockwise


def run_matmul_nbits(x: np.ndarray, weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime's x @ Q(W)^T at accuracy_level 4 on CPU, the dequantized Q(W))."""
    qw = quantize_blockwise(weight, bits, block_size, np.float16)
    n, k = weight.shape
    node = helper.make_node(
        "MatMulNBits", ["x", "w", "scales", "zero_points"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block_size, accuracy_level=4,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [
            helper.make_tensor("w", TensorProto.UINT8, qw.data.shape, qw.data.tobytes(), raw=True),
            helper.make_tensor("scales", TensorProto.FLOAT, [qw.scales.size], qw.scales.astype(np.float32).ravel()),
            helper.make_tensor("zero_points", TensorProto.UINT8, [qw.zero_points.size], qw.zero_points.tobytes(), True),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], dequantize_blockwise(qw)


def inputs_with_outliers(rng, tokens: int, k: int) -> np.ndarray:
    x = rng.normal(size=(tokens, k)).astype(np.float32)
    x[:, [3, 40, 77]] *= 40.0  # a few channels far larger than the rest, as in real LLM activations
    return x


@pytest.mark.parametrize(("bits", "block_size"), [(8, 32), (8, 128), (4, 16), (4, 32)])
def test_int8_input_rounding_is_what_the_cpu_kernel_computes(bits, block_size):
    rng = np.random.default_rng(0)
    x, weight = inputs_with_outliers(rng, 16, 256), rng.normal(size=(48, 256)).astype(np.float32)
    y, dequantized = run_matmul_nbits(x, weight, bits, block_size)
    exact = x @ dequantized.T
    if np.allclose(y, exact, rtol=1e-4, atol=1e-3):
        pytest.skip("this CPU's MatMulNBits computes in float at accuracy_level 4 (no int8 kernel)")
    modelled = int8_round_blocks(x, block_size) @ dequantized.T
    # the model accounts for (almost) all of the kernel's departure from the float product
    assert np.abs(y - modelled).max() < 0.05 * np.abs(y - exact).max()


def test_awq_search_that_models_int8_inputs_lowers_the_kernels_error():
    """8-bit weights, activation outliers: the search that models int8 inputs finds scales under which ONNX
    Runtime's own product is closer to the float layer than under the scales of the search that ignores them."""
    rng = np.random.default_rng(1)
    x, weight = inputs_with_outliers(rng, 512, 256), rng.normal(size=(64, 256)).astype(np.float32)
    aware, blind = Storage(8, 32, int8_inputs=True), Storage(8, 32)
    s_aware = search_scales(x, [(weight, aware)])
    s_blind = search_scales(x, [(weight, blind)])
    reference = x @ weight.T
    errors = {}
    for label, s in (("none", np.ones(256, np.float32)), ("blind", s_blind), ("aware", s_aware)):
        y, _ = run_matmul_nbits(np.ascontiguousarray(x / s), weight * s, 8, 32)
        errors[label] = float(np.square(y - reference).sum())
        if label == "none" and np.allclose(y, x @ dequantize_blockwise(quantize_blockwise(weight, 8, 32, np.float16)).T,
                                           rtol=1e-4, atol=1e-3):  # fmt: skip
            pytest.skip("this CPU's MatMulNBits computes in float at accuracy_level 4 (no int8 kernel)")
    # measured: none 28,000, blind 2,159, aware 1,537 (scaling the outlier channels' weights up helps the
    # weights' rounding too, so the blind search already shrinks the outliers; modelling the inputs does better)
    assert errors["aware"] < 0.1 * errors["none"]
    assert errors["aware"] < 0.8 * errors["blind"]
    # and the model's own score agrees with the kernel's ranking
    assert _output_error(x, [(weight, aware)], s_aware) < _output_error(x, [(weight, aware)], s_blind)


def test_awq_scores_each_matrix_as_the_export_stores_it(tiny_models, monkeypatch):
    """An 8-bit v_proj in an int4 export is scored at 8 bits in its wide block, the rest at 4 bits in the
    export's blocks; int8 inputs only at accuracy level 4."""
    import smolexport.onnx.awq as awq
    from smolexport.llama_config import LlamaConfig
    from smolexport.onnx.decoder import DecoderBuilder, DecoderOptions, _layer_weights

    _, model = tiny_models["gqa_tied"]
    c = LlamaConfig.from_dict(model.config.to_dict())
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    seen = {}
    monkeypatch.setattr(awq, "scale_layer", lambda *args: seen.setdefault("storage", args[-1]) and args[2:4])
    for level in (4, 0):
        options = DecoderOptions(
            weight_bits=4, block_size=16, int8_layers=("*.v_proj",), algo="awq", accuracy_level=level
        )
        attn, mlp, input_norm, post_norm = _layer_weights(state.get, 1)
        DecoderBuilder(None, c, options).awq_scale(1, attn, mlp, input_norm, post_norm, {})
        storage = seen.pop("storage")
        assert storage("v") == Storage(8, 64, int8_inputs=level == 4)  # hidden 64: the widest int8 block dividing it
        assert storage("q") == storage("down") == Storage(4, 16, int8_inputs=level == 4)


def test_coarse_to_fine_alpha_search_is_as_good_as_the_full_grid(monkeypatch):
    """awq scores 10 of the 21 alphas (every fourth, then +-2 and +-1 around the best): on inputs with outlier
    channels its choice's modelled error stays within 1% of the full grid's (measured: the same alpha for 8 bits
    and for 4 bits without int8 inputs, 0.2% more error for 4 bits with them), far below no scaling's."""
    import smolexport.onnx.awq as awq

    rng = np.random.default_rng(2)
    x = inputs_with_outliers(rng, 256, 256)
    for storage in (Storage(4, 32, int8_inputs=True), Storage(8, 64, int8_inputs=True), Storage(4, 32)):
        weight = rng.normal(size=(96, 256)).astype(np.float32)
        coarse = search_scales(x, [(weight, storage)])
        monkeypatch.setattr(awq, "COARSE_STRIDE", 1)
        full = search_scales(x, [(weight, storage)])
        monkeypatch.setattr(awq, "COARSE_STRIDE", 4)
        errors = [_output_error(x, [(weight, storage)], s) for s in (coarse, full, np.ones(256, np.float32))]
        assert errors[1] <= errors[0] <= 1.01 * errors[1]
        assert errors[0] < 0.3 * errors[2]
