"""Writes a random-weight Llama checkpoint with SmolLM2-1.7B-Instruct's exact shapes (bf16 safetensors).

Used to measure export time, memory, artifact size and speed at full scale without downloading the model.
Weights are written one layer per shard, so this script itself stays under ~1 GB of memory.
The tokenizer and chat template are the bundled SmolLM2-135M-Instruct's (the SmolLM2 family shares them).

    python benchmarks/make_random_checkpoint.py --output benchmarks/work/smollm2-1.7b-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SMOLLM2_1P7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 130000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "bfloat16",
    "head_dim": 64,
    "attention_bias": False,
    "mlp_bias": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=SMOLLM2_1P7B["num_hidden_layers"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = {**SMOLLM2_1P7B, "num_hidden_layers": args.layers}
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def write(shard: str, tensors: dict) -> None:
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))

    n = config["num_hidden_layers"]
    write(
        "embed.safetensors",
        {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
    )
    for i in range(n):
        p = f"model.layers.{i}."
        write(
            f"layer-{i:03d}.safetensors",
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h),
                p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            },
        )
        print(f"layer {i + 1}/{n}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    _write_tokenizer(out)
    print(f"wrote {out}")


def _write_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    from smolexport.sources import resolve_alias

    gguf = resolve_alias("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


if __name__ == "__main__":
    main()
