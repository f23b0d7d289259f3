import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from smolexport.errors import SmolexportError
from smolexport.llama_config import LlamaConfig
from smolexport.onnx.quantize import dequantize_blockwise, quantize_blockwise
from smolexport.onnx.rope import rope_tables

ROPE_CASES = {
    "default": {"rope_theta": 130000.0},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_tables_match_transformers(case):
    hf = HFLlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=512, **ROPE_CASES[case])
    cos, sin = rope_tables(LlamaConfig.from_dict(hf.to_dict()), 512)
    rotary = LlamaRotaryEmbedding(config=hf)
    positions = torch.arange(512)[None]
    ref_cos, ref_sin = rotary(torch.zeros(1, 512, 64), positions)
    # Angles reach 512 rad, where one float32 ulp is 6e-5: allow a couple of ulps of disagreement.
    np.testing.assert_allclose(cos, ref_cos[0, :, :32].numpy(), atol=1e-4)
    np.testing.assert_allclose(sin, ref_sin[0, :, :32].numpy(), atol=1e-4)


def test_rope_theta_read_from_transformers5_rope_parameters():
    config = LlamaConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 10,
            "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"},
        }
    )
    assert config.rope_theta == 130000.0


def test_other_architectures_are_refused_with_a_clear_message():
    with pytest.raises(SmolexportError, match="unsupported architecture MistralForCausalLM"):
        LlamaConfig.from_dict({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: a partial last block
def test_blockwise_quantization_error_is_within_half_a_step(bits, k):
    w = np.random.default_rng(0).standard_normal((24, k)).astype(np.float32)
    q = quantize_blockwise(w, bits, 32)
    assert q.data.shape == (24, 3 if k == 80 else 2, 32 * bits // 8)
    deq = dequantize_blockwise(q)
    assert deq.shape == w.shape
    step = np.repeat(q.scales, 32, axis=1)[:, :k]
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)


def test_mse_search_never_loses_to_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8  # a few outliers, as real weights have
    importance = rng.random(128).astype(np.float32)
    for weights in (None, importance):
        per_block = []
        for algo in ("rtn", "mse"):
            deq = dequantize_blockwise(quantize_blockwise(w, 4, 32, algo=algo, importance=weights))
            err = (deq - w) ** 2 * (1 if weights is None else weights)
            per_block.append(err.reshape(64, 4, 32).sum(axis=2))
        assert np.all(per_block[1] <= per_block[0] + 1e-6)
        assert per_block[1].sum() < per_block[0].sum()


def test_prequantized_checkpoints_are_refused_but_gguf_is_not():
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 128, "vocab_size": 10}  # fmt: skip
    with pytest.raises(SmolexportError, match="already quantized"):
        LlamaConfig.from_dict({**base, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    # transformers dequantizes GGUF files on load and leaves this marker in the config
    LlamaConfig.from_dict({**base, "quantization_config": {"quant_method": "QuantizationMethod.GGUF"}})


def test_log8_scales_decode_to_the_scales_used_and_cost_little():
    """log8 codes and row scales give back exactly the (fp16-rounded) scales the weights were rounded with, in
    half the bytes of fp16 scales at blocks of 16, for about the same error (the search picks representable
    scales); GPTQ's log8 scales decode the same way."""
    from smolexport.onnx.gptq import gptq_quantize
    from smolexport.onnx.quantize import LOG8_TABLE

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 392)).astype(np.float32)  # K=392: a partial last block
    w[:, :3] *= 10
    x = rng.standard_normal((600, 392)).astype(np.float32)
    variants = {
        algo: (
            quantize_blockwise(w, 4, 16, np.float16, algo=algo),
            quantize_blockwise(w, 4, 16, np.float16, algo=algo, log8_scales=True),
        )
        for algo in ("rtn", "mse")
    }
    h = x.astype(np.float64).T @ x / len(x)
    variants["gptq"] = (gptq_quantize(w, h, 4, 16, np.float16), gptq_quantize(w, h, 4, 16, np.float16, True))
    for algo, (fp16, log8) in variants.items():
        decoded = (log8.row_scales * LOG8_TABLE[log8.scale_codes]).astype(np.float16)
        np.testing.assert_array_equal(decoded, log8.scales)
        scale_bytes = log8.scale_codes.nbytes + log8.row_scales.nbytes
        assert scale_bytes < 0.6 * fp16.scales.astype(np.float16).nbytes, algo
        error = {name: np.square(dequantize_blockwise(qw) - w).mean() for name, qw in (("fp16", fp16), ("log8", log8))}
        assert error["log8"] < 1.05 * error["fp16"], (algo, error)


@pytest.mark.parametrize("log8", [False, True])
def test_coarse_to_fine_clipping_search_is_close_to_the_exhaustive_one(monkeypatch, log8):
    """The export's clipping search scores a third of the candidates; per matrix it stays within half a percent
    of the exhaustive search's weighted error, and never worse than plain rounding in any block."""
    from smolexport.onnx import quantize

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 576)) * np.exp(0.5 * rng.standard_normal((1, 576)))).astype(np.float32)
    importance = np.exp(rng.standard_normal(576)).astype(np.float32)

    def weighted_error(algo: str) -> np.ndarray:
        q = quantize_blockwise(w, 4, 32, np.float16, algo=algo, importance=importance, log8_scales=log8)
        return (((dequantize_blockwise(q) - w) ** 2) * importance).reshape(256, 18, 32).sum(axis=2)

    coarse, rtn = weighted_error("mse"), weighted_error("rtn")
    monkeypatch.setattr(quantize, "COARSE_STRIDE", 100)  # every candidate
    exhaustive = weighted_error("mse")
    assert exhaustive.sum() <= coarse.sum() <= 1.005 * exhaustive.sum()
    assert np.all(coarse <= rtn + 1e-6) and coarse.sum() < 0.97 * rtn.sum()
