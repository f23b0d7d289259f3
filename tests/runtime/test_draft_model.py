"""Speculative decoding with a draft model (speculation.DraftModel): a second model with the same tokenizer
drafts tokens that the model checks in one multi-token step. Greedy's text, exactly, on a float export."""

from __future__ import annotations

import pytest
from smolexport_runtime import BatchEngine, Model, SamplingConfig, load
from smolexport_runtime.errors import RequestError

from .conftest import ENDOFTEXT, IM_END, count_forward_calls, random_decoder

# Not the prompts of any other test: a question, an instruction, and a text to rewrite.
PROMPTS = [
    "Why do cats purr? Answer in two sentences.",
    "List three things to check before a long bicycle ride.",
    "Rewrite more politely: send me the report by tomorrow or else.",
]


@pytest.fixture(scope="module")
def fp32_and_int4_draft(bundled_exports):
    target = load(bundled_exports / "fp32", providers="cpu")
    draft = load(bundled_exports / "int4", providers="cpu", verify=False)
    return target, draft


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_fp32_answer_is_plain_greedy_in_fewer_model_steps(fp32_and_int4_draft, prompt):
    """The 135M int4 drafting for the 135M fp32: close numerics, so most drafts are kept."""
    target, draft = fp32_and_int4_draft
    plain, plain_steps = count_forward_calls(target, lambda: target.generate(prompt, max_new_tokens=48, greedy=True))
    fast, fast_steps = count_forward_calls(
        target, lambda: target.generate(prompt, max_new_tokens=48, greedy=True, draft_model=draft, draft_tokens=4)
    )
    assert fast == plain
    stats = target.last_stats
    assert stats.draft_tokens > 0 and 0 < stats.accepted_tokens <= stats.draft_tokens
    assert fast_steps < plain_steps


def test_a_conversation_keeps_the_draft_models_cache_between_turns(fp32_and_int4_draft):
    target, draft = fp32_and_int4_draft
    chat = target.conversation()
    history = [{"role": "user", "content": "Name a colour."}]
    first_prompt = len(target.encode(history))
    first = chat.generate(history, max_new_tokens=16, greedy=True, draft_model=draft)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And another?"}]
    tokens_fed = []
    forward = draft.decoder.forward

    def counted(input_ids, *args, **kwargs):
        tokens_fed.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    draft.decoder.forward = counted
    try:
        second = chat.generate(history, max_new_tokens=16, greedy=True, draft_model=draft)
    finally:
        draft.decoder.forward = forward
    target.reset()
    assert second == target.generate(history, max_new_tokens=16, greedy=True)
    # The second turn's first draft ran only what the draft cache did not hold (at most what follows the first
    # turn's prompt, plus the token just sampled), not the whole history.
    assert tokens_fed and tokens_fed[0] <= len(target.encode(history)) + 1 - first_prompt


def test_sampling_and_constraints_do_not_speculate(fp32_and_int4_draft):
    target, draft = fp32_and_int4_draft
    target.generate("Hello", max_new_tokens=8, temperature=0.8, seed=1, draft_model=draft)
    assert target.last_stats.draft_tokens == 0


def test_bad_speculation_arguments_fail_at_the_call(fp32_and_int4_draft, tokenizer):
    target, draft = fp32_and_int4_draft
    other = Model(random_decoder(), tokenizer, context_length=64, eos_token_ids={ENDOFTEXT, IM_END})
    with pytest.raises(RequestError, match="tokenizer differs"):
        target.stream("Hi", draft_model=other)
    with pytest.raises(RequestError, match="not both"):
        target.stream("Hi", draft_model=draft, prompt_lookup=4)
    with pytest.raises(RequestError, match="draft_tokens"):
        target.stream("Hi", draft_model=draft, draft_tokens=0)
    with pytest.raises(RequestError, match="itself"):
        target.stream("Hi", draft_model=target)
    with pytest.raises(RequestError, match="prompt_lookup"):
        target.stream("Hi", prompt_lookup=-1)


@pytest.mark.parametrize("speculation", ["prompt_lookup", "draft_model"])
def test_the_batch_engine_speculates_for_a_request_decoding_alone(fp32_and_int4_draft, speculation):
    """A greedy request decoding alone checks drafts in its steps; requests decoding together batch as usual.
    Every answer is plain greedy's (fp32)."""
    target, draft = fp32_and_int4_draft
    options = {"prompt_lookup": 6} if speculation == "prompt_lookup" else {"draft_model": draft, "draft_tokens": 4}
    quote = "Repeat exactly: the staging folder is renamed into place only when the export is complete."
    prompts = [quote, PROMPTS[1]]
    expected = []
    for prompt in prompts:
        target.reset()
        expected.append(target.generate(prompt, max_new_tokens=40, greedy=True))
    engine = BatchEngine(target, max_batch=2, **options).start()
    try:
        alone = engine.submit(target.encode(quote), SamplingConfig(), 40)
        assert "".join(alone.pieces()) == expected[0]
        assert alone.stats.accepted_tokens > 0 and engine.steps < alone.stats.completion_tokens
        together = [engine.submit(target.encode(p), SamplingConfig(), 40) for p in prompts]
        assert ["".join(r.pieces()) for r in together] == expected
    finally:
        engine.stop()
