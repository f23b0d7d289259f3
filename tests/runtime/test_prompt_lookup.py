"""Prompt lookup decoding (run_sequence's `prompt_lookup`): drafts copied from the context and verified in
one forward pass give exactly plain greedy's tokens on float exports, in fewer model steps when the answer
quotes its input."""

from __future__ import annotations

import pytest
from smolexport_runtime import load
from smolexport_runtime.speculation import draft_from_context

from .conftest import count_forward_calls

PASSAGE = (
    "The export is built in a hidden staging folder beside the target and renamed into place only when "
    "complete; on any error the staging folder is deleted. An existing output folder is refused unless "
    "--force, which replaces it only after the new export is complete."
)


def test_drafts_come_from_the_latest_earlier_occurrence():
    assert draft_from_context([1, 2, 3, 4, 9, 1, 2, 3], 3, 10) == [4, 9, 1]
    assert draft_from_context([5, 2, 3, 7, 2, 3], 2, 10) == [7, 2]  # the tail (2, 3) seen before: 7 followed
    assert draft_from_context([1, 2, 3, 4], 3, 10) == []  # nothing repeats
    assert draft_from_context([1, 2, 1, 2], 5, 1) == [1]  # no more than the room left


@pytest.mark.parametrize(
    "prompt",
    [
        f"Repeat this text word for word:\n\n{PASSAGE}",
        f"Which folder is deleted on an error? Quote the sentence.\n\n{PASSAGE}",
        "Write a short poem about the sea.",  # little to copy: drafts mostly rejected, the answer the same
    ],
)
def test_the_bundled_fp32_answers_exactly_as_plain_greedy(bundled_exports, prompt):
    model = load(bundled_exports / "fp32", providers="cpu")
    plain, plain_steps = count_forward_calls(model, lambda: model.generate(prompt, max_new_tokens=64, greedy=True))
    fast, fast_steps = count_forward_calls(
        model, lambda: model.generate(prompt, max_new_tokens=64, greedy=True, prompt_lookup=8)
    )
    assert fast == plain
    stats = model.last_stats
    assert stats.completion_tokens == len(model.tokenizer.encode(fast, add_special_tokens=False).ids) + (
        stats.finish_reason == "stop"
    )
    if prompt.startswith("Repeat"):  # a copied answer: most drafts are kept, far fewer model steps
        assert stats.accepted_tokens > 0.5 * stats.completion_tokens and fast_steps < 0.6 * plain_steps


def test_both_graph_kinds_and_a_kept_cache(llama_export):
    """The tiny random Llama, GroupQueryAttention's shared buffer and the standard graph's growing cache:
    rejected drafts are cut from the cache, and the conversation's next turn still matches a fresh model."""
    model = load(llama_export, providers=["cpu"], threads=1)
    fresh = load(llama_export, providers=["cpu"], threads=1, verify=False)
    history = [{"role": "user", "content": "w5 w6 w7 w8 w5 w6 w7 w8 w5 w6 w7"}]
    for _ in range(3):
        answer = model.generate(history, max_new_tokens=24, greedy=True, prompt_lookup=4)
        assert answer == fresh.generate(history, max_new_tokens=24, greedy=True)
        fresh.reset()
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "w5 w6 w7 w8"}]
    assert model.last_stats.draft_tokens > 0
