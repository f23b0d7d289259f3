"""`genai_config.json`: what onnxruntime-genai needs to run an export folder as it is.

onnxruntime-genai (the C/C++ generate loop behind its C, C++, C#, Java, Objective-C and Python packages) reads a
folder's `genai_config.json` for the graph's shapes and I/O names, the special token ids and its search
defaults. Our graph already uses its names; `logits_to_keep` is an input with a default of 0 (decoder.py), so
genai, which does not feed it, gets the logits it expects. Measured with onnxruntime-genai 0.18.0 on CPU
(tests/genai): the fused graph with every KV cache type (fp32, fp16, int8) and the standard-ops graph run and
give our runtime's greedy tokens.

Written from the files the export folder already holds, so genai and our runtime read the same facts:
- bos / eos / pad ids: generation_config.json, completed from tokenizer_config.json's special tokens (looked
  up in tokenizer.json). eos is every id our runtime stops at (generation_config's and the tokenizer's
  eos_token, which chat templates close each turn with).
- search defaults: generation_config.json's sampling settings, else Hugging Face's defaults (greedy);
  max_length: the export's context length.
- past_present_share_buffer: True for the fused graph (GroupQueryAttention reads and writes one buffer of
  max_length positions, as our runtime's preallocated cache does), False for the standard graph, whose
  present is a Concat of past and new and so must be a fresh, longer buffer each step.
- provider_options: empty (CPU). For CUDA add `{"cuda": {}}` (docs/export-folder.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..llama_config import LlamaConfig
from .decoder import DecoderOptions

FILE = "genai_config.json"
MODEL_FILE = "model.onnx"

# Hugging Face's GenerationConfig defaults, used for keys generation_config.json leaves out.
SEARCH_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "no_repeat_ngram_size": 0,
}


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_id(folder: Path, tokenizer_config: dict[str, Any], key: str) -> int | None:
    """The id of tokenizer_config.json's special token `key` (a string or an AddedToken dict)."""
    value = tokenizer_config.get(key)
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str) or not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(text)


def special_token_ids(folder: Path, config_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"bos_token_id": int, "eos_token_id": int | [int, ...], "pad_token_id": int} from the folder's files,
    the source's config.json (`config_dict`) as the last resort."""
    config_dict = config_dict or {}
    generation = _read(folder / "generation_config.json")
    tokenizer_config = _read(folder / "tokenizer_config.json")
    eos = _ids(generation.get("eos_token_id"))
    turn_end = _token_id(folder, tokenizer_config, "eos_token")
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    if not eos:
        eos = _ids(config_dict.get("eos_token_id"))
    bos = _ids(generation.get("bos_token_id")) or _ids(_token_id(folder, tokenizer_config, "bos_token"))
    if not bos:
        bos = _ids(config_dict.get("bos_token_id"))
    pad = _ids(generation.get("pad_token_id")) or _ids(_token_id(folder, tokenizer_config, "pad_token"))
    return {
        # genai requires a bos id even for models whose template adds none; it only uses it if asked to.
        "bos_token_id": bos[0] if bos else (eos[0] if eos else 0),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad[0] if pad else (eos[0] if eos else 0),
    }


def search_defaults(folder: Path, context_length: int, share_buffer: bool) -> dict[str, Any]:
    generation = _read(folder / "generation_config.json")
    search: dict[str, Any] = {}
    for key, default in SEARCH_DEFAULTS.items():
        value = generation.get(key)
        # bool before int/float: do_sample is a bool, the rest numbers; anything else keeps the default
        ok = isinstance(value, bool) if isinstance(default, bool) else (
            isinstance(value, (int, float)) and not isinstance(value, bool))  # fmt: skip
        search[key] = type(default)(value) if ok else default
    search.update(
        early_stopping=True,
        max_length=context_length,
        min_length=0,
        past_present_share_buffer=share_buffer,
    )
    return dict(sorted(search.items()))


def genai_config(folder: Path, config: LlamaConfig, decoder: DecoderOptions,
                 config_dict: dict[str, Any] | None = None, graph: str = MODEL_FILE) -> dict[str, Any]:  # fmt: skip
    """The genai_config.json for an export folder that already holds its tokenizer and generation config;
    `config_dict`: the source's config.json, for token ids the folder's files do not name."""
    c = config
    share_buffer = decoder.fused  # see the module docstring
    return {
        "model": {
            "type": "llama",
            **special_token_ids(folder, config_dict),
            "context_length": decoder.context_length,
            "vocab_size": c.vocab_size,
            "decoder": {
                "filename": graph,
                # Empty: CPU with onnxruntime's default threads. CUDA: [{"cuda": {}}] (docs/export-folder.md).
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": search_defaults(folder, decoder.context_length, share_buffer),
    }


def write_genai_config(folder: Path, config: LlamaConfig, decoder: DecoderOptions,
                       config_dict: dict[str, Any] | None = None, graph: str = MODEL_FILE) -> dict:  # fmt: skip
    data = genai_config(folder, config, decoder, config_dict, graph)
    (folder / FILE).write_text(json.dumps(data, indent=2) + "\n")
    return data
