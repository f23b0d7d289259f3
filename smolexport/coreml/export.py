"""`export_coreml`: model source -> self-contained folder with a stateful Core ML ML Program.

Steps: build the conversion-friendly torch module from the checkpoint in fp16 (coreml/model.py), trace it
with two new tokens (the single-token case gets special-cased by the tracer), convert to an ML Program for
iOS 18 / macOS 15 with the KV caches as Core ML states, then compress linear and embedding weights
(int4: block-wise, block 32; int8: per output channel). The tied embedding / lm_head is one constant feeding
both the gather and the linear op, so it is stored once.
Memory: the torch module holds the weights once in fp16 and is freed before compression.
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from smolexport_runtime.coreml import causal_mask

from .. import __version__
from ..errors import SmolexportError, UsageError
from ..packaging import staged_output, write_manifest
from ..progress import SILENT, Progress
from ..sources import open_source

QUANT_MODES = ("int4", "int8", "fp16")
PACKAGE = "model.mlpackage"


@dataclass(frozen=True)
class CoreMLExportOptions:
    quant: str = "int4"
    context_length: int = 2048
    block_size: int = 32
    force: bool = False


def _coremltools():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import coremltools as ct
        except ImportError:
            raise SmolexportError("Core ML export needs coremltools: pip install 'smolexport[coreml]'") from None
    return ct


def export_coreml(model: str, output: Path, options: CoreMLExportOptions, progress: Progress = SILENT) -> dict:
    started = time.perf_counter()
    if options.quant not in QUANT_MODES:
        raise UsageError(f"unknown quant {options.quant!r} for Core ML: choose one of {', '.join(QUANT_MODES)}")
    ct = _coremltools()
    progress.step(f"loading {model}")
    source = open_source(model)
    context = options.context_length
    if not 2 < context <= source.config.max_position_embeddings:
        raise UsageError(f"context must be between 3 and the model's {source.config.max_position_embeddings}")
    with staged_output(Path(output), options.force) as staging:
        progress.step("building the fp16 model")
        mlmodel = _convert(ct, source, context, progress)
        if options.quant != "fp16":
            progress.step(f"compressing weights to {options.quant}")
            mlmodel = _compress(mlmodel, options)
        progress.step("saving the ML Program")
        mlmodel.save(str(staging / PACKAGE))
        del mlmodel
        gc.collect()
        source.write_tokenizer(staging)
        (staging / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(source.config_dict, indent=2, default=str) + "\n")
        progress.step("checksumming")
        manifest = write_manifest(staging, _manifest(ct, source, options, time.perf_counter() - started))
    progress.step(f"done: {output}")
    return manifest


def _convert(ct, source, context: int, progress: Progress):
    import torch

    from .model import CoreMLLlama

    module = CoreMLLlama(source.config, source.get_weight, context, dtype=torch.float16).eval()
    example = (torch.tensor([[1, 2]], dtype=torch.int32), torch.from_numpy(causal_mask(2, 2)))
    progress.step("tracing")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example)
    cache = ct.TensorType(shape=tuple(module.key_cache.shape), dtype=np.float16)
    inputs = [
        ct.TensorType("input_ids", shape=(1, ct.RangeDim(1, context)), dtype=np.int32),
        ct.TensorType("causal_mask", shape=(1, 1, ct.RangeDim(1, context), ct.RangeDim(1, context)), dtype=np.float16),
    ]
    states = [ct.StateType(wrapped_type=cache, name="key_cache"), ct.StateType(wrapped_type=cache, name="value_cache")]
    del module
    gc.collect()
    progress.step("converting to an ML Program")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            traced, inputs=inputs, outputs=[ct.TensorType("logits", dtype=np.float16)], states=states,
            minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,  # Core ML cannot load models on Linux; saving needs no load
        )  # fmt: skip


def _compress(mlmodel, options: CoreMLExportOptions):
    import coremltools.optimize.coreml as cto

    if options.quant == "int4":
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=options.block_size,
            weight_threshold=512,
        )  # fmt: skip
    else:
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512
        )
    # Only weights consumed by linear layers and the embedding gather: the RoPE tables stay fp16.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.linear_quantize_weights(
            mlmodel, config=cto.OptimizationConfig(op_type_configs={"linear": config, "gather": config})
        )


def _manifest(ct, source, options: CoreMLExportOptions, seconds: float) -> dict[str, Any]:
    c = source.config
    return {
        "format": "smolexport-coreml",
        "format_version": 1,
        "source": source.describe(),
        "quant": {
            "mode": options.quant,
            "weights": {
                "int4": f"int4 symmetric, blocks of {options.block_size}",
                "int8": "int8 per channel",
                "fp16": "fp16",
            }[options.quant],  # fmt: skip
            "compute_precision": "fp16",
        },
        "model": {
            "architecture": "llama",
            "num_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "context_length": options.context_length,
            "tie_word_embeddings": c.tie_word_embeddings,
        },  # fmt: skip
        "package": PACKAGE,
        "deployment_target": "iOS18 / macOS15",
        "io": {
            "inputs": {"input_ids": "int32 [1, S]", "causal_mask": "fp16 [1, 1, S, P+S]"},
            "outputs": {"logits": "fp16 [1, 1, vocab] (last position)"},
            "states": {
                name: f"fp16 [{c.num_hidden_layers}, {c.num_key_value_heads}, {options.context_length}, {c.head_dim}]"
                for name in ("key_cache", "value_cache")
            },
        },
        "tools": {"smolexport": __version__, "coremltools": ct.__version__},
        "export_seconds": round(seconds, 1),
    }
