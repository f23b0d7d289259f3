"""An export folder whose graph carries onnxruntime's prepacked weights in its external data file, to measure
what that does to memory and speed.

    .venv/bin/python benchmarks/prepacked.py EXPORT OUT     # writes OUT: EXPORT with its graph re-saved
    .venv/bin/smolexport bench OUT --runs 1                 # peak RSS at a 2,048-token context, as for EXPORT

onnxruntime prepacks MatMulNBits' weights into its kernels' layout when a session starts, on the heap. With
the session config key `session.save_external_prepacked_constant_initializers` = 1 and an optimized model
path, it writes the optimized graph with the prepacked blobs into the external data file
(`session.optimized_model_external_initializers_file_name`); a session of that graph then maps them from the
file instead of packing them again. OUT has EXPORT's other files (copied), the re-saved graph and data under
the graph's own names, and a manifest whose file sizes and hashes are those of the new files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from smolexport_runtime.manifest import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort

    manifest = json.loads((args.export / "smolexport.json").read_text())
    graph = manifest["graph"]["file"]  # e.g. onnx/model_q4.onnx
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.export, args.out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "*.data"))
    target = args.out / graph
    data_name = next(name for name in manifest["files"] if name.startswith(graph) and name != graph)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", Path(data_name).name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    started = time.perf_counter()
    ort.InferenceSession(str(args.export / graph), options, providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - started
    files = manifest["files"]
    for name in (graph, data_name):
        path = args.out / name
        files[name] = {**files[name], "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)}  # fmt: skip
    (args.out / "smolexport.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {name: round(files[name]["bytes"] / 1e6, 1) for name in (graph, data_name)}
    print(json.dumps({"out": str(args.out), "seconds": round(seconds, 1), "mb": sizes}))


if __name__ == "__main__":
    main()
