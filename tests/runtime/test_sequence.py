"""The per-sequence state every loop drives (SequenceState), and the KV cache variants behind one interface."""

from __future__ import annotations

import numpy as np
import pytest
from smolexport_runtime import BatchEngine, Model, SamplingConfig, SmolexportRuntimeError
from smolexport_runtime.generate import GenerationStats
from smolexport_runtime.kv_cache import GrowingCache, KVCache, as_kv_cache
from smolexport_runtime.kv_state import CacheState
from smolexport_runtime.sampling import greedy
from smolexport_runtime.sequence import SequenceState, run_sequence

from .conftest import ENDOFTEXT, IM_END, StubDecoder, ids, one_hot, random_decoder, scripted_decoder


def state_for(tokenizer, max_new_tokens=10, stop=()) -> SequenceState:
    return SequenceState.create(greedy, tokenizer, 3, max_new_tokens, {ENDOFTEXT, IM_END}, stop)


def test_a_multi_token_step_ends_at_eos_and_drops_what_follows(tokenizer):
    sequence = state_for(tokenizer)
    assert sequence.accept(ids("ab")) == "ab"
    assert not sequence.finished
    assert sequence.accept([*ids("c"), IM_END, *ids("zz")]) == "c"
    stats = sequence.stats
    assert (stats.completion_tokens, stats.finish_reason, stats.prompt_tokens) == (4, "stop", 3)


def test_a_step_ends_at_a_stop_string_split_across_steps(tokenizer):
    sequence = state_for(tokenizer, stop=["\n\n"])
    assert sequence.accept(ids("Hi\n")) == "Hi"  # "\n" held back: it may start the stop string
    assert sequence.accept(ids("\nmore")) == ""
    assert (sequence.stats.completion_tokens, sequence.stats.finish_reason) == (4, "stop")


def test_the_budget_cuts_a_step_and_releases_held_back_text(tokenizer):
    sequence = state_for(tokenizer, max_new_tokens=3, stop=["xyz"])
    assert sequence.accept(ids("abx")) == "abx"  # "x" was held back (a stop string's start) until the end
    assert (sequence.stats.completion_tokens, sequence.stats.finish_reason) == (3, "length")
    assert sequence.remaining == 0


def test_stats_time_the_first_token_and_the_rest(tokenizer):
    sequence = state_for(tokenizer)
    sequence.accept(ids("a"))
    assert sequence.stats.ttft_s > 0 and sequence.stats.decode_tok_s == 0
    sequence.accept(ids("bc"))
    assert sequence.stats.decode_tok_s > 0
    sequence.close()
    assert sequence.stats.total_s >= sequence.stats.ttft_s
    assert sequence.stats.finish_reason is None  # closed early: no reason


def test_run_sequence_reuses_a_kept_cache_and_stops_at_eos(tokenizer):
    prompt = ids("Q:")
    decoder = scripted_decoder(len(prompt), [*ids("yes"), IM_END])
    state = CacheState(decoder)
    sequence = state_for(tokenizer)
    assert "".join(run_sequence(state, sequence, prompt)) == "yes"
    assert sequence.stats.finish_reason == "stop"
    assert state.tokens == [*prompt, *ids("yes")]  # the eos that ended it was never fed
    assert decoder.calls == [(0, 2), (2, 1), (3, 1), (4, 1)]


class RecordingDrafter:
    """Proposes `draft` (within the room) and records what it was asked."""

    def __init__(self, draft: list[int]) -> None:
        self.draft, self.asked = draft, []

    def propose(self, context, limit):
        self.asked.append((list(context), limit))
        return self.draft[:limit]


def test_speculation_hands_out_each_token_before_drafting_and_never_drafts_after_the_end(tokenizer):
    """The review: the loop drafted and verified before accepting its sampled token, so the first piece waited
    for a draft and the token that ended the answer still paid a verification step."""
    prompt = ids("Q:")
    decoder = scripted_decoder(len(prompt), [*ids("ab"), IM_END])
    drafter = RecordingDrafter(ids("b") + [IM_END])  # the right continuation after "a": kept whole
    sequence = state_for(tokenizer)
    pieces = run_sequence(CacheState(decoder), sequence, prompt, drafter=drafter)
    assert next(pieces) == "a" and drafter.asked == []  # "a" out before any drafting
    assert "".join(pieces) == "b"
    assert drafter.asked == [([*prompt, *ids("a")], 9)]  # once: the draft's eos ended it, no second draft
    stats = sequence.stats
    assert (stats.finish_reason, stats.completion_tokens, stats.draft_tokens, stats.accepted_tokens) == (
        "stop", 3, 2, 2)  # fmt: skip
    assert decoder.calls == [(0, 2), (2, 3)]  # the prompt, then "a" with the draft in one verify step


def test_an_answer_that_ends_at_its_first_token_drafts_nothing(tokenizer):
    prompt = ids("Q:")
    decoder = scripted_decoder(len(prompt), [IM_END])
    drafter = RecordingDrafter(ids("zz"))
    sequence = state_for(tokenizer)
    assert "".join(run_sequence(CacheState(decoder), sequence, prompt, drafter=drafter)) == ""
    assert drafter.asked == [] and decoder.calls == [(0, 2)]
    assert (sequence.stats.draft_tokens, sequence.stats.accepted_tokens) == (0, 0)


def test_stats_passed_in_are_reset_for_each_generation(tokenizer):
    """The review: a GenerationStats object reused for a second generation kept its finish_reason, which
    ended the second one after a token."""
    model = Model(random_decoder(3), tokenizer, context_length=256, eos_token_ids={ENDOFTEXT, IM_END})
    stats = GenerationStats()
    for _ in range(2):
        sequence = SequenceState.create(greedy, tokenizer, 3, 6, (), (), stats)
        text = "".join(run_sequence(CacheState(model.decoder), sequence, ids("abc")))
        assert text and (stats.completion_tokens, stats.finish_reason) == (6, "length")


def test_one_requests_failing_step_fails_only_that_request(tokenizer):
    """The review: an exception while sampling one slot's token (a grammar refusing its own forced tokens)
    went to the engine's catch-all and failed every running request."""
    model = Model(random_decoder(3), tokenizer, context_length=256, eos_token_ids={ENDOFTEXT, IM_END})
    engine = BatchEngine(model, max_batch=2)  # started once the bad request has its sampler
    try:
        good = engine.submit(ids("The sea"), SamplingConfig(), 20)
        bad = engine.submit(ids("Once"), SamplingConfig(), 20)
        calls = 0

        def failing_sampler(logits):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("the grammar refused its own forced tokens")
            return greedy(logits)

        bad.sequence.sampler = failing_sampler
        engine.start()
        with pytest.raises(SmolexportRuntimeError, match="refused its own forced tokens"):
            "".join(bad.pieces())
        text = "".join(good.pieces())
    finally:
        engine.stop()
    assert (good.stats.finish_reason, good.stats.completion_tokens) == ("length", 20)
    alone = model.generate("The sea", chat=False, max_new_tokens=20)
    assert text == alone


@pytest.mark.parametrize("max_new_tokens", [1, 5, 40])
def test_the_batch_engine_and_the_single_stream_give_the_same_text_and_stats(tokenizer, max_new_tokens):
    """Both loops drive a SequenceState: eos, stop strings and length end them the same way."""
    model = Model(random_decoder(3), tokenizer, context_length=256, eos_token_ids={ENDOFTEXT, IM_END})
    prompts = ["The sea", "Once upon", "x"]
    singles = []
    for prompt in prompts:
        text = model.generate(prompt, chat=False, max_new_tokens=max_new_tokens, stop=["e t"])
        singles.append((text, model.last_stats.completion_tokens, model.last_stats.finish_reason))
    engine = BatchEngine(model, max_batch=3).start()
    try:
        requests = [engine.submit(ids(p), SamplingConfig(), max_new_tokens, stop=["e t"]) for p in prompts]
        batched = [("".join(r.pieces()), r.stats.completion_tokens, r.stats.finish_reason) for r in requests]
    finally:
        engine.stop()
    assert batched == singles


# --- the KV cache variants --------------------------------------------------------------------------------


def test_a_plain_list_cache_is_a_growing_cache_that_truncates_by_cutting():
    arrays = [np.arange(2 * 1 * 5 * 2, dtype=np.float32).reshape(2, 1, 5, 2) for _ in range(4)]
    cache = as_kv_cache(arrays)
    assert isinstance(cache, GrowingCache) and isinstance(cache, KVCache)
    assert cache.capacity is None
    cut = cache.truncated(3)
    assert [a.shape for a in cut.host_arrays()] == [(2, 1, 3, 2)] * 4
    np.testing.assert_array_equal(cut.host_arrays()[0], arrays[0][:, :, :3])
    assert as_kv_cache(cut) is cut and as_kv_cache(None) is None


def test_cache_state_truncates_whatever_cache_the_decoder_keeps(tokenizer):
    decoder = StubDecoder(lambda token, position: one_hot(ord("a")))
    state = CacheState(decoder)
    state.reserve(8)
    state.extend(ids("hello"))
    assert isinstance(state.cache, GrowingCache) and state.cache[0].shape[2] == 5
    state.truncate(2)
    assert state.tokens == ids("he") and state.cache[0].shape[2] == 2
    state.decode(ord("y"))  # the stub asserts the cache length matches the positions it is given
    assert state.length == 3


def test_preallocated_buffers_truncate_to_themselves_and_read_out_as_views(bundled_exports):
    from smolexport_runtime import load
    from smolexport_runtime.session import KVBuffers

    model = load(bundled_exports / "fp32", providers="cpu", threads=1)
    state = CacheState(model.decoder, limit=model.context_length)
    state.reserve(16)
    state.extend(model.encode("Hello there", chat=False))
    assert isinstance(state.cache, KVBuffers) and isinstance(state.cache, KVCache)
    before = state.cache
    state.truncate(1)
    assert state.cache is before and state.length == 1
    host = state.cache.host_arrays()
    assert np.shares_memory(host[0], before.arrays[0])


def test_core_ml_cache_truncates_its_length_and_refuses_to_be_read_out():
    from smolexport_runtime.coreml import CoreMLCache
    from smolexport_runtime.errors import SmolexportRuntimeError

    cache = CoreMLCache([{"state": object(), "length": 9}])
    assert isinstance(cache, KVCache) and cache.capacity is None
    assert cache.truncated(4) is cache and cache[0]["length"] == 4
    assert cache.truncated(7)[0]["length"] == 4  # never longer than what it holds
    with pytest.raises(SmolexportRuntimeError, match="prompt cache"):
        cache.host_arrays()
