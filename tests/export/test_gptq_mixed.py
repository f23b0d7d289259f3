"""GPTQ rounding and mixed int4/int8 precision: the exported graph computes with exactly the weights the
library produced, GPTQ lowers the output error it minimizes, and the manifest records what was done."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from smolexport.errors import UsageError
from smolexport.llama_config import LlamaConfig
from smolexport.onnx.calibration import Calibration, load_calibration_ids
from smolexport.onnx.decoder import _layer_weights
from smolexport.onnx.export import OnnxExportOptions, export_onnx
from smolexport.onnx.gptq import gptq_quantize
from smolexport.onnx.mixed import matrix_parts, parse_patterns, wants_int8
from smolexport.onnx.quantize import dequantize_blockwise, quantize_blockwise
from tests.conftest import empty_cache, graph_path
from tests.export.test_decoder_numerics import prompt_batch, run_onnx, torch_logits

PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def test_gptq_beats_activation_weighted_search_on_output_error():
    rng = np.random.default_rng(0)
    k = 128
    x = rng.standard_normal((400, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, :4] *= 8  # a few large channels, as real activations have
    x = x.astype(np.float32)
    w = rng.standard_normal((48, 80)).astype(np.float32)  # K=80: a partial last block
    x = x[:, :80]
    h = x.astype(np.float64).T @ x / len(x)

    def output_error(q):
        deq = dequantize_blockwise(q)
        assert deq.shape == w.shape
        return float(((x @ (w - deq).T) ** 2).mean())

    gptq = gptq_quantize(w, h, 4, 32)
    act_mse = quantize_blockwise(w, 4, 32, algo="mse", importance=(x * x).mean(axis=0))
    assert gptq.data.shape == act_mse.data.shape and gptq.zero_points.shape == act_mse.zero_points.shape
    assert output_error(gptq) < 0.7 * output_error(act_mse)
    # 8 bits in blocks of 128 stays close to the float weights
    assert output_error(gptq_quantize(w, h, 8, 128)) < 0.01 * output_error(gptq)


def test_int8_patterns_name_matrices_as_the_checkpoint_does():
    assert matrix_parts("layers.3.attn.qkv_proj") == ["layers.3.q_proj", "layers.3.k_proj", "layers.3.v_proj"]
    assert wants_int8(("*.v_proj",), "layers.3.attn.qkv_proj")  # a packed matrix: any part decides
    assert wants_int8(("layers.1.*",), "layers.1.mlp.down_proj") and not wants_int8(("layers.1.*",), "embed_tokens")
    # negative layer numbers count from the end of the model
    assert wants_int8(("layers.-1.*",), "layers.29.mlp.down_proj", num_layers=30)
    assert not wants_int8(("layers.-1.*",), "layers.29.mlp.down_proj", num_layers=31)
    assert wants_int8(("layers.-2.*",), "layers.22.attn.qkv_proj", num_layers=24)
    assert not wants_int8(("layers.*1.*",), "layers.29.mlp.down_proj", num_layers=30)  # no alias without a "-"
    assert parse_patterns("layers.-2.*") == ("layers.-2.*",)
    assert parse_patterns(" embed_tokens, *.down_proj ") == ("embed_tokens", "*.down_proj")
    with pytest.raises(UsageError, match="matches no weight matrix"):
        parse_patterns("layers.0.mlp.down_proj")  # graph-style names are not accepted: a typo would do nothing


def reference_model(model, calibration_ids, int8, embed_bits: int, int8_vocab: int = 0):
    """The torch model with what the export computes with: GPTQ int4 weights, 8 bits (the widest block of
    64/32 dividing the input width) where int8(layer, key) is true, and for the embedding/lm_head when
    embed_bits is 8, or for their first `int8_vocab` rows."""
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config = LlamaConfig.from_dict(model.config.to_dict())
    calibration = Calibration(config, state["model.embed_tokens.weight"], calibration_ids)
    q = copy.deepcopy(model)
    params = dict(q.named_parameters())
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            inputs = calibration.layer(*_layer_weights(state.get, i))
            for key, path in PATHS.items():
                weight = state[f"model.layers.{i}.{path}.weight"]
                bits, block = (8, 64 if weight.shape[1] % 64 == 0 else 32) if int8(i, key) else (4, 32)
                deq = dequantize_blockwise(gptq_quantize(weight, inputs[ROLES[key]].hessian(), bits, block, np.float16))
                params[f"model.layers.{i}.{path}.weight"].copy_(torch.from_numpy(deq))
        # The lm_head (the tied embedding, or the untied lm_head) is GPTQ-quantized on the final-normed hidden
        # states; an untied embedding, only gathered, has no calibration input: plain mse search.
        block = 64 if embed_bits == 8 else 32  # hidden 64
        final_hessian = calibration.final(state["model.norm.weight"]).hessian()
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name not in params:
                continue

            def quantized(rows, bits, block, name=name):
                if name == "lm_head.weight" or config.tie_word_embeddings:
                    return dequantize_blockwise(gptq_quantize(rows, final_hessian, bits, block, np.float16))
                return dequantize_blockwise(quantize_blockwise(rows, bits, block, np.float16, algo="mse"))

            weight = state[name]
            deq = quantized(weight[int8_vocab:], embed_bits, block)
            if int8_vocab:
                deq = np.concatenate([quantized(weight[:int8_vocab], 8, 64), deq])
            params[name].copy_(torch.from_numpy(deq))
    return q


def export_and_compare(folder, model, tmp_path, graph, patterns, int8, int8_vocab=0):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 300 + 3}" for i in range(300)))
    options = OnnxExportOptions(
        quant="int4", preset="rtn", algo="gptq", int8_layers=patterns, calibration_file=text, fused=graph == "fused",
        accuracy_level=0, int8_vocab=int8_vocab,
    )  # fmt: skip
    manifest = export_onnx(str(folder), tmp_path / "e", options)
    ids, mask, positions = prompt_batch(model.config.vocab_size, padded=graph == "standard")
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **empty_cache(manifest, 2)}
    embed_bits = 4 if int8_vocab else 8
    reference = reference_model(
        model, load_calibration_ids(folder / "tokenizer.json", text), int8, embed_bits, int8_vocab
    )
    real = mask.astype(bool)
    out = run_onnx(tmp_path / "e", manifest, feed)["logits"]
    np.testing.assert_allclose(out[real], torch_logits(reference, ids, mask, positions)[real], atol=1e-3, rtol=0)
    return manifest


@pytest.mark.parametrize("graph", ["fused", "standard"])
def test_v_proj_alone_at_8_bits_unpacks_the_fused_qkv(tiny_models, tmp_path, graph):
    folder, model = tiny_models["gqa_tied"]
    manifest = export_and_compare(folder, model, tmp_path, graph, "*.v_proj,embed_tokens", lambda i, key: key == "v")
    assert set(manifest["quant"]["int8_matrices"]) == {"embed_tokens", "layers.0.attn.v_proj", "layers.1.attn.v_proj"}


@pytest.mark.parametrize("graph", ["fused", "standard"])
@pytest.mark.parametrize("which", ["gqa_tied", "mha_untied"])
def test_gptq_mixed_precision_export_matches_its_dequantized_weights(tiny_models, tmp_path, which, graph):
    folder, model = tiny_models[which]
    patterns = "layers.1.*,embed_tokens,lm_head"
    manifest = export_and_compare(folder, model, tmp_path, graph, patterns, lambda i, key: i == 1)

    quant = manifest["quant"]
    assert quant["algo"] == "gptq" and quant["int8_layers"] == patterns.split(",")
    assert quant["calibration"]["text"].endswith("calib.txt")
    assert quant["int8_matrices"]["embed_tokens"] == 64 and quant["int8_matrices"]["layers.1.mlp.down_proj"] == 64
    expected = {"layers.1.attn.o_proj", "layers.1.mlp.down_proj", "embed_tokens"}
    expected |= (
        {"layers.1.attn.qkv_proj", "layers.1.mlp.gate_up_proj"}
        if graph == "fused"
        else {
            f"layers.1.{part}" for part in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        }
    )
    if which == "mha_untied":
        expected.add("lm_head")
    assert set(quant["int8_matrices"]) == expected
    bits = {
        n.name: {a.name: a.i for a in n.attribute}["bits"]
        for n in onnx.load(str(graph_path(tmp_path / "e")), load_external_data=False).graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert bits["layers.0.attn.o_proj"] == 4 and bits["layers.1.attn.o_proj"] == 8 and bits["lm_head"] == 8


@pytest.mark.parametrize("which", ["gqa_tied", "mha_untied"])
def test_int8_vocab_rows_export_matches_its_dequantized_weights(tiny_models, tmp_path, which):
    """The first 100 of 320 rows at 8 bits, the rest at 4: the lm_head's two outputs concatenated in id order,
    the lookup choosing its table per id (prompt_batch's ids fall on both sides of 100)."""
    folder, model = tiny_models[which]
    manifest = export_and_compare(folder, model, tmp_path, "fused", "", lambda i, key: False, int8_vocab=100)
    quant = manifest["quant"]
    assert quant["int8_vocab"] == 100
    expected = {"embed_tokens.int8_rows": 64} | ({} if which == "gqa_tied" else {"lm_head.int8_rows": 64})
    assert quant["int8_matrices"] == expected
    nodes = onnx.load(str(graph_path(tmp_path / "e")), load_external_data=False).graph.node
    table = "embed_tokens" if which == "gqa_tied" else "lm_head"
    heads = sorted(n.name for n in nodes if n.op_type == "MatMulNBits" and n.name.startswith("lm_head"))
    assert heads == [f"lm_head/{table}", f"lm_head/{table}.int8_rows"]
    assert not any(n.op_type == "GatherBlockQuantized" for n in nodes)


def test_quality_preset_fills_options_and_is_recorded(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    manifest = export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(preset="quality", calibration_file=text))
    quant = json.loads((tmp_path / "e" / "smolexport.json").read_text())["quant"]
    assert quant == manifest["quant"]
    assert quant["preset"] == "quality" and quant["mode"] == "int4" and quant["algo"] == "awq"
    assert quant["block_size"] == 16 and quant["scales"] == "log8"
    # the tiny model's two layers are its first and its last: all their matrices at 8 bits; its 320 token ids
    # are all below the preset's 16,384: the whole embedding/lm_head at 8 bits, as one table
    packed = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert quant["int8_vocab"] == 16384
    assert set(quant["int8_matrices"]) == {f"layers.{i}.{m}" for i in (0, 1) for m in packed} | {"embed_tokens"}
    plus = export_onnx(str(folder), tmp_path / "p", OnnxExportOptions(preset="quality-plus", calibration_file=text))
    assert plus["quant"]["int8_vocab"] == 0 and plus["quant"]["int8_matrices"] == quant["int8_matrices"]
    smaller = OnnxExportOptions(preset="quality", int8_vocab=100, calibration_file=text)
    smaller = export_onnx(str(folder), tmp_path / "v", smaller)["quant"]["int8_matrices"]
    assert smaller["embed_tokens.int8_rows"] == 64 and "embed_tokens" not in smaller
    # an explicit option wins over the preset's
    options = OnnxExportOptions(
        preset="quality", algo="rtn", int8_layers="*.v_proj", block_size=32, calibration_file=text
    )
    manifest = export_onnx(str(folder), tmp_path / "r", options)
    assert manifest["quant"]["algo"] == "rtn" and manifest["quant"]["calibration"] is None
    assert manifest["quant"]["block_size"] == 32 and manifest["quant"]["scales"] == "log8"
    # the preset's --int8-vocab still applies (not overridden): all 320 rows of the tiny vocabulary
    assert set(manifest["quant"]["int8_matrices"]) == {"layers.0.attn.v_proj", "layers.1.attn.v_proj", "embed_tokens"}
    with pytest.raises(UsageError, match="int4 only"):
        export_onnx(str(folder), tmp_path / "x", OnnxExportOptions(quant="int8", int8_layers="embed_tokens"))
    # an int4 recipe asked for int8 says which preset fits instead of failing on one of its options
    with pytest.raises(UsageError, match="preset quality is an int4 recipe: for int8, use --preset recommended or rtn"):
        export_onnx(str(folder), tmp_path / "x", OnnxExportOptions(quant="int8", preset="quality"))


def test_quant_alone_gives_the_recommended_recipe_and_rtn_is_one_flag_away(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    quant = export_onnx(str(folder), tmp_path / "d", OnnxExportOptions(quant="int4", calibration_file=text))["quant"]
    assert quant["preset"] == "recommended" and quant["algo"] == "awq" and quant["calibration"] is not None
    assert quant["block_size"] == 32 and quant["scales"] == "log8" and quant["int8_vocab"] == 16384
    assert quant["int8_layers"] == ["*.v_proj", "layers.0.*", "layers.-1.*"]
    assert quant["recipe"].startswith("int4 awq, blocks of 32, log8 scales; 8-bit: *.v_proj, layers.0.*")
    int8 = export_onnx(str(folder), tmp_path / "8", OnnxExportOptions(quant="int8", calibration_file=text))["quant"]
    assert int8["preset"] == "recommended" and int8["algo"] == "awq" and int8["int8_matrices"] == {}
    assert int8["recipe"] == "int8 awq, blocks of 32, fp16 scales; accuracy level 4"
    rtn = export_onnx(str(folder), tmp_path / "r", OnnxExportOptions(quant="int4", preset="rtn"))["quant"]
    assert rtn["preset"] == "rtn" and rtn["algo"] == "rtn" and rtn["calibration"] is None
    assert rtn["scales"] == "fp16" and rtn["int8_matrices"] == {} and rtn["int8_vocab"] == 0
    fp32 = export_onnx(str(folder), tmp_path / "f", OnnxExportOptions(quant="fp32", preset="rtn"))["quant"]
    assert fp32["preset"] is None and fp32["recipe"] == "fp32 weights"
    with pytest.raises(UsageError, match="presets are int4/int8 recipes; --quant fp16 takes none"):
        export_onnx(str(folder), tmp_path / "x", OnnxExportOptions(quant="fp16", preset="quality"))


def test_int8_preset_is_awq_and_records_it(tiny_models, tmp_path):
    folder, _ = tiny_models["gqa_tied"]
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 300 + 3}" for i in range(200)))
    quant = export_onnx(str(folder), tmp_path / "e", OnnxExportOptions(preset="quality-int8", calibration_file=text))
    quant = quant["quant"]
    assert quant["preset"] == "quality-int8" and quant["mode"] == "int8" and quant["algo"] == "awq"
    assert quant["weight_bits"] == 8 and quant["int8_vocab"] == 0 and quant["calibration"]["text"] == str(text)
