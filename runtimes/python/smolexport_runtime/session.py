"""The onnxruntime session behind a model: provider choice, session options, and a thin forward call.

The cache is a flat list `[key 0, value 0, key 1, value 1, ...]` shaped `[batch, kv_heads, seq, head_dim]`,
the same order in which `forward` returns the presents, so a decode step simply feeds back what the previous
step returned. `forward` returns the presents as onnxruntime OrtValues bound through IO binding: they stay
where the execution provider put them (on the GPU with CUDA) and go back in without a copy through numpy.
`empty_cache` gives numpy arrays, and `forward` accepts either. Both kinds of cache (a preallocated
`KVBuffers` or a `GrowingCache`) are kv_cache.KVCache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ManifestError, SmolexportRuntimeError
from .kv_cache import GrowingCache, KVCache
from .manifest import Manifest

# Short names accepted in `providers`; full onnxruntime names are accepted too.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Inputs a graph may have beyond the contract: `logits_to_keep` (default 0 = logits for all positions).
OPTIONAL_INPUTS = ("logits_to_keep",)
# logits_to_keep values fed as is, so that a decode step allocates nothing for them: [0] (all) and [1] (last).
KEEP_LOGITS = tuple(ort.OrtValue.ortvalue_from_numpy(np.array([k], dtype=np.int64)) for k in (0, 1))
# onnxruntime's names for the cache element types the manifest allows.
ORT_KV_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def resolve_providers(requested: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Maps the user's provider request to onnxruntime provider names, in priority order.

    "auto" picks CUDA when this onnxruntime build has it, otherwise CPU. Anything explicitly requested
    must be available: silently running a "cuda" request on CPU would hide a broken install.
    """
    if isinstance(requested, str):
        if requested.lower() == "auto":
            return [CUDA, CPU] if CUDA in available else [CPU]
        requested = [requested]
    if not requested:
        raise SmolexportRuntimeError("providers is empty; pass 'auto' or e.g. ['cpu']")
    resolved: list[str] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise SmolexportRuntimeError(
                f"execution provider {name!r} is not available in this onnxruntime build; "
                f"available: {', '.join(available)}"
            )
        if full not in resolved:
            resolved.append(full)
    return resolved


class KVBuffers(list):
    """Preallocated cache buffers [batch, kv_heads, capacity, head_dim] (OrtValues), reused by every step.

    On CPU `arrays` are numpy views of the same memory, so the runtime can copy a prefix out (prompt caches),
    grow a buffer, or hand one row of a batch to a batch-1 call (`rows`) without onnxruntime copying anything.
    The IO binding built for these buffers is kept here too: a decode step rebinds only its small inputs.
    """

    def __init__(self, values, capacity: int, arrays: list[np.ndarray] | None = None):
        super().__init__(values)
        self.capacity = capacity
        self.arrays = arrays  # None when the buffers live on a GPU
        self.binding: ort.IOBinding | None = None
        self.logits: tuple[np.ndarray, ort.OrtValue] | None = None  # the bound [batch, 1, vocab] output
        self._rows: dict[tuple[int, int], KVBuffers] = {}

    @property
    def batch(self) -> int:
        return self[0].shape()[0]

    def truncated(self, length: int) -> KVBuffers:
        """Nothing to cut: the attention mask gives the length, and the next write overwrites the rest."""
        return self

    def host_arrays(self) -> list[np.ndarray]:
        """Views of the buffers on CPU; copies from a GPU."""
        return self.arrays if self.arrays is not None else [v.numpy() for v in self]

    def rows(self, start: int, stop: int) -> KVBuffers:
        """Rows start..stop-1 as buffers of their own, sharing this memory (CPU only): a slice of the first
        axis of a C-contiguous array is contiguous, so onnxruntime can read and write it in place."""
        if self.arrays is None:
            raise SmolexportRuntimeError("row views of a cache need CPU buffers")
        if (start, stop) == (0, self.batch):
            return self
        view = self._rows.get((start, stop))
        if view is None:
            arrays = [a[start:stop] for a in self.arrays]
            view = KVBuffers([ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], self.capacity, arrays)
            self._rows[(start, stop)] = view
        return view


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise SmolexportRuntimeError(
                f"threads must be at least 1 (or None for the default), got {threads}"
            )
        options.intra_op_num_threads = threads
    # Warnings such as "some nodes were not assigned to the preferred provider" are expected for
    # quantized graphs and would otherwise print on every load of an embedded app.
    options.log_severity_level = 3
    return options


class OnnxDecoder:
    """One InferenceSession that does both prefill and decode for the smolexport graph contract."""

    def __init__(
        self,
        model_path: str | Path,
        manifest: Manifest,
        providers: str | Sequence[str] = "auto",
        threads: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        spec = manifest.model
        self.num_layers = spec.num_layers
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size
        self.kv_dtype = np.dtype(manifest.kv_dtype)
        self.past_names = manifest.io.past_names(spec.num_layers)
        self.output_names = ["logits", *manifest.io.present_names(spec.num_layers)]

        if not self.model_path.is_file():
            raise SmolexportRuntimeError(f"{self.model_path} is missing; the export folder is incomplete")
        wanted = resolve_providers(providers, ort.get_available_providers())
        options = session_options(threads)
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions (Fail, InvalidGraph, ...)
            raise SmolexportRuntimeError(f"onnxruntime could not load {self.model_path}: {exc}") from exc
        # onnxruntime falls back to CPU with only a log line when e.g. the CUDA libraries fail to load.
        active = self.session.get_providers()
        explicit = not (isinstance(providers, str) and providers.lower() == "auto")
        if explicit and wanted[0] not in active:
            raise SmolexportRuntimeError(
                f"{wanted[0]} is installed but could not be initialised (check the CUDA/cuDNN libraries); "
                f"the session got {', '.join(active)}"
            )
        self.providers = active
        self._check_graph(manifest.kv_dtype)
        # A required input in graphs exported before genai_config.json, an overridable initializer (default 0)
        # since: onnxruntime lists those apart from the inputs, and binds them the same way.
        graph_inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.keeps_logits = any(i.name == "logits_to_keep" for i in graph_inputs)
        # Presents stay on the device that computed them; the next step reads them there.
        self.cache_device = "cuda" if active[0] == CUDA else "cpu"
        # Prompt tokens per prefill call (generate.prefill). On CPU, chunks of 128 keep ONNX Runtime's arena
        # of activations a quarter the size of 512-token chunks' and were no slower (1.7B shapes, fp16 cache:
        # peak RSS 2.42 -> 2.12 GB, 512-token TTFT 6.70 -> 6.52 s; benchmarks/README.md). GPUs want big
        # matrices: 512 there (not measured on a GPU).
        self.prefill_chunk = 512 if self.cache_device == "cuda" else 128
        # GroupQueryAttention can read and write one preallocated cache buffer (see empty_cache). On CUDA
        # its kernel is fp16-only: an fp32 graph runs it on the CPU, where a CUDA buffer would be copied
        # every step.
        self.shares_buffer = manifest.graph.get("ops") == "fused" and (
            self.cache_device == "cpu" or self.kv_dtype == np.float16
        )

    def _check_graph(self, kv_dtype: str) -> None:
        """Fails at load, not at the first token, when the graph does not match its manifest."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        expected = ["input_ids", "attention_mask", "position_ids", *self.past_names]
        missing = [n for n in expected if n not in inputs]
        unknown = [n for n in inputs if n not in expected and n not in OPTIONAL_INPUTS]
        outputs = {o.name for o in self.session.get_outputs()}
        missing_out = [n for n in self.output_names if n not in outputs]
        if missing or unknown or missing_out:
            problems = []
            if missing:
                problems.append(f"missing inputs {missing}")
            if unknown:
                problems.append(f"unexpected inputs {unknown}")
            if missing_out:
                problems.append(f"missing outputs {missing_out}")
            raise ManifestError(
                f"{self.model_path} does not match its manifest: {'; '.join(problems)}. Re-export it."
            )
        # The manifest's shapes size every buffer the runtime allocates: they must be the graph's own.
        outputs_by_name = {o.name: o for o in self.session.get_outputs()}
        declared = {
            "num_kv_heads": (inputs[self.past_names[0]].shape, 1, self.num_kv_heads),
            "head_dim": (inputs[self.past_names[0]].shape, 3, self.head_dim),
            "vocab_size": (outputs_by_name["logits"].shape, 2, self.vocab_size),
        }
        for name, (shape, axis, value) in declared.items():
            graph_value = shape[axis] if len(shape) > axis else None
            if isinstance(graph_value, int) and graph_value != value:
                raise ManifestError(
                    f"{self.model_path} does not match its manifest: model.{name} is {value}, the graph's "
                    f"is {graph_value}. Re-export it."
                )
        graph_type = inputs[self.past_names[0]].type
        if graph_type != ORT_KV_TYPES[kv_dtype]:
            raise ManifestError(
                f"{self.model_path}: cache inputs are {graph_type} but the manifest says {kv_dtype}. "
                "Re-export it."
            )

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> GrowingCache | KVBuffers:
        """A cache holding no tokens, as the first call of a sequence expects.

        With `capacity` (prompt + tokens to generate) and a GroupQueryAttention graph, the cache is one buffer
        per key/value of that length, allocated once: each step passes it as both past and present, and
        GroupQueryAttention writes only the new positions in place (ONNX Runtime's shared past/present
        buffer). Otherwise it is an empty cache that each step returns grown by a copy.
        """
        if capacity is not None and self.shares_buffer:
            shape = [batch, self.num_kv_heads, capacity, self.head_dim]
            # Uninitialized: pages are touched only as positions get written, so RSS grows with the text.
            values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.cache_device)
                      for _ in self.past_names]  # fmt: skip
            if self.cache_device == "cpu":
                # numpy views of onnxruntime's own buffers (the views keep them alive), not OrtValues over
                # numpy arrays: `.numpy()` of those does not keep the array alive (dangling once freed).
                arrays = [v.numpy() for v in values]
                if np.shares_memory(arrays[0], values[0].numpy()):  # a view (onnxruntime >= 1.19 or so)
                    return KVBuffers(values, capacity, arrays)
                # An onnxruntime whose numpy() copies: no row views (no batched slots), copies to grow.
            return KVBuffers(values, capacity)
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return GrowingCache(np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names)

    def grow_cache(self, cache: KVCache, length: int, capacity: int) -> KVBuffers:
        """A larger preallocated cache holding the first `length` positions of `cache` (any batch)."""
        olds = cache.host_arrays()
        grown = self.empty_cache(olds[0].shape[0], capacity=capacity)
        for i, old in enumerate(olds):
            if grown.arrays is not None:
                grown.arrays[i][:, :, :length] = old[:, :, :length]
            else:  # a GPU buffer: filled through the host, once per growth
                host = np.zeros(grown[i].shape(), dtype=self.kv_dtype)
                host[:, :, :length] = old[:, :, :length]
                grown[i] = ort.OrtValue.ortvalue_from_numpy(host, self.cache_device, 0)
        return grown

    def _binding_for(self, past: Sequence[np.ndarray | ort.OrtValue]) -> ort.IOBinding:
        """The IO binding for this step. A preallocated cache keeps one binding for its lifetime, with the
        cache bound once as both past and present; only input_ids, attention_mask and position_ids (and the
        logits output) are rebound per step. A growing cache needs a new binding each step."""
        if isinstance(past, KVBuffers):
            if past.binding is None:
                binding = self.session.io_binding()
                for name, out_name, value in zip(self.past_names, self.output_names[1:], past, strict=True):
                    binding.bind_ortvalue_input(name, value)
                    binding.bind_ortvalue_output(out_name, value)  # the same buffer: written in place
                past.binding = binding
            return past.binding
        binding = self.session.io_binding()
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names[1:]:
            binding.bind_output(name, self.cache_device)
        return binding

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray | ort.OrtValue],
        logits_to_keep: int = 0,
    ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """Runs the graph once: returns logits [batch, seq or logits_to_keep, vocab] and the grown cache.
        A preallocated cache (`KVBuffers`) is written in place and returned as is: the `past` passed in is
        then no snapshot of the earlier state.

        `logits_to_keep=1` asks for the last position's logits only (prefill needs no more); graphs without
        that input return all positions and the caller takes the last.
        """
        shared = isinstance(past, KVBuffers)
        if shared and attention_mask.shape[1] > past.capacity:
            needed = attention_mask.shape[1]
            raise SmolexportRuntimeError(
                f"the cache was allocated for {past.capacity} tokens; this step needs {needed}"
            )
        binding = self._binding_for(past)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        if self.keeps_logits:  # an OrtValue: bind_cpu_input refuses names of overridable initializers
            keep = KEEP_LOGITS[logits_to_keep] if logits_to_keep in (0, 1) else None
            if keep is None:
                keep = ort.OrtValue.ortvalue_from_numpy(np.array([logits_to_keep], dtype=np.int64))
            binding.bind_ortvalue_input("logits_to_keep", keep)
        one_row = input_ids.shape[1] == 1 or (self.keeps_logits and logits_to_keep == 1)
        if shared and one_row:
            # Decode and last-position prefill write [batch, 1, vocab] into a buffer bound once: reading the
            # outputs back (get_outputs wraps every present too) cost ~0.4 ms a token at 30 layers.
            batch = input_ids.shape[0]
            if past.logits is None or past.logits[0].shape[0] != batch:
                array = np.empty((batch, 1, self.vocab_size), dtype=np.float32)
                past.logits = (array, ort.OrtValue.ortvalue_from_numpy(array))
                binding.bind_ortvalue_output("logits", past.logits[1])
            self.session.run_with_iobinding(binding)
            return past.logits[0].copy(), past
        binding.bind_output("logits", "cpu")
        if shared:
            past.logits = None  # the binding's logits output is no longer the kept buffer
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        # get_outputs lists outputs in the order they were first bound: the cache first, then the logits.
        if shared:
            return outputs[-1].numpy(), past
        return outputs[-1].numpy(), GrowingCache(outputs[:-1])
