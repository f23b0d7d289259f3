"""A C program on onnxruntime-genai's C API loads a tiny export and generates our runtime's greedy tokens.

The Python wheel ships libonnxruntime-genai.so (the C API's library) but not ort_genai_c.h: greedy.c declares
the functions it uses as the documented header has them. genai loads onnxruntime itself (dlopen of
libonnxruntime.so.1); the wheel's onnxruntime has it as libonnxruntime.so.1.32.0 (etc.), so the test links a
libonnxruntime.so.1 name to it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from smolexport_runtime import load

from smolexport.onnx.export import OnnxExportOptions, export_onnx

from .helpers import og, ours_greedy

COMPILER = shutil.which("cc") or shutil.which("gcc")
SOURCE = Path(__file__).with_name("greedy.c")


def libraries(tmp: Path) -> tuple[Path, Path]:
    """(folder of libonnxruntime-genai.so, a folder with libonnxruntime.so.1 -> onnxruntime's library)."""
    import onnxruntime

    genai_dir = Path(og.__file__).parent
    if not (genai_dir / "libonnxruntime-genai.so").is_file():
        pytest.skip("this onnxruntime-genai wheel ships no libonnxruntime-genai.so")
    ort = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not ort:
        pytest.skip("no libonnxruntime.so in the onnxruntime package")
    ort_dir = tmp / "ortlib"
    ort_dir.mkdir()
    (ort_dir / "libonnxruntime.so.1").symlink_to(ort[0])
    return genai_dir, ort_dir


@pytest.mark.skipif(COMPILER is None, reason="no C compiler (cc/gcc)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="links the Linux wheel's .so")
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_c_program_generates_our_greedy_tokens(tiny_models, tmp_path, quant):
    genai_dir, ort_dir = libraries(tmp_path)
    binary = tmp_path / "greedy"
    subprocess.run(
        [COMPILER, "-O1", "-Wall", "-Werror", "-o", str(binary), str(SOURCE), f"-L{genai_dir}",
         "-l:libonnxruntime-genai.so", f"-Wl,-rpath,{genai_dir}:{ort_dir}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    folder = tmp_path / "e"
    export_onnx(str(tiny_models["gqa_tied"][0]), folder, OnnxExportOptions(quant=quant))
    model = load(folder)
    for prompt in ("w7 w8 w9 w10", "w100 w3 w250"):
        ids = model.encode(prompt, chat=True)
        run = subprocess.run([str(binary), str(folder), "16", *map(str, ids)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert [int(t) for t in run.stdout.split()] == ours_greedy(model, ids, 16)
