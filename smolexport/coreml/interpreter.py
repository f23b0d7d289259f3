"""A NumPy reference interpreter for the Core ML ML Programs smolexport writes, with Core ML states.

Core ML only runs on Apple hardware; this executes the *saved* .mlpackage's program op by op on any machine,
so an export can be compared with PyTorch in CI on Linux. The program is read back with coremltools' own
protobuf loader (no Core ML framework needed); each op is implemented here in NumPy. Elementwise ops compute
in the program's dtype (fp16 overflows show up as they would on device); matrix products and attention
accumulate in fp32 and round to fp16, as Apple's GPU/ANE kernels do.
Only the ops our converter emits are implemented: an unknown op raises a clear error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SmolexportError
from . import import_coremltools


def _load_program(package: Path):
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights))


COMPARISONS = {
    "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal,
    "equal": np.equal, "not_equal": np.not_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
}  # fmt: skip


def _np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


def _expand_blocks(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeats a per-block parameter along each axis up to the data's shape."""
    for axis, (have, want) in enumerate(zip(scale.shape, shape, strict=True)):
        if have != want:
            scale = np.repeat(scale, want // have, axis=axis)
    return scale


def _slice(x: np.ndarray, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    index = []
    for axis in range(x.ndim):
        b = None if begin_mask[axis] else int(begin[axis])
        e = None if end_mask[axis] else int(end[axis])
        if squeeze_mask[axis]:
            index.append(int(begin[axis]))
        else:
            index.append(slice(b, e, int(stride[axis])))
    return tuple(index)


class Interpreter:
    """Runs `main` of a saved ML Program. States persist in the dict returned by `new_state()`."""

    def __init__(self, package: str | Path):
        package = Path(package)
        if not package.is_dir():
            raise SmolexportError(f"no such Core ML package: {package}")
        program = _load_program(package)
        self.function = program.functions["main"]
        self.ops = list(self.function.operations)
        self._in_place = self._in_place_updates()
        readers: dict[str, set[str]] = {}
        for op in self.ops:
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else [var]:
                    readers.setdefault(v.name, set()).add(op.op_type)
        self._linear_only = {name for name, kinds in readers.items() if kinds == {"linear"}}
        self.consts: dict[str, np.ndarray] = {}
        self._fp32_weights: dict[str, np.ndarray] = {}
        for op in self.ops:  # constants (and dequantized compressed weights) once, up front
            if op.op_type == "const":
                self.consts[op.outputs[0].name] = np.asarray(op.val.val)
            elif op.op_type.startswith("constexpr"):
                self.consts[op.outputs[0].name] = self._constexpr(op)

    def _in_place_updates(self) -> set[int]:
        """Indices of slice_update ops that may write into their input instead of copying it: the input has no
        later use, none of its consumers keeps a view of it, and no read_state follows (so nothing can observe
        the old value). Without this, a decode step copied the whole KV cache several times per layer."""
        last_use: dict[str, int] = {}
        consumers: dict[str, set[str]] = {}
        last_read_state = -1
        for index, op in enumerate(self.ops):
            if op.op_type == "read_state":
                last_read_state = index
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else [var]:
                    last_use[v.name] = index
                    consumers.setdefault(v.name, set()).add(op.op_type)
        for var in self.function.outputs:
            last_use[var.name] = len(self.ops)
        return {
            index
            for index, op in enumerate(self.ops)
            if op.op_type == "slice_update"
            and index > last_read_state
            and last_use.get(op.inputs["x"].name) == index
            # consumers that cannot hold a view of it (slice_by_index copies; the state is not read again)
            and consumers[op.inputs["x"].name] <= {"slice_update", "coreml_update_state", "slice_by_index"}
            # produced by an op whose result owns its memory (not a view of a constant or another value)
            and op.inputs["x"].op is not None
            and op.inputs["x"].op.op_type in ("read_state", "slice_update", "coreml_update_state")
        }

    def _fp32_transposed(self, name: str, weight: np.ndarray) -> np.ndarray:
        """A constant weight [N, K] as fp32 [K, N], converted once: per call it dominated the run time. A
        constant only linear ops read is then dropped in its program dtype, so it is held once."""
        if name not in self.consts:
            return weight.astype(np.float32).T
        self._fp32_weights[name] = np.ascontiguousarray(weight.astype(np.float32).T)
        if name in self._linear_only:
            del self.consts[name]
        return self._fp32_weights[name]

    def _constexpr(self, op) -> np.ndarray:
        inputs = {k: np.asarray(v.val) for k, v in op.inputs.items()}
        out_dtype = _np_dtype(op.outputs[0])
        if op.op_type == "constexpr_blockwise_shift_scale":
            data = inputs["data"].astype(np.float32)
            scale = _expand_blocks(inputs["scale"].astype(np.float32), data.shape)
            if "offset" in inputs:
                data = data - _expand_blocks(inputs["offset"].astype(np.float32), data.shape)
            return (data * scale).astype(out_dtype)
        raise SmolexportError(f"the reference interpreter does not implement {op.op_type}")

    def state_names(self) -> list[str]:
        from coremltools.converters.mil.mil import types

        return [name for name, var in self.function.inputs.items() if types.is_state(var.sym_type)]

    def new_state(self) -> dict[str, np.ndarray]:
        from coremltools.converters.mil.mil import types

        states = {}
        for name, var in self.function.inputs.items():
            if types.is_state(var.sym_type):
                wrapped = var.sym_type.wrapped_type()
                states[name] = np.zeros(
                    wrapped.get_shape(), np.dtype(types.nptype_from_builtin(wrapped.get_primitive()))
                )
        return states

    def predict(self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, object] = dict(self.consts)
        for name, var in self.function.inputs.items():
            if name in state:
                env[name] = name  # a state is referenced by name; read_state / coreml_update_state use it
            elif name in inputs:
                env[name] = np.asarray(inputs[name]).astype(_np_dtype(var))
            else:
                raise SmolexportError(f"missing input {name!r}")
        for index, op in enumerate(self.ops):
            if op.op_type == "const" or op.op_type.startswith("constexpr"):
                continue
            self._index = index
            results = self._run(op, env, state)
            for var, value in zip(op.outputs, results, strict=True):
                env[var.name] = value if op.op_type == "shape" else np.asarray(value).astype(_np_dtype(var), copy=False)
        return {var.name: env[var.name] for var in self.function.outputs}

    def _run(self, op, env, state):  # noqa: C901 (one branch per op type is the clearest form)
        def get(name):
            var = op.inputs.get(name)
            if var is None:
                return None
            if isinstance(var, (list, tuple)):
                return [env[v.name] if v.val is None else np.asarray(v.val) for v in var]
            if var.name in env:
                return env[var.name]
            return np.asarray(var.val)

        t = op.op_type
        x = get("x")
        if t in ("add", "sub", "mul", "real_div", "pow", "maximum", "minimum", "floor_div"):
            fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
                  "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide}[t]  # fmt: skip
            y = get("y")
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                return [fn(x, y)]
        if t in COMPARISONS:
            return [COMPARISONS[t](x, get("y"))]
        if t == "logical_not":
            return [np.logical_not(x)]
        if t == "select":
            return [np.where(get("cond"), get("a"), get("b"))]
        if t == "abs":
            return [np.abs(x)]
        if t == "rsqrt":
            with np.errstate(divide="ignore"):
                return [1.0 / np.sqrt(x + get("epsilon").astype(x.dtype))]
        if t == "inverse":
            with np.errstate(divide="ignore"):
                return [1.0 / (x + get("epsilon").astype(x.dtype))]
        if t == "sqrt":
            return [np.sqrt(x)]
        if t == "exp":
            return [np.exp(x)]
        if t == "silu":
            xf = x.astype(np.float32)
            return [xf / (1.0 + np.exp(-xf))]
        if t == "sigmoid":
            return [1.0 / (1.0 + np.exp(-x.astype(np.float32)))]
        if t == "clip":
            return [np.clip(x, get("alpha"), get("beta"))]
        if t == "cast":
            return [x]  # the output dtype is applied by the caller
        if t == "shape":
            return [np.array(x.shape, dtype=np.int32)]
        if t == "gather":
            axis = int(get("axis"))
            return [np.take(x, get("indices").astype(np.int64), axis=axis)]
        if t == "concat":
            return [np.concatenate([np.atleast_1d(v) for v in get("values")], axis=int(get("axis")))]
        if t == "reshape":
            shape = [int(s) for s in get("shape")]
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return [x.reshape(shape)]
        if t == "transpose":
            return [np.transpose(x, [int(p) for p in get("perm")])]
        if t == "expand_dims":
            return [np.expand_dims(x, tuple(int(a) for a in get("axes")))]
        if t == "squeeze":
            axes = get("axes")
            return [np.squeeze(x, None if axes is None else tuple(int(a) for a in axes))]
        if t == "tile":
            return [np.tile(x, [int(r) for r in get("reps")])]
        if t in ("reduce_max", "reduce_mean", "reduce_sum"):
            fn = {"reduce_max": np.max, "reduce_mean": np.mean, "reduce_sum": np.sum}[t]
            axes = tuple(int(a) for a in get("axes"))
            keep = bool(get("keep_dims")) if get("keep_dims") is not None else False
            return [fn(x.astype(np.float32), axis=axes, keepdims=keep)]
        if t == "linear":
            name = op.inputs["weight"].name
            weight = self._fp32_weights.get(name)
            if weight is None:
                weight = self._fp32_transposed(name, get("weight"))
            y = x.astype(np.float32) @ weight
            bias = get("bias")
            return [y if bias is None else y + bias.astype(np.float32)]
        if t == "matmul":
            a, b = x.astype(np.float32), get("y").astype(np.float32)
            if get("transpose_x") is not None and bool(get("transpose_x")):
                a = np.swapaxes(a, -1, -2)
            if get("transpose_y") is not None and bool(get("transpose_y")):
                b = np.swapaxes(b, -1, -2)
            return [a @ b]
        if t == "softmax":
            xf = x.astype(np.float32)
            e = np.exp(xf - xf.max(axis=int(get("axis")), keepdims=True))
            return [e / e.sum(axis=int(get("axis")), keepdims=True)]
        if t == "scaled_dot_product_attention":
            q, k, v = (get(n).astype(np.float32) for n in ("query", "key", "value"))
            scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
            mask = get("attn_mask")
            if mask is not None:
                scores = scores + (np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask.astype(np.float32))
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            return [(scores / scores.sum(axis=-1, keepdims=True)) @ v]
        if t in ("slice_by_index", "slice_update"):
            n = x.ndim
            masks = {m: get(m) if get(m) is not None else [False] * n for m in
                     ("begin_mask", "end_mask", "squeeze_mask")}  # fmt: skip
            stride = get("stride") if get("stride") is not None else [1] * n
            index = _slice(x, get("begin"), get("end"), stride, masks["begin_mask"], masks["end_mask"],
                           masks["squeeze_mask"])  # fmt: skip
            if t == "slice_by_index":
                return [x[index].copy()]  # not a view: the source may be updated in place later
            out = x if self._index in self._in_place else x.copy()
            out[index] = get("update")
            return [out]
        if t == "read_state":
            return [state[get("input")].copy()]
        if t == "coreml_update_state":
            name, value = get("state"), get("value")
            state[name] = value  # rebinding, not copying: see _in_place_updates
            return [value]
        raise SmolexportError(f"the reference interpreter does not implement the Core ML op {t!r}")
