"""Hugging Face folders of SmolLM2-135M-Instruct for fair comparisons, from the bundled Q4_1 GGUF.

    python benchmarks/make_135m_checkpoints.py --output benchmarks/work

writes
- `smollm2-135m-instruct/`: the weights as transformers dequantizes them (fp32 safetensors), the same
  checkpoint every tool (ours, onnxruntime-genai, optimum, llama.cpp) starts from;
- `smollm2-135m-instruct-degrid/`: the same weights plus Gaussian noise of a quarter of each block's
  quantization step (seed 0), used as its own fp32 reference.

Why the second: the bundled weights already sit on a 4-bit grid (Q4_1, blocks of 32 along the input
dimension; the embedding on a Q8_0 grid), so a 4-bit quantizer can look better on them than it would on the
real bf16 checkpoint. The noise moves every weight off that grid by about what a real checkpoint's weights
would be, so tables measured on the de-gridded copy show what a user with the original model would get.
The step of a block is (max - min) / 15 for Q4_1 matrices and max|w| / 127 for the Q8_0 embedding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

BLOCK = 32


def degrid(weight: np.ndarray, levels: str, rng: np.random.Generator) -> np.ndarray:
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    if levels == "q4_1":
        step = (blocks.max(axis=2) - blocks.min(axis=2)) / 15
    else:  # q8_0
        step = np.abs(blocks).max(axis=2) / 127
    noise = rng.standard_normal(blocks.shape).astype(np.float32) * (step[:, :, None] / 4)
    return (blocks + noise).reshape(rows, cols)


def save_folder(model, tokenizer, folder: Path) -> None:
    from safetensors.torch import save_file

    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain fp32 tensors here.
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith(("_", "quantization"))}
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    # transformers < 4.58 (optimum's pin) reads only the top-level rope_theta and would fall back to 10000.
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from smolexport.sources import load_torch_model, resolve_alias

    gguf = resolve_alias("smollm2-135m-instruct")
    model = load_torch_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_folder(model, tokenizer, args.output / "smollm2-135m-instruct")

    rng = np.random.default_rng(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue  # norms are float32 in the GGUF
            levels = "q8_0" if name == "model.embed_tokens.weight" else "q4_1"
            param.copy_(torch.from_numpy(degrid(param.numpy(), levels, rng)))
    save_folder(model, tokenizer, args.output / "smollm2-135m-instruct-degrid")
    print(f"wrote {args.output}/smollm2-135m-instruct and -degrid")


if __name__ == "__main__":
    main()
