"""A block size of their own for the feed-forward matrices (`--ffn-block-size`): the graph's MatMulNBits nodes
carry it, the exported graph computes with exactly the weights quantized at it, the awq/clipping searches see
it, and the manifest records it."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from smolexport.errors import UsageError
from smolexport.llama_config import LlamaConfig
from smolexport.onnx.awq import Storage
from smolexport.onnx.decoder import DecoderBuilder, DecoderOptions
from smolexport.onnx.export import OnnxExportOptions, export_onnx
from smolexport.onnx.mixed import is_ffn
from smolexport.onnx.quantize import dequantize_blockwise, quantize_blockwise
from tests.conftest import empty_cache, graph_path, make_tiny_llama
from tests.export.test_decoder_numerics import prompt_batch, run_onnx, torch_logits

FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_sizes(folder) -> dict[str, tuple[int, int]]:
    """{MatMulNBits node name: (bits, block_size)} of an export's graph."""
    nodes = onnx.load(str(graph_path(folder)), load_external_data=False).graph.node
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"}
    return {name: (a["bits"], a["block_size"]) for name, a in attrs.items()}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny GQA model wide enough (hidden 128, FFN 256) for blocks of 32, 64 and 128 without padding."""
    folder = tmp_path_factory.mktemp("wide") / "m"
    return folder, make_tiny_llama(folder, heads=4, kv_heads=2, hidden=128)


def test_ffn_matrices_are_named_in_graph_and_checkpoint_style():
    for name in ("layers.3.mlp.gate_up_proj", "layers.3.mlp.down_proj", "layers.3.gate_proj", "layers.0.up_proj"):
        assert is_ffn(name)
    for name in ("layers.3.attn.qkv_proj", "layers.3.attn.o_proj", "layers.3.v_proj", "embed_tokens", "lm_head"):
        assert not is_ffn(name)


def test_storage_of_each_matrix():
    config = LlamaConfig.from_dict({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                                    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 320})  # fmt: skip
    options = DecoderOptions(weight_bits=4, block_size=32, ffn_block_size=128, int8_layers=("layers.-1.*",))
    b = DecoderBuilder(None, config, options)
    assert b._stored_as("layers.1.mlp.gate_up_proj", 4, 128) == (4, 128)
    assert b._stored_as("layers.1.mlp.down_proj", 4, 256) == (4, 128)
    assert b._stored_as("layers.1.attn.qkv_proj", 4, 128) == (4, 32)
    assert b._stored_as("layers.3.mlp.down_proj", 4, 256) == (8, 64)  # 8-bit matrices keep their wide blocks
    assert b._stored_as("embed_tokens", 4, 128) == (4, 32)
    assert "blocks of 32 (FFN 128)" in options.describe()
    # int8 exports: the feed-forward block size applies at 8 bits too
    int8 = DecoderBuilder(None, config, DecoderOptions(weight_bits=8, block_size=32, ffn_block_size=64))
    assert int8._stored_as("layers.0.mlp.down_proj", 8, 256) == (8, 64)


@pytest.mark.parametrize("graph", ["fused", "standard"])
@pytest.mark.parametrize("ffn", [64, 128])
def test_export_computes_with_the_ffn_blocks(wide_model, tmp_path, graph, ffn):
    folder, model = wide_model
    options = OnnxExportOptions(quant="int4", preset="rtn", ffn_block_size=ffn, fused=graph == "fused",
                                accuracy_level=0)  # fmt: skip
    manifest = export_onnx(str(folder), tmp_path / "e", options)
    assert manifest["quant"]["block_size"] == 32 and manifest["quant"]["ffn_block_size"] == ffn
    assert manifest["quant"]["recipe"].startswith(f"int4 rtn, blocks of 32 (FFN {ffn}), fp16 scales")
    sizes = block_sizes(tmp_path / "e")
    for name, (bits, block) in sizes.items():
        assert bits == 4
        assert block == (ffn if ".mlp." in name else 32), name
    assert sum(".mlp." in name for name in sizes) == (4 if graph == "fused" else 6)

    # The reference: every linear weight round-to-nearest with fp16 scales at the block size it is stored in.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                block = ffn if name.endswith(FFN) else 32
                qw = quantize_blockwise(module.weight.numpy(), 4, block, np.float16)
                module.weight.copy_(torch.from_numpy(dequantize_blockwise(qw)))
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=graph == "standard")
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty_cache(manifest, 2)}
    out = run_onnx(tmp_path / "e", manifest, feed)["logits"]
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], torch_logits(reference, ids, mask, positions)[real], atol=1e-3, rtol=0)
    # and not with blocks of 32 everywhere: the attribute is what the kernel reads
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, torch.nn.Linear):
                qw = quantize_blockwise(module.weight.numpy(), 4, 32, np.float16)
                module.weight.copy_(torch.from_numpy(dequantize_blockwise(qw)))
    assert np.abs(out[real] - torch_logits(plain, ids, mask, positions)[real]).max() > 1e-2


def test_awq_searches_and_stores_at_the_ffn_block_size(wide_model, tmp_path, monkeypatch):
    """The recommended recipe with wider FFN blocks: the awq search scores the feed-forward matrices at the
    block size they are stored in (and the int8 input rounding per block of it), and the graph has it."""
    import smolexport.onnx.awq as awq

    seen: dict[int, set] = {}
    original = awq.search_scales

    def spy(x, parts, *args, **kwargs):
        for weight, storage in parts:
            assert isinstance(storage, Storage)
            seen.setdefault(weight.shape[1], set()).add((storage.bits, storage.block_size, storage.int8_inputs))
        return original(x, parts, *args, **kwargs)

    monkeypatch.setattr(awq, "search_scales", spy)
    folder, model = wide_model
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    options = OnnxExportOptions(quant="int4", int8_layers="*.v_proj", int8_vocab=0, ffn_block_size=128,
                                calibration_file=text)  # fmt: skip
    manifest = export_onnx(str(folder), tmp_path / "e", options)
    quant = manifest["quant"]
    assert quant["preset"] == "recommended" and quant["algo"] == "awq" and quant["scales"] == "log8"
    assert quant["ffn_block_size"] == 128
    # gate/up read 128 inputs, down 256: both searched at blocks of 128; q/k/o at 32 and v at 8 bits in 64
    assert (4, 128, True) in seen[256] and (4, 32, True) not in seen[256]
    assert {(4, 32, True), (8, 64, True), (4, 128, True)} <= seen[128]
    sizes = block_sizes(tmp_path / "e")
    assert sizes["layers.0.mlp.gate_up_proj"] == (4, 128) and sizes["layers.1.mlp.down_proj"] == (4, 128)
    assert sizes["layers.0.attn.o_proj"] == (4, 32) and sizes["layers.0.attn.v_proj"] == (8, 64)
    # the export runs and stays near the float model (int4 at accuracy level 4: loose)
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=False)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty_cache(manifest, 2)}
    out = run_onnx(tmp_path / "e", manifest, feed)["logits"]
    expected = torch_logits(model, ids, mask, positions)
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.9


def test_bad_ffn_block_size_is_a_usage_error(wide_model, tmp_path):
    folder, _ = wide_model
    with pytest.raises(UsageError, match="FFN block size must be 16, 32, 64, 128 or 256, got 48"):
        export_onnx(str(folder), tmp_path / "x", OnnxExportOptions(quant="int4", preset="rtn", ffn_block_size=48))
    manifest = export_onnx(str(folder), tmp_path / "f", OnnxExportOptions(quant="fp32"))
    assert manifest["quant"]["ffn_block_size"] is None and manifest["quant"]["block_size"] is None
