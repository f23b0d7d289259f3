"""A small ONNX graph builder that streams initializers straight to an external-data file.

Weights never accumulate in the ModelProto: each one is written to `<model>.data` as soon as it is added,
and the proto only records its offset. That keeps the exporter's memory at about one layer of weights
and removes the 2 GB protobuf limit.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Tensors at least this big go to the external file; offsets of large ones are page-aligned so that
# ONNX Runtime can memory-map them.
EXTERNAL_MIN_BYTES = 1024
ALIGN_MIN_BYTES = 1 << 20
ALIGNMENT = 1 << 16

DEFAULT_OPSET = 17
MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
CACHE_TYPES = {**FLOAT_TYPES, "int8": (np.int8, TensorProto.INT8)}  # KV cache element types (kv_cache.py)


class GraphBuilder:
    def __init__(self, model_path: Path, graph_name: str = "decoder", data_name: str | None = None):
        self.model_path = Path(model_path)
        self.data_name = data_name or self.model_path.name + ".data"  # beside the graph
        self._data = open(self.model_path.with_name(self.data_name), "wb")  # noqa: SIM115 (closed in save/close)
        self.graph_name = graph_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names = itertools.count()
        self._constants: dict[tuple, str] = {}

    # --- graph interface -------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_outputs: int = 1, domain: str = "", **attrs):
        """Adds a node named `name`; its outputs are `name/out0`... (or `name` itself when given as a list)."""
        outputs = [f"{name}/out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def node_to(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        """Adds a node whose outputs are graph outputs with fixed names."""
        name = f"{op}_{next(self._names)}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    def initializer(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if array.nbytes < EXTERNAL_MIN_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        if array.nbytes >= ALIGN_MIN_BYTES:
            pad = -self._data.tell() % ALIGNMENT
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant, shared between all nodes that use the same value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.initializer(f"const_{len(self._constants)}", array)
        return self._constants[key]

    # --- output ----------------------------------------------------------------------------------
    def save(self, metadata: dict[str, str] | None = None) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, self.graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="smolexport")
        model.ir_version = 8
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(self.model_path))

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
