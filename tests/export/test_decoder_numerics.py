"""Exported graphs run in ONNX Runtime and compared with transformers' LlamaForCausalLM."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from smolexport.errors import UsageError
from smolexport.onnx.export import OnnxExportOptions, export_onnx
from smolexport.onnx.quantize import dequantize_blockwise, quantize_blockwise
from tests.conftest import empty_cache, graph_path


def run_onnx(folder, manifest, feed):
    session = ort.InferenceSession(str(graph_path(folder)), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def prompt_batch(vocab: int, padded: bool, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, 9))
    mask = np.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # the second row is a shorter prompt, left-padded
    positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
    return ids, mask, positions


def torch_logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


def quantized_copy(model, bits: int, block: int, lm_head_bits: int | None = None, algo: str = "rtn", log8=False):
    """The torch model with every linear weight replaced by what the int kernels compute with (fp16 or log8
    scales, as the exporter stores them)."""
    q = copy.deepcopy(model)

    def dequantized(weight, b):
        qw = quantize_blockwise(weight.numpy(), b, block, np.float16, algo=algo, log8_scales=log8)
        return torch.from_numpy(dequantize_blockwise(qw))

    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantized(module.weight, (lm_head_bits or bits) if name == "lm_head" else bits))
        if not q.config.tie_word_embeddings:  # untied embedding is quantized on its own
            q.model.embed_tokens.weight.copy_(dequantized(q.model.embed_tokens.weight, bits))
    return q


@pytest.mark.parametrize("graph", ["fused", "standard"])
@pytest.mark.parametrize("which", ["gqa_tied", "mha_untied"])
@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8", "int4", "int4 kv-fp16"])
def test_prefill_and_cached_decode_match_pytorch(tiny_models, tmp_path, which, quant, graph):
    folder, model = tiny_models[which]
    out = tmp_path / "export"
    quant, _, kv = quant.partition(" kv-")  # "int4 kv-fp16": int4 weights, fp32 activations, an fp16 cache
    if kv and graph == "standard":  # an fp16 cache under fp32 activations is a fused-graph option
        with pytest.raises(UsageError, match="needs the fused graph"):
            export_onnx(str(folder), out, OnnxExportOptions(quant=quant, preset="rtn", fused=False, kv_cache=kv))
        assert not out.exists()
        return
    # accuracy_level 0: the kernels compute with exactly the dequantized weights (4 is checked below)
    options = OnnxExportOptions(
        quant=quant, preset="rtn", block_size=32, fused=graph == "fused", accuracy_level=0, kv_cache=kv or None
    )
    manifest = export_onnx(str(folder), out, options)
    assert manifest["kv_cache"]["dtype"] == ("float16" if "fp16" in (quant, kv) else "float32")
    reference = model if quant in ("fp32", "fp16") else quantized_copy(model, {"int8": 8, "int4": 4}[quant], 32)
    tolerance = {"fp32": 1e-4, "fp16": 5e-2, "int8": 1e-3, "int4": 5e-2 if kv else 1e-3}[quant]
    vocab = model.config.vocab_size

    # The standard graph handles left-padded batches; the fused one needs unpadded rows (see fused.py).
    ids, mask, positions = prompt_batch(vocab, padded=graph == "standard")
    outputs = run_onnx(
        out, manifest, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty_cache(manifest, 2)}
    )
    expected = torch_logits(reference, ids, mask, positions)
    real = mask.astype(bool)  # padded positions produce unused logits
    np.testing.assert_allclose(outputs["logits"][real], expected[real], atol=tolerance, rtol=0)
    assert outputs["present.0.key"].shape == (2, model.config.num_key_value_heads, 9, 16)
    prefill = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty_cache(manifest, 2)}
    last = run_onnx(out, manifest, {**prefill, "logits_to_keep": np.array([1])})["logits"]
    assert last.shape == (2, 1, vocab)  # what the runtime asks for in prefill
    np.testing.assert_allclose(last[:, 0], outputs["logits"][:, -1], atol=1e-5, rtol=0)

    # Three decode steps through the cache equal one uncached pass over the whole sequence.
    cache = {k.replace("present", "past_key_values"): v for k, v in outputs.items() if k.startswith("present")}
    all_ids, all_mask, all_pos = ids, mask, positions
    for step in range(3):
        token = np.array([[5 + step], [7 + step]])
        all_ids = np.concatenate([all_ids, token], axis=1)
        all_mask = np.concatenate([all_mask, np.ones((2, 1), np.int64)], axis=1)
        all_pos = np.concatenate([all_pos, all_pos[:, -1:] + 1], axis=1)
        step_out = run_onnx(
            out,
            manifest,
            {
                "input_ids": token,
                "attention_mask": all_mask,
                "position_ids": all_pos[:, -1:],
                **cache,
                "logits_to_keep": np.array([1]),
            },
        )
        assert step_out["logits"].shape == (2, 1, vocab)
        cache = {k.replace("present", "past_key_values"): v for k, v in step_out.items() if k.startswith("present")}
        uncached = run_onnx(
            out,
            manifest,
            {"input_ids": all_ids, "attention_mask": all_mask, "position_ids": all_pos, **empty_cache(manifest, 2)},
        )
        np.testing.assert_allclose(step_out["logits"][:, 0], uncached["logits"][:, -1], atol=tolerance, rtol=0)
        np.testing.assert_allclose(
            step_out["logits"][:, 0], torch_logits(reference, all_ids, all_mask, all_pos)[:, -1], atol=tolerance, rtol=0
        )


def test_tied_weight_is_stored_once(tiny_models, tmp_path):
    import onnx

    folder, model = tiny_models["gqa_tied"]
    for quant in ("fp32", "int4"):
        export_onnx(str(folder), tmp_path / quant, OnnxExportOptions(quant=quant, preset="rtn"))
        graph = onnx.load(str(graph_path(tmp_path / quant)), load_external_data=False).graph
        vocab_sized = [t.name for t in graph.initializer if t.dims and t.dims[0] == model.config.vocab_size]
        # fp32: one [V, H] table; int4: its packed data, scales and zero points, read by the lm_head's MatMulNBits
        # and by the lookup alike (no unpacked zero-point copy)
        expected = (
            ["embed_tokens.weight"]
            if quant == "fp32"
            else [f"embed_tokens.{k}" for k in ("qweight", "scales", "zero_points")]
        )
        assert sorted(vocab_sized) == expected


def test_int4_lookup_of_a_padded_block_matches_pytorch(tiny_models, tmp_path):
    """Blocks of 128 over hidden 64: one padded block per row and one zero point in a byte, which the lookup
    unpacks and trims as MatMulNBits does."""
    folder, model = tiny_models["mha_untied"]  # untied: the lookup's table is not also the lm_head
    manifest = export_onnx(
        str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", preset="rtn", block_size=128, accuracy_level=0)
    )
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=False)
    out = run_onnx(tmp_path / "e", manifest, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              **empty_cache(manifest, 2)})  # fmt: skip
    expected = torch_logits(quantized_copy(model, 4, 128), ids, mask, positions)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-3, rtol=0)


def test_mse_algo_export_computes_with_its_own_grid(tiny_models, tmp_path):
    folder, model = tiny_models["gqa_tied"]
    export_onnx(
        str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", preset="rtn", algo="mse", accuracy_level=0)
    )
    manifest = json.loads((tmp_path / "e" / "smolexport.json").read_text())
    assert manifest["quant"]["algo"] == "mse"
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=False)
    out = run_onnx(tmp_path / "e", manifest, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              **empty_cache(manifest, 2)})  # fmt: skip
    expected = torch_logits(quantized_copy(model, 4, 32, algo="mse"), ids, mask, positions)
    np.testing.assert_allclose(out["logits"], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("graph", ["fused", "standard"])
@pytest.mark.parametrize("which", ["gqa_tied", "mha_untied"])
def test_log8_scales_export_computes_with_its_decoded_scales(tiny_models, tmp_path, which, graph):
    """Blocks of 16 with 8-bit log-coded scales: the graph decodes the codes into exactly the scales the
    quantizer rounded with, and stores no fp16 block scales."""
    folder, model = tiny_models[which]
    options = OnnxExportOptions(quant="int4", preset="rtn", algo="mse", block_size=16, scales="log8", accuracy_level=0,
                                fused=graph == "fused")  # fmt: skip
    manifest = export_onnx(str(folder), tmp_path / "e", options)
    assert manifest["quant"]["scales"] == "log8" and manifest["quant"]["block_size"] == 16
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=graph == "standard")
    out = run_onnx(tmp_path / "e", manifest, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              **empty_cache(manifest, 2)})  # fmt: skip
    expected = torch_logits(quantized_copy(model, 4, 16, algo="mse", log8=True), ids, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(out["logits"][real], expected[real], atol=1e-3, rtol=0)
    graph_proto = onnx.load(str(graph_path(tmp_path / "e")), load_external_data=False).graph
    names = {t.name: t.data_type for t in graph_proto.initializer}
    assert not [n for n in names if n.endswith(".scales")]
    assert names["embed_tokens.scale_codes"] == onnx.TensorProto.UINT8


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_accuracy_level_4_stays_close_to_exact_weights(tiny_models, tmp_path, quant):
    """The default accuracy_level 4 quantizes activations to int8 inside MatMulNBits: close to, not equal to,
    the exact computation with the dequantized weights."""
    folder, model = tiny_models["gqa_tied"]
    manifest = export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant=quant, preset="rtn"))
    assert manifest["quant"]["accuracy_level"] == 4
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=False)
    out = run_onnx(tmp_path / "e", manifest, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                              **empty_cache(manifest, 2)})  # fmt: skip
    expected = torch_logits(quantized_copy(model, {"int8": 8, "int4": 4}[quant], 32), ids, mask, positions)
    diff = np.abs(out["logits"] - expected)
    assert 1e-4 < diff.max() < 0.05 * np.abs(expected).max()  # int8 activations: not exact, but close
    assert (out["logits"].argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_log8_scale_decoding_is_folded_when_onnx_runtime_loads_the_model(tiny_models, tmp_path):
    """The scale-decoding ops read only initializers: ONNX Runtime must fold them into constants at load (so
    no per-token work, and MatMulNBits prepacks constant scales), leaving no Gather/Mul on the scale codes."""
    folder, _ = tiny_models["gqa_tied"]
    export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(quant="int4", block_size=16, scales="log8"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph_path(tmp_path / "e")), options, providers=["CPUExecutionProvider"])
    built = onnx.load(str(graph_path(tmp_path / "e")), load_external_data=False).graph.node
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node
    assert any(n.name.endswith(".scales/decode") for n in built)
    assert not [n.name for n in optimized if ".scales/" in n.name]
    assert any(n.op_type == "MatMulNBits" for n in optimized)
