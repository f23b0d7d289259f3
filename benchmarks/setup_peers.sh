#!/usr/bin/env bash
# Rebuilds the peer virtual environments used by benchmarks/fidelity.py and benchmarks/speed.py, from scratch,
# under benchmarks/work/ (git-ignored). Not run by CI. Takes ~15 minutes on 2 cores (llama.cpp compiles from
# source). Set TORCH_INDEX=https://download.pytorch.org/whl/cpu where pip would otherwise take a CUDA torch.
#
#   venv-peers:   onnxruntime-genai 0.18 (+ onnx-ir, its model builder's need; torch/transformers for the
#                 builder), llama-cpp-python 0.3.36 built for this CPU, gguf
#   venv-optimum: optimum-onnx 0.1 with onnxruntime (it pins transformers < 4.58), onnx-ir for
#                 onnxruntime's MatMulNBitsQuantizer
set -euo pipefail
cd "$(dirname "$0")/work" 2>/dev/null || { mkdir -p "$(dirname "$0")/work"; cd "$(dirname "$0")/work"; }
PY=${PYTHON:-python3}
TORCH_ARGS=${TORCH_INDEX:+--index-url $TORCH_INDEX}

rm -rf venv-peers venv-optimum
$PY -m venv venv-peers
venv-peers/bin/pip install $TORCH_ARGS torch==2.13.0          # first: a bare torch requirement pulls CUDA
# llama.cpp: only the library, tuned for this CPU (the AMX path is refused at run time, see peers/worker.py)
CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" \
  venv-peers/bin/pip install --no-cache-dir numpy llama-cpp-python==0.3.36
venv-peers/bin/pip install onnxruntime-genai==0.18.0 onnx-ir onnx transformers gguf safetensors

$PY -m venv venv-optimum
venv-optimum/bin/pip install $TORCH_ARGS torch==2.13.0
venv-optimum/bin/pip install "optimum-onnx[onnxruntime]==0.1.0" onnx-ir
echo "peer venvs ready under $(pwd)"
