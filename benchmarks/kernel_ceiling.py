"""Where a decode step's time goes, and how fast ONNX Runtime's MatMulNBits alone can be (2 threads).

kernels  a model of only the MatMulNBits nodes of a model's shapes (random 4-bit weights, block sizes given):
         the floor that graph or runtime work cannot go below with that kernel
profile  ONNX Runtime's profiler on an export: kernel time per op type, for a decode step or a prefill chunk
step     plain `session.run` decode steps of several ONNX models (any input names), alternated

.venv/bin/python benchmarks/kernel_ceiling.py kernels --shapes 135m --blocks 16 32 64 128 --rows 1 128
.venv/bin/python benchmarks/kernel_ceiling.py profile DIR/model.onnx --new 128 --past 256
.venv/bin/python benchmarks/kernel_ceiling.py step A/model.onnx B/model.onnx
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# layers, hidden, intermediate, packed q/k/v width, vocab (SmolLM2-135M and the 1.7B shapes)
SHAPES = {"135m": (30, 576, 1536, 960, 49152), "1.7b": (24, 2048, 8192, 6144, 49152)}


def session(model, threads: int = 2, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "kernel_ceiling")  # not the working folder
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def matmul_only_model(shape, block: int, rows: int, lm_head: bool) -> bytes:
    """Every MatMulNBits of a decoder of `shape` (qkv, o, gate_up, down per layer; the lm_head if asked), each
    fed from a graph input, as the exporter writes them: uint8 codes, fp16 scales cast to fp32, zero points."""
    layers, hidden, ffn, qkv, vocab = shape
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []

    def matmul(name: str, source: str, k: int, n: int) -> None:
        blocks = -(-k // block)
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), name))
        inits.append(numpy_helper.from_array((rng.random((n, blocks)) * 0.01).astype(np.float16), f"{name}.s16"))
        inits.append(numpy_helper.from_array(np.full((n, (blocks + 1) // 2), 0x88, np.uint8), f"{name}.zp"))
        nodes.append(helper.make_node("Cast", [f"{name}.s16"], [f"{name}.s"], to=TensorProto.FLOAT))
        nodes.append(
            helper.make_node("MatMulNBits", [source, name, f"{name}.s", f"{name}.zp"], [f"{name}.y"],
                             domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=4)
        )  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, None))

    for i in range(layers):
        for part, width in (("qkv", qkv), ("o", hidden), ("gate_up", 2 * ffn)):
            matmul(f"l{i}.{part}", "x", hidden, width)
        matmul(f"l{i}.down", "x_ffn", ffn, hidden)
    if lm_head:
        matmul("lm_head", "x", hidden, vocab)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden]),
              helper.make_tensor_value_info("x_ffn", TensorProto.FLOAT, [rows, ffn])]  # fmt: skip
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def decode_feeds(sess: ort.InferenceSession, new: int, past: int, head_dim: int = 64) -> dict:
    """Inputs for `new` tokens after `past` cached ones, by the graph's own input names and types (`head_dim`
    where a graph leaves it symbolic, as onnxruntime-genai's does)."""
    feeds = {}
    # Our logits_to_keep is an optional input, listed with the overridable initializers (docs/onnx-export.md).
    keep = [i for i in sess.get_overridable_initializers() if i.name == "logits_to_keep"]
    for i in [*sess.get_inputs(), *keep]:
        if i.name == "input_ids":
            feeds[i.name] = np.random.default_rng(0).integers(3, 1000, (1, new)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + new), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + new, dtype=np.int64)[None]
        elif i.name == "logits_to_keep":
            feeds[i.name] = np.array([1], np.int64)
        else:  # a cache input [batch, kv_heads, past, head_dim]
            dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(i.type, np.float32)
            dim = i.shape[3] if isinstance(i.shape[3], int) else head_dim
            feeds[i.name] = np.zeros((1, i.shape[1], past, dim), dtype)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = sub.add_parser("kernels")
    kernels.add_argument("--shapes", choices=SHAPES, default="135m")
    kernels.add_argument("--blocks", type=int, nargs="+", default=[32])
    kernels.add_argument("--rows", type=int, nargs="+", default=[1], help="tokens per call (1 = decode)")
    profile = sub.add_parser("profile")
    profile.add_argument("model")
    profile.add_argument("--new", type=int, default=1)
    profile.add_argument("--past", type=int, default=200)
    profile.add_argument("--repeats", type=int, default=5)
    step = sub.add_parser("step")
    step.add_argument("models", nargs="+")
    step.add_argument("--past", type=int, default=100)
    step.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    if args.command == "kernels":
        for rows in args.rows:
            for block in args.blocks:  # prefill asks for the last position's logits only: no lm_head there
                sess = session(matmul_only_model(SHAPES[args.shapes], block, rows, lm_head=rows == 1))
                _, hidden, ffn, _, _ = SHAPES[args.shapes]
                feeds = {"x": np.random.rand(rows, hidden).astype(np.float32),
                         "x_ffn": np.random.rand(rows, ffn).astype(np.float32)}  # fmt: skip
                ms = median_ms(lambda s=sess, f=feeds: s.run(None, f), 20 if rows == 1 else 3)
                print(json.dumps({"shapes": args.shapes, "block": block, "rows": rows, "ms": round(ms, 2)}))
    elif args.command == "profile":
        sess = session(args.model, profile=True)
        feeds = decode_feeds(sess, args.new, args.past)
        wall = median_ms(lambda: sess.run(["logits"], feeds), args.repeats)
        per_op = collections.Counter()
        trace_path = sess.end_profiling()
        with open(trace_path) as trace:
            events = json.load(trace)
        os.remove(trace_path)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"] / 1000 / (args.repeats + 1)
        total = sum(per_op.values())
        print(f"{args.model}: {args.new} new after {args.past}; wall {wall:.1f} ms, kernels {total:.1f} ms")
        for op, ms in per_op.most_common(8):
            print(f"  {op:34s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    else:
        runs = []
        for path in args.models:
            sess = session(path)
            runs.append((sess, decode_feeds(sess, 1, args.past)))
        for r in range(args.rounds):
            times = [median_ms(lambda s=s, f=f: s.run(["logits"], f), 60) for s, f in runs]
            print(f"round {r + 1}: " + ", ".join(f"{p}: {t:.2f} ms" for p, t in zip(args.models, times, strict=True)))


if __name__ == "__main__":
    main()
