"""`export_coreml`: model source -> self-contained folder with a stateful Core ML ML Program.

Steps: build the program op by op from the checkpoint (coreml/program.py), each weight quantized as it is read
(coreml/weights.py: int4 block-wise, int8 per output channel, or fp16); convert it to an ML Program for
iOS 18 / macOS 15 with the KV caches as Core ML states; save it with the tokenizer, chat template, generation
config and a manifest. The tied embedding / lm_head is one constant feeding both the gather and the linear op,
so it is stored once.
Memory: the process holds the compressed program plus one fp32 matrix at a time (1.7B shapes, int4: see
docs/coreml.md for the measured peak).
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

from .. import __version__
from ..errors import UsageError
from ..packaging import check_output_path, model_manifest, staged_output, write_manifest
from ..progress import SILENT, Progress
from ..sources import open_source
from . import import_coremltools
from .program import ProgramOptions, build_program
from .weights import WeightCodec

QUANT_MODES = ("int4", "int8", "fp16")
PACKAGE = "model.mlpackage"


@dataclass(frozen=True)
class CoreMLExportOptions:
    quant: str = "int4"
    context_length: int = 2048
    block_size: int = 32
    algo: str = "rtn"  # int4 rounding: "rtn" or "mse" (per-block clip search), as in the ONNX export
    all_logits: bool = False  # logits for every new position instead of the last one only
    force: bool = False


def export_coreml(model: str, output: Path, options: CoreMLExportOptions, progress: Progress = SILENT) -> dict:
    started = time.perf_counter()
    if options.quant not in QUANT_MODES:
        raise UsageError(f"unknown quant {options.quant!r} for Core ML: choose one of {', '.join(QUANT_MODES)}")
    if options.algo not in ("rtn", "mse"):
        raise UsageError(f"unknown algo {options.algo!r} for Core ML: choose rtn or mse")
    ct = import_coremltools()
    check_output_path(Path(output).absolute(), options.force)  # before minutes of loading, not after
    progress.step(f"loading {model}")
    source = open_source(model)
    context = options.context_length
    if not 2 < context <= source.config.max_position_embeddings:
        raise UsageError(f"context must be between 3 and the model's {source.config.max_position_embeddings}")
    _check_block_size(source.config, options)
    with staged_output(Path(output), options.force, progress) as staging:
        mlmodel = _convert(ct, source, options, progress)
        progress.step("saving the ML Program")
        mlmodel.save(str(staging / PACKAGE))
        del mlmodel
        gc.collect()
        source.write_tokenizer(staging)
        (staging / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2) + "\n")
        (staging / "config.json").write_text(source.shipped_config_json())
        progress.step("checksumming")
        manifest = write_manifest(staging, _manifest(ct, source, options, time.perf_counter() - started))
    progress.step(f"done: {output}")
    return manifest


def _check_block_size(c, options: CoreMLExportOptions) -> None:
    """int4 blocks run along each matrix's input dimension, which must be a whole number of blocks."""
    if options.quant != "int4":
        return
    widths = {c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim}
    if any(w % options.block_size for w in widths):
        fits = [b for b in (128, 64, 32, 16) if all(w % b == 0 for w in widths)]
        hint = f"; use --block-size {fits[0]}" if fits else ""
        raise UsageError(
            f"--block-size {options.block_size} does not divide this model's matrix widths {sorted(widths)}{hint}"
        )


def _convert(ct, source, options: CoreMLExportOptions, progress: Progress):
    codec = WeightCodec(options.quant, options.block_size, options.algo)
    program_options = ProgramOptions(options.context_length, options.all_logits)
    progress.step(f"building the program ({options.quant} weights)")
    program = build_program(source.config, source.get_weight, codec, program_options, progress)
    context = options.context_length
    inputs = [
        ct.TensorType("input_ids", shape=(1, ct.RangeDim(1, context)), dtype=np.int32),
        ct.TensorType("causal_mask", shape=(1, 1, ct.RangeDim(1, context), ct.RangeDim(1, context)), dtype=np.float16),
    ]
    progress.step("converting to an ML Program")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            program, inputs=inputs, minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,  # Core ML cannot load models on Linux; saving needs no load
        )  # fmt: skip


def _manifest(ct, source, options: CoreMLExportOptions, seconds: float) -> dict[str, Any]:
    c = source.config
    return {
        "format": "smolexport-coreml",
        # 2: logits for every position (--all-logits), which a version-1 reader would misread
        "format_version": 2 if options.all_logits else 1,
        "source": source.describe(),
        "quant": {
            "mode": options.quant,
            "algo": options.algo if options.quant == "int4" else None,
            "weights": {
                "int4": f"uint4 with fp16 scale and uint4 offset per block of {options.block_size} ({options.algo})",
                "int8": "int8 symmetric per output channel",
                "fp16": "fp16",
            }[options.quant],  # fmt: skip
            "compute_precision": "fp16",
        },
        "model": model_manifest(c, options.context_length),
        "package": PACKAGE,
        "deployment_target": "iOS18 / macOS15",
        "io": {
            "logits_positions": "all" if options.all_logits else "last",
            "inputs": {"input_ids": "int32 [1, S]", "causal_mask": "fp16 [1, 1, S, P+S]"},
            "outputs": {
                "logits": "fp16 [1, S, vocab] (every position)"
                if options.all_logits
                else "fp16 [1, 1, vocab] (last position)"
            },  # fmt: skip
            "states": {
                name: f"fp16 [{c.num_hidden_layers}, {c.num_key_value_heads}, {options.context_length}, {c.head_dim}]"
                for name in ("key_cache", "value_cache")
            },
        },
        "tools": {"smolexport": __version__, "coremltools": ct.__version__},
        "export_seconds": round(seconds, 1),
    }
