"""transformers.js loads our export folders as they are: in Node (onnxruntime-node) and in headless Chromium
(onnxruntime-web, wasm) through sample_apps/web_chat, with the answers of our runtime.

Needs Node and `npm ci` in sample_apps/web_chat (and Debian's chromium for the page test): `.ci/run` sets them
up (scripts/setup_web.sh); elsewhere these tests skip, saying what is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from smolexport_runtime import load

from smolexport.validate.inputs import DEFAULT_PROMPTS

WEB_CHAT = Path(__file__).resolve().parents[2] / "sample_apps" / "web_chat"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAX_NEW_TOKENS = 32

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or not (WEB_CHAT / "node_modules" / "@huggingface" / "transformers").is_dir(),
    reason="needs Node.js and `npm ci` in sample_apps/web_chat (bash scripts/setup_web.sh)",
)

# One Node process answers every prompt greedily (node_example.mjs's loadChatModel and chat).
GREEDY_IN_NODE = """
import { loadChatModel, chat } from './node_example.mjs';
const [dir, promptsJson, maxNewTokens] = process.argv.slice(1);
const loaded = await loadChatModel(dir);
const answers = [];
for (const prompt of JSON.parse(promptsJson)) {
    answers.push((await chat(loaded, prompt, { maxNewTokens: Number(maxNewTokens) })).text);
}
console.log(JSON.stringify(answers));
"""


def transformers_js_answers(folder: Path, prompts: list[str]) -> list[str]:
    command = ["node", "--input-type=module", "-e", GREEDY_IN_NODE, str(folder.resolve()), json.dumps(prompts)]
    result = subprocess.run([*command, str(MAX_NEW_TOKENS)], cwd=WEB_CHAT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def our_answers(folder: Path, prompts: list[str]) -> list[str]:
    model = load(folder, providers="cpu")
    return [model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, greedy=True) for prompt in prompts]


@needs_node
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_transformers_js_in_node_answers_as_our_runtime(bundled_exports, quant):
    """validate's built-in prompts and two it never uses: the same greedy text, token for token."""
    folder = bundled_exports / quant
    prompts = [*DEFAULT_PROMPTS, "List three uses of a paperclip.", "Was ist die Hauptstadt von Italien?"]
    theirs, ours = transformers_js_answers(folder, prompts), our_answers(folder, prompts)
    assert theirs == ours
    assert "Paris" in transformers_js_answers(folder, ["What is the capital of France?"])[0]


@needs_node
@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium (bash scripts/setup_web.sh)")
def test_the_web_page_answers_the_readme_question_in_chromium(bundled_exports, tmp_path):
    """The page in headless Chromium (onnxruntime-web, wasm) on the fp32 export: our runtime's answer."""
    folder = bundled_exports / "fp32"
    question = "What is the capital of France?"
    command = ["node", "test_page.mjs", "--model-dir", str(folder.resolve()), "--prompt", question,
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--chromium", CHROMIUM,
               "--screenshot", str(tmp_path / "page.png")]  # fmt: skip
    result = subprocess.run(command, cwd=WEB_CHAT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    page = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in page["text"] and page["device"] == "wasm"
    assert page["text"] == our_answers(folder, [question])[0]
    assert (tmp_path / "page.png").stat().st_size > 0
