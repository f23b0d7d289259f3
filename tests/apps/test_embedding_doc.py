"""docs/embedding.md's example is real: it runs, as written, against a tiny export, without torch."""

from __future__ import annotations

import re
import subprocess
import sys

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
