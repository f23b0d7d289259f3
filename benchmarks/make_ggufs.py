"""GGUF files of the benchmark checkpoints for llama.cpp, from the same HF folders every other tool uses.

    python benchmarks/make_ggufs.py HF_FOLDER OUT.gguf [--dtype f32|f16]

The metadata (tokenizer, chat template, special tokens) is copied from the bundled SmolLM2-135M-Instruct GGUF;
the hyperparameters come from HF_FOLDER/config.json (so the 1.7B-shaped random folder gets its own). The
tensors come from HF_FOLDER's safetensors under llama.cpp's names, with llama.cpp's q/k row permutation
(convert_hf_to_gguf's LlamaModel.permute). Quantized variants (Q4_0, Q4_K_M, Q8_0) are made from this file
with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, see `quantize_gguf` in peers/worker.py).
Needs numpy, safetensors and gguf (the project's .venv or venv-peers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

SKIP = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type"}
HPARAMS = {
    "llama.block_count": "num_hidden_layers",
    "llama.embedding_length": "hidden_size",
    "llama.feed_forward_length": "intermediate_size",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.context_length": "max_position_embeddings",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
}
LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.weight"


def rope_theta(config: dict) -> float:
    return float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta"))


def template_fields():
    from smolexport.sources import resolve_alias

    return gguf.GGUFReader(str(resolve_alias("smollm2-135m-instruct"))).fields


def write(folder: Path, out: Path, dtype: str, fields=None) -> None:
    config = json.loads((folder / "config.json").read_text())
    fields = fields if fields is not None else template_fields()
    writer = gguf.GGUFWriter(str(out), arch="llama")
    for key, field in fields.items():
        if key in SKIP or key in HPARAMS or key == "llama.rope.freq_base":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for key, name in HPARAMS.items():
        value = config[name]
        vtype = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(key, value, vtype)
    writer.add_key_value("llama.rope.freq_base", rope_theta(config), gguf.GGUFValueType.FLOAT32)
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_key_value("general.file_type", int(ftype), gguf.GGUFValueType.UINT32)

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                w = f.get_tensor(hf).float().numpy()
                if hf.endswith("q_proj.weight"):
                    w = permute(w, n_head)
                elif hf.endswith("k_proj.weight"):
                    w = permute(w, n_kv)
                if dtype == "f16" and w.ndim == 2:
                    w = w.astype(np.float16)
                writer.add_tensor(gguf_name(hf), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write(args.folder, args.output, args.dtype)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
