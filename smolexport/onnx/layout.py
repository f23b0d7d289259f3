"""Where an export folder puts things, so that every runtime loads it as it is, with no app-side options.

- transformers.js (web, Electron, Node) looks for the graph in `onnx/`, named by its dtype
  (`model.onnx`, `model_fp16.onnx`, `model_q4.onnx`, `model_int8.onnx`), for external weights beside it named
  `<graph>_data` (the browser fetches exactly that name when config.json's `transformers.js_config` says
  `use_external_data_format`), takes its default dtype from that config, reads the chat template only from
  tokenizer_config.json, and fills only a symbolic batch dimension named `batch_size` (decoder.py).
- onnxruntime-genai reads the graph's path from genai_config.json (genai_config.py), our runtime from the
  manifest (`graph.file`, format_version 2); folders of format_version 1 keep `model.onnx` at the root and
  still load in our runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

GRAPH_FOLDER = "onnx"
# Our --quant -> transformers.js dtype, and that dtype's file suffix (transformers.js's own table).
TRANSFORMERS_JS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int4": "q4", "int8": "int8"}
TRANSFORMERS_JS_SUFFIXES = {"fp32": "", "fp16": "_fp16", "q4": "_q4", "int8": "_int8"}


def graph_file(quant: str) -> str:
    """The graph's path inside the export folder, e.g. `onnx/model_q4.onnx` for int4."""
    return f"{GRAPH_FOLDER}/model{TRANSFORMERS_JS_SUFFIXES[TRANSFORMERS_JS_DTYPES[quant]]}.onnx"


def data_file_name(graph: str) -> str:
    """The external weights' file name, beside the graph: `model_q4.onnx_data`."""
    return Path(graph).name + "_data"


def transformers_js_config(quant: str) -> dict:
    """config.json's `transformers.js_config`: the dtype to load by default and the external weights."""
    return {"dtype": TRANSFORMERS_JS_DTYPES[quant], "use_external_data_format": True}


def copy_chat_template_into_tokenizer_config(folder: Path) -> None:
    """transformers.js reads the chat template only from tokenizer_config.json; transformers and our runtime
    read chat_template.jinja first. The same text in both places."""
    template, config_path = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if not template.is_file() or not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not config.get("chat_template"):
        config["chat_template"] = template.read_text(encoding="utf-8")
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
