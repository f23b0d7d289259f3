"""Fixtures for the runtime tests: a byte-level tokenizer, stub decoders, and a real tiny ONNX export folder.

No real model is involved: the decoders' logits are deterministic functions of the input, so every test
knows exactly which tokens (and therefore which text) generation must produce.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Token ids 0..255 are the bytes themselves; the specials follow.
ENDOFTEXT, IM_START, IM_END = 256, 257, 258
VOCAB_SIZE = 259


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def make_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: every byte is one token (id = byte value), like SmolLM2's tokenizer
    on text it has no merges for. Multi-byte characters therefore span several tokens."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tokenizer


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class StubDecoder:
    """Implements the decoder contract in numpy; `next_logits(token, position)` scores the next token.

    It also asserts what the real graph relies on: the mask covers past + new tokens and positions continue
    from the cache length, so a runtime bug in cache bookkeeping fails loudly here.
    """

    def __init__(self, next_logits: Callable[[int, int], np.ndarray], num_layers: int = 2) -> None:
        self.next_logits = next_logits
        self.num_layers = num_layers
        self.calls: list[tuple[int, int]] = []  # (past length, new tokens) per forward

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> list[np.ndarray]:
        return [np.zeros((batch, 1, 0, 2), np.float32) for _ in range(2 * self.num_layers)]

    def forward(self, input_ids, attention_mask, position_ids, past, logits_to_keep=0):
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        assert input_ids.dtype == attention_mask.dtype == position_ids.dtype == np.int64
        assert attention_mask.shape == (batch, past_len + seq)
        np.testing.assert_array_equal(position_ids[0], np.arange(past_len, past_len + seq))
        self.calls.append((past_len, seq))
        rows = [self.next_logits(int(t), past_len + s) for s, t in enumerate(input_ids[0])]
        logits = np.stack(rows)[None].astype(np.float32)
        new = np.broadcast_to(input_ids[:, None, :, None], (batch, 1, seq, 2)).astype(np.float32)
        present = [np.concatenate([p, new], axis=2) for p in past]
        return (logits[:, -logits_to_keep:] if logits_to_keep else logits), present


def one_hot(token: int, scale: float = 10.0) -> np.ndarray:
    logits = np.zeros(VOCAB_SIZE, np.float32)
    logits[token] = scale
    return logits


def scripted_decoder(prompt_len: int, script: Sequence[int]) -> StubDecoder:
    """Generates exactly `script` (then repeats IM_END) after a prompt of `prompt_len` tokens."""

    def next_logits(token: int, position: int) -> np.ndarray:
        step = position - (prompt_len - 1)
        return one_hot(script[step] if 0 <= step < len(script) else IM_END)

    return StubDecoder(next_logits)


def random_decoder(seed: int = 0) -> StubDecoder:
    """Logits are a fixed random function of the last token: a Markov chain with smooth distributions."""
    table = np.random.default_rng(seed).normal(size=(VOCAB_SIZE, VOCAB_SIZE)).astype(np.float32)
    table[:, 256:] = -1e4  # never sample specials, so texts stay comparable
    return StubDecoder(lambda token, position: table[token])


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


# --- a real ONNX model with the export contract -----------------------------------------------------------

ONNX_LAYERS, ONNX_KV_HEADS, ONNX_HEAD_DIM = 2, 2, 4
# The graph's next-token table: after "\n" it spells "Paris" and then ends the turn.
CHAIN = {"\n": "P", "P": "a", "a": "r", "r": "i", "i": "s"}
ERROR_TOKEN = ord("#")  # the graph favours it when mask, positions and cache length disagree


def build_onnx_model(path: Path, kv_dtype: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.full((VOCAB_SIZE, VOCAB_SIZE), 0.0, np.float32)
    table[:, IM_END] = 5.0  # default: end the turn
    for a, b in CHAIN.items():
        table[ord(a), ord(b)] = 10.0
    error_row = np.zeros(VOCAB_SIZE, np.float32)
    error_row[ERROR_TOKEN] = 1000.0
    kv_type = TensorProto.FLOAT16 if kv_dtype == "float16" else TensorProto.FLOAT
    past = [f"past_key_values.{i}.{k}" for i in range(ONNX_LAYERS) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(ONNX_LAYERS) for k in ("key", "value")]

    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["base_logits"], axis=0),
        # err = |mask_len - past_len - seq| + sum|position_ids - expected|, where expected is the contract's
        # "real tokens so far - 1, 0 at padding" for the last seq columns of the mask.
        helper.make_node("Shape", ["input_ids"], ["seq"], start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], ["total"], start=1, end=2),
        helper.make_node("Shape", [past[0]], ["past_len"], start=2, end=3),
        helper.make_node("Sub", ["total", "past_len"], ["t1"]),
        helper.make_node("Sub", ["t1", "seq"], ["t2"]),
        helper.make_node("Abs", ["t2"], ["mask_err"]),
        helper.make_node("CumSum", ["attention_mask", "axis1"], ["counts"]),
        helper.make_node("Sub", ["counts", "one"], ["counts_m1"]),
        helper.make_node("Mul", ["counts_m1", "attention_mask"], ["all_pos"]),
        helper.make_node("Neg", ["seq"], ["minus_seq"]),
        helper.make_node("Slice", ["all_pos", "minus_seq", "big", "axis1_list"], ["expected_pos"]),
        helper.make_node("Sub", ["position_ids", "expected_pos"], ["pos_diff"]),
        helper.make_node("Abs", ["pos_diff"], ["pos_abs"]),
        helper.make_node("ReduceSum", ["pos_abs"], ["pos_err"], keepdims=0),
        helper.make_node("Add", ["mask_err", "pos_err"], ["err"]),
        helper.make_node("Cast", ["err"], ["err_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["err_f", "error_row"], ["penalty"]),
        helper.make_node("Add", ["base_logits", "penalty"], ["logits"]),
        # New cache entries: the token id broadcast to [B, kv, S, D].
        helper.make_node("Cast", ["input_ids"], ["ids_kv"], to=kv_type),
        helper.make_node("Unsqueeze", ["ids_kv", "axes13"], ["ids_4d"]),
        helper.make_node("Expand", ["ids_4d", "kv_shape"], ["new_kv"]),
    ]
    nodes += [helper.make_node("Concat", [p, "new_kv"], [o], axis=2) for p, o in zip(past, present, strict=True)]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(error_row, "error_row"),
        numpy_helper.from_array(np.array(1, np.int64), "axis1"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1_list"),
        numpy_helper.from_array(np.array([2**62], np.int64), "big"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "axes13"),
        numpy_helper.from_array(np.array([1, ONNX_KV_HEADS, 1, ONNX_HEAD_DIM], np.int64), "kv_shape"),
    ]
    kv_dims = ["batch", ONNX_KV_HEADS, "past_seq", ONNX_HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        *[helper.make_tensor_value_info(name, kv_type, kv_dims) for name in past],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB_SIZE]),
        *[
            helper.make_tensor_value_info(name, kv_type, ["batch", ONNX_KV_HEADS, "total_seq", ONNX_HEAD_DIM])
            for name in present
        ],
    ]
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    # External weights, like a real export: the manifest must cover model.onnx.data too. Small shape
    # constants stay inline (onnxruntime's shape inference cannot read them from external data).
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)


def write_manifest(folder: Path, kv_dtype: str = "float32", context_length: int = 256, **overrides) -> dict:
    past = [f"past_key_values.{i}.{k}" for i in range(ONNX_LAYERS) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(ONNX_LAYERS) for k in ("key", "value")]
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "smolexport.json"):
        data = path.read_bytes()
        files[path.relative_to(folder).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {
        "format": "smolexport-onnx",
        "format_version": 1,
        "source": {"spec": "test", "kind": "hf-folder"},
        "quant": {"mode": "none"},
        "model": {
            "architecture": "llama",
            "num_layers": ONNX_LAYERS,
            "num_attention_heads": 4,
            "num_kv_heads": ONNX_KV_HEADS,
            "head_dim": ONNX_HEAD_DIM,
            "hidden_size": 16,
            "vocab_size": VOCAB_SIZE,
            "context_length": context_length,
        },
        "kv_cache": {"layout": "batch,kv_heads,seq,head_dim", "dtype": kv_dtype},
        "io": {
            "inputs": ["input_ids", "attention_mask", "position_ids", *past],
            "outputs": ["logits", *present],
            "past_key": "past_key_values.{i}.key",
            "past_value": "past_key_values.{i}.value",
            "present_key": "present.{i}.key",
            "present_value": "present.{i}.value",
        },
        "files": files,
        "tools": {"smolexport": "0.1.0"},
    }
    manifest.update(overrides)
    (folder / "smolexport.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def make_export(folder: Path, kv_dtype: str = "float32", chat_template: bool = True, **manifest_overrides) -> Path:
    folder.mkdir(parents=True)
    build_onnx_model(folder / "model.onnx", kv_dtype)
    make_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template:
        (folder / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ENDOFTEXT], "bos_token_id": 1}))
    write_manifest(folder, kv_dtype, **manifest_overrides)
    return folder


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """A complete float32-cache export folder. Session-scoped and shared: tests must not modify it."""
    return make_export(tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="module", params=["fused", "standard"])
def llama_export(request, tmp_path_factory) -> Path:
    """A tiny random Llama exported both ways: GroupQueryAttention with its shared, preallocated buffer, and
    the standard-ops graph whose cache grows by copying. Module-scoped and shared: tests must not modify it."""
    from smolexport.onnx.export import OnnxExportOptions, export_onnx
    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp(f"llama-{request.param}")
    make_tiny_llama(root / "src", seed=3)
    out = root / "export"
    export_onnx(str(root / "src"), out, OnnxExportOptions(quant="fp32", fused=request.param == "fused"))
    return out


def count_forward_calls(model, run):
    """`run()`'s result and the number of forward passes it made, from an empty cache."""
    calls, forward = [0], model.decoder.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.decoder.forward = counted
    try:
        model.reset()
        result = run()
    finally:
        model.decoder.forward = forward
    return result, calls[0]
