"""The Llama architecture's hyper-parameters, read from a Hugging Face `config.json` dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SmolexportError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    head_dim: int
    rope_theta: float
    # rope_type "default" plus any scaling parameters (llama3, linear, ...), as transformers reads them.
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        if model_type != "llama" and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            found = ", ".join(architectures) or model_type or "unknown"
            raise SmolexportError(
                f"unsupported architecture {found}: smolexport exports Llama-architecture models "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}, model_type 'llama'), such as SmolLM2"
            )
        method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
        if config.get("quantization_config") and "gguf" not in method:  # GGUF weights arrive dequantized
            method = method or "quantized"
            raise SmolexportError(
                f"the checkpoint is already quantized ({method}); export from the original float weights"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise SmolexportError(f"unsupported hidden_act {config['hidden_act']!r}: only 'silu' is supported")
        heads = config["num_attention_heads"]
        # transformers 5 moved rope_theta (and rope_scaling) into `rope_parameters`; older configs keep them
        # at the top level. Reading only one place silently falls back to theta 10000.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        return cls(
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rope_parameters=rope,
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
