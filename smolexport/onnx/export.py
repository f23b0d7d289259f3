"""`export_onnx`: model source -> self-contained ONNX export folder."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import __version__
from ..errors import UsageError
from ..packaging import check_output_path, model_manifest, staged_output, write_manifest
from ..progress import SILENT, Progress
from ..sources import ModelSource, open_source
from .calibration import DEFAULT_TOKENS, load_calibration_ids
from .decoder import DecoderOptions, build_decoder, kv_names
from .genai_config import FILE as GENAI_CONFIG
from .genai_config import write_genai_config
from .graph import CACHE_TYPES, GraphBuilder
from .layout import copy_chat_template_into_tokenizer_config, data_file_name, graph_file, transformers_js_config
from .mixed import parse_patterns
from .presets import DEFAULT, preset_quant, recipe

QUANT_MODES = ("int4", "int8", "fp16", "fp32")
ALGOS = ("rtn", "mse", "act-mse", "awq", "gptq", "awq-gptq")
SCALE_FORMATS = ("fp16", "log8")
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class OnnxExportOptions:
    quant: str | None = None  # None: the preset's, else int4
    block_size: int | None = None  # None: the preset's, else 32
    # Block size of the feed-forward matrices (gate/up/down) kept at the export's bits. None: the preset's,
    # else as block_size.
    ffn_block_size: int | None = None
    # Block scales: "fp16", or "log8" (8-bit log codes and one fp32 scale per row, see quantize.py), which
    # makes blocks of 16 cost about what fp16-scaled blocks of 32 do. None: the preset's, else fp16.
    scales: str | None = None
    # Bits for the embedding / lm_head matrix (stored once when tied); None = the same as the other weights.
    lm_head_bits: int | None = None
    # Longest sequence (prompt + generated) the export accepts; None = the model's max_position_embeddings.
    context_length: int | None = None
    # False: standard ONNX ops only (plus MatMulNBits), for runtimes without ONNX Runtime's fused contrib ops
    # and for left-padded batches. True: GroupQueryAttention & co., several times faster.
    fused: bool = True
    # MatMulNBits accuracy_level: 4 quantizes activations to int8 per block for ONNX Runtime's integer CPU
    # kernels; 0 computes in the activation type. Measured on SmolLM2-135M (2-core Xeon): int4 decodes at
    # ~160 tokens/s with 4 vs ~100 with 0 (ppl ratio 1.355 vs 1.338), and 8-bit weights at ~100 vs 4-10
    # tokens/s (0 has no fast 8-bit CPU kernel). CUDA ignores it.
    accuracy_level: int = 4
    # int4/int8 algorithm: "rtn" (round to nearest), "mse" (per-block clipping search, see quantize.py) or
    # "act-mse" (the same search weighted by calibration activations, see calibration.py) or "gptq" (error
    # compensation with the calibration inputs' Hessian, see gptq.py). None: the preset's, else rtn.
    algo: str | None = None
    calibration_file: Path | None = None  # text for act-mse/awq/gptq and the int8 cache; None = built-in
    # int4 only: comma-separated patterns of matrices kept at 8 bits (see mixed.py). None: the preset's.
    int8_layers: str | None = None
    # int4 only: rows of the embedding/lm_head for the token ids below this kept at 8 bits (vocab.py: low ids
    # are a BPE vocabulary's common tokens). None: the preset's, else 0.
    int8_vocab: int | None = None
    # KV cache type for fp32-activation exports: "fp16" halves the cache's memory (GroupQueryAttention then
    # computes in fp16), "int8" quarters it (fixed per-channel scales from the calibration text, kv_cache.py);
    # fused graph only. None: as the activations (fp16 exports always cache in fp16).
    kv_cache: str | None = None
    preset: str | None = None  # a named recipe (presets.py) filling the options left None
    force: bool = False

    @property
    def quant_mode(self) -> str:
        """The weight type: as given, else the preset's (quality: int4), else int4."""
        return self.quant or preset_quant(self.preset) or "int4"

    @property
    def preset_name(self) -> str | None:
        """The recipe used: as given, else `recommended` for int4/int8; None for float exports."""
        quantized = self.quant_mode in ("int4", "int8")
        if self.preset and (quantized or self.preset != "rtn"):
            return self.preset  # a float export with a recipe other than rtn: decoder_options says why not
        return DEFAULT if quantized else None

    def resolved(self, name: str, default=None):
        """An option's value: as given, else the preset's, else `default`."""
        value = getattr(self, name)
        if value is None and self.preset_name:
            value = recipe(self.preset_name, self.quant_mode).get(name)
        return default if value is None else value

    def decoder_options(self, max_positions: int) -> DecoderOptions:
        quant = self.quant_mode
        if quant not in QUANT_MODES:
            raise UsageError(f"unknown quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.preset_name:
            recipe(self.preset_name, quant)  # a preset that does not fit the weight type says why
        algo = self.resolved("algo", "rtn")
        int8_layers = parse_patterns(self.resolved("int8_layers"))
        bits = {"int4": 4, "int8": 8}.get(quant)
        if int8_layers and bits != 4:
            raise UsageError("--int8-layers applies to --quant int4 only")
        int8_vocab = self.resolved("int8_vocab", 0)
        if int8_vocab < 0:
            raise UsageError(f"--int8-vocab takes a number of token ids, 0 or more, got {int8_vocab}")
        if self.int8_vocab and bits != 4:  # an explicit one; a preset's is simply not used for int8/float
            raise UsageError("--int8-vocab applies to --quant int4 only")
        if self.lm_head_bits is not None and (bits is None or self.lm_head_bits not in (4, 8)):
            raise UsageError("--lm-head-bits takes 4 or 8, with --quant int4 or int8")
        if algo not in ALGOS:
            raise UsageError(f"unknown algo {algo!r}: choose one of {', '.join(ALGOS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"accuracy level must be 0 to 4, got {self.accuracy_level}")
        block_size, scales = self.resolved("block_size", 32), self.resolved("scales", "fp16")
        ffn_block_size = self.resolved("ffn_block_size", block_size)
        for flag, size in (("block size", block_size), ("FFN block size", ffn_block_size)):
            if size not in BLOCK_SIZES:
                sizes = ", ".join(map(str, BLOCK_SIZES[:-1])) + f" or {BLOCK_SIZES[-1]}"
                raise UsageError(f"{flag} must be {sizes}, got {size}")
        if scales not in SCALE_FORMATS:
            raise UsageError(f"unknown scale format {scales!r}: choose one of {', '.join(SCALE_FORMATS)}")
        if self.kv_cache not in (None, "fp16", "fp32", "int8"):
            raise UsageError(f"unknown KV cache type {self.kv_cache!r}: choose fp32, fp16 or int8")
        if self.kv_cache in ("fp16", "int8") and not self.fused:
            raise UsageError(
                f"--kv-cache {self.kv_cache} needs the fused graph (GroupQueryAttention): drop --standard-ops"
            )
        if self.kv_cache in ("fp32", "int8") and quant == "fp16":
            kv = self.kv_cache
            raise UsageError(f"--kv-cache {kv} with --quant fp16 is not supported: fp16 exports cache in fp16")
        context = self.context_length or max_positions
        if not 0 < context <= max_positions:
            raise UsageError(f"context length must be between 1 and the model's {max_positions}, got {context}")
        return DecoderOptions(
            activation_dtype="fp16" if quant == "fp16" else "fp32",
            weight_bits=bits,
            lm_head_bits=self.lm_head_bits or bits,
            block_size=block_size,
            ffn_block_size=ffn_block_size if ffn_block_size != block_size else None,
            context_length=context,
            fused=self.fused,
            accuracy_level=self.accuracy_level,
            algo=algo,
            int8_layers=int8_layers,
            log8_scales=scales == "log8",
            int8_vocab=int8_vocab if bits == 4 else 0,
            kv_dtype=self.kv_cache,
        )


def export_onnx(model: str, output: Path, options: OnnxExportOptions, progress: Progress = SILENT) -> dict[str, Any]:
    """Exports `model` (hub id, folder, .gguf or alias) to `output`; returns the manifest."""
    started = time.perf_counter()
    options.decoder_options(1 << 30)  # reject bad options before any slow loading
    check_output_path(Path(output).absolute(), options.force)  # before minutes of loading, not after
    progress.step(f"loading {model}")
    source = open_source(model)
    decoder = options.decoder_options(source.config.max_position_embeddings)
    with staged_output(Path(output), options.force, progress) as staging:
        progress.step("writing tokenizer, chat template and generation config")
        source.write_tokenizer(staging)
        calibration_ids = None
        if decoder.needs_calibration:
            calibration_ids = load_calibration_ids(staging / "tokenizer.json", options.calibration_file)
            progress.step(f"calibrating on {len(calibration_ids)} tokens while building")
        built = _write_model(staging / graph_file(options.quant_mode), source, decoder, progress, calibration_ids)
        (staging / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2) + "\n")
        graph = graph_file(options.quant_mode)
        extra = {"transformers.js_config": transformers_js_config(options.quant_mode)}
        (staging / "config.json").write_text(source.shipped_config_json(**extra))
        copy_chat_template_into_tokenizer_config(staging)
        # after the files it reads
        write_genai_config(staging, source.config, decoder, source.config_dict, graph)
        progress.step("checksumming")
        seconds = time.perf_counter() - started
        manifest = write_manifest(staging, _manifest(source, options, decoder, built, seconds))
    progress.step(f"done: {output}")
    return manifest


def _write_model(path: Path, source: ModelSource, decoder: DecoderOptions, progress: Progress,
                 calibration_ids: list[int] | None) -> dict:  # fmt: skip
    config = source.config
    path.parent.mkdir(exist_ok=True)
    graph = GraphBuilder(path, data_name=data_file_name(path.name))
    try:
        progress.step(f"building the decoder ({config.num_hidden_layers} layers)")
        steps = config.num_hidden_layers + 1  # the layers, then the lm_head
        progress.count("layers + lm_head", 0, steps)
        built = build_decoder(
            graph,
            config,
            decoder,
            source.get_weight,
            on_layer=lambda i: progress.count("layers + lm_head", i + 1, steps),
            calibration_ids=calibration_ids,
        )
        graph.save(metadata={"smolexport_version": __version__})
    finally:
        graph.close()
    onnx.checker.check_model(str(path))
    return built


def _manifest(
    source: ModelSource, options: OnnxExportOptions, decoder: DecoderOptions, built: dict, seconds: float
) -> dict:
    c = source.config
    inputs = ["input_ids", "attention_mask", "position_ids", "logits_to_keep"]
    outputs = ["logits"]
    for i in range(c.num_hidden_layers):
        names = kv_names(i)
        inputs += [names["past_key"], names["past_value"]]
        outputs += [names["present_key"], names["present_value"]]
    import onnxruntime
    import torch
    import transformers

    return {
        "format": "smolexport-onnx",
        "format_version": 2,  # 2: the graph's path is graph.file (layout.py); 1: model.onnx at the root
        "source": source.describe(),
        "quant": {
            "mode": options.quant_mode,
            "preset": options.preset_name,
            "recipe": decoder.describe(),
            "algo": decoder.algo if decoder.weight_bits else None,
            "calibration": (
                {"text": str(options.calibration_file or "built-in"), "max_tokens": DEFAULT_TOKENS}
                if decoder.needs_calibration
                else None
            ),
            "weight_bits": decoder.weight_bits,
            "lm_head_bits": decoder.lm_head_bits,
            "block_size": decoder.block_size if decoder.weight_bits else None,
            # the feed-forward matrices' (gate/up/down) block size where they keep weight_bits
            "ffn_block_size": (decoder.ffn_block_size or decoder.block_size) if decoder.weight_bits else None,
            "scales": ("log8" if decoder.log8_scales else "fp16") if decoder.weight_bits else None,
            # Mixed precision (int4 only): the patterns asked for and the matrices they raised to 8 bits
            # (graph name -> block size).
            "int8_layers": list(decoder.int8_layers),
            "int8_matrices": built["int8_matrices"],
            # embedding/lm_head rows of the token ids below this at 8 bits ("embed_tokens.int8_rows" above)
            "int8_vocab": decoder.int8_vocab,
            "activation_dtype": decoder.activation_dtype,
            "accuracy_level": decoder.accuracy_level if decoder.weight_bits else None,
        },
        "graph": {
            "file": graph_file(options.quant_mode),
            "ops": "fused" if decoder.fused else "standard",
            # The fused graph takes each row's length from attention_mask: rows must not be padded.
            "padded_batches": not decoder.fused,
            "logits_to_keep": True,
        },
        "model": model_manifest(c, decoder.context_length),
        # onnxruntime-genai's config for this folder (genai_config.py); folders exported before have none.
        "genai": {"config": GENAI_CONFIG, "past_present_share_buffer": decoder.fused},
        "kv_cache": {
            "layout": "batch,kv_heads,seq,head_dim",
            "dtype": np.dtype(CACHE_TYPES[decoder.cache_dtype][0]).name,  # float32 | float16 | int8
        },
        "io": {
            "inputs": inputs,
            "outputs": outputs,
            "past_key": "past_key_values.{i}.key",
            "past_value": "past_key_values.{i}.value",
            "present_key": "present.{i}.key",
            "present_value": "present.{i}.value",
        },
        "tools": {
            "smolexport": __version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "export_seconds": round(seconds, 1),
    }
