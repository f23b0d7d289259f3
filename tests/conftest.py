"""Shared fixtures: tiny random Llama checkpoints saved as Hugging Face folders, and export helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` tokens: the specials, then 'w3', 'w4', ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": SMOLLM2_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def make_tiny_llama(folder: Path, *, heads=4, kv_heads=2, tied=True, layers=2, hidden=64, vocab=320, seed=0):
    """Saves a random LlamaForCausalLM with its tokenizer to `folder`; returns the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        eos_token_id=EOS_ID,
        bos_token_id=1,
        pad_token_id=EOS_ID,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init has tiny weights; scale them up so differences would show
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tiny_tokenizer(folder, vocab)
    return model


def empty_cache(manifest: dict, batch: int) -> dict[str, np.ndarray]:
    """Feeds for a first call: empty pasts, and logits for every position."""
    m = manifest["model"]
    dtype = np.float16 if manifest["kv_cache"]["dtype"] == "float16" else np.float32
    feed = {"logits_to_keep": np.array([0], dtype=np.int64)}
    for i in range(m["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((batch, m["num_kv_heads"], 0, m["head_dim"]), dtype)
    return feed


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Two tiny checkpoints: GQA with tied embeddings, MHA with an untied lm_head."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "gqa_tied": (root / "gqa_tied", make_tiny_llama(root / "gqa_tied", heads=4, kv_heads=2, tied=True)),
        "mha_untied": (root / "mha_untied", make_tiny_llama(root / "mha_untied", heads=4, kv_heads=4, tied=False)),
    }


def export_bundled(root: Path, name: str, *args: str) -> Path:
    """Exports the bundled SmolLM2-135M-Instruct through the CLI (`smolexport onnx ... -q`) to root/name."""
    from click.testing import CliRunner

    from smolexport.cli import main

    out = root / name
    command = ["onnx", "--model", "smollm2-135m-instruct", *args, "--output", str(out), "-q"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return out


@pytest.fixture(scope="session")
def bundled_exports(tmp_path_factory) -> Path:
    """The bundled 135M exported to int4 and fp32 (root/int4, root/fp32), once per session: shared by
    test_bundled_model.py and tests/genai. Tests must not modify them."""
    root = tmp_path_factory.mktemp("bundled")
    for quant in ("int4", "fp32"):
        export_bundled(root, quant, "--quant", quant)
    return root


@pytest.fixture(scope="session")
def bundled_int8(tmp_path_factory) -> Path:
    """The bundled 135M exported with `--quant int8` (the default int8 recipe), once per session: shared by
    test_bundled_model.py and tests/genai. Tests must not modify it."""
    return export_bundled(tmp_path_factory.mktemp("bundled-int8"), "int8", "--quant", "int8")


def graph_path(folder: Path) -> Path:
    """The ONNX graph of an export folder: where its manifest says (onnx/model_q4.onnx, ...; model.onnx at the
    root in folders of format_version 1)."""
    manifest = json.loads((Path(folder) / "smolexport.json").read_text())
    return Path(folder) / manifest.get("graph", {}).get("file", "model.onnx")
