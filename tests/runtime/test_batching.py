"""The batching engine: requests decoded together must answer exactly as each does alone.

A tiny random Llama exported with GroupQueryAttention (batched rows of one shared buffer) and with standard ops
(slots decoded one after another), so both of the engine's paths are checked against a fresh `Model.generate`.
"""

from __future__ import annotations

import time

import pytest
from smolexport_runtime import SamplingConfig, load
from smolexport_runtime.batching import BatchEngine, QueueFullError
from smolexport_runtime.errors import ContextLengthError

PROMPTS = ["w10 w11", "w20 w21 w22 w23 w24 w25 w26", "w30", "w40 w41 w42 w43", "w50 w51 w52"]


@pytest.fixture(scope="module")
def export(llama_export):
    return llama_export


@pytest.fixture
def engine(export):
    model = load(export, providers=["cpu"], threads=1, verify=False)
    engine = BatchEngine(model, max_batch=4, max_queue=8, slots=6).start()
    yield engine
    engine.stop()


def alone(export, prompt, **kwargs):
    return load(export, providers=["cpu"], threads=1, verify=False).generate(prompt, **kwargs)


def collect(request) -> str:
    return "".join(request.pieces())


def test_the_batched_path_is_taken_where_the_graph_allows_it(engine, export):
    assert engine.batched == export.parent.name.startswith("llama-fused")


def test_concurrent_greedy_requests_answer_as_alone(engine, export):
    model = engine.model
    requests = [engine.submit(model.encode(p), max_new_tokens=16) for p in PROMPTS]  # 5 > max_batch: one waits
    texts = [collect(r) for r in requests]
    assert texts == [alone(export, p, max_new_tokens=16) for p in PROMPTS]
    assert all(r.stats.finish_reason in ("stop", "length") for r in requests)
    if engine.batched:
        assert engine.steps < sum(r.stats.completion_tokens for r in requests) - len(requests)


def test_sampling_and_stop_strings_are_per_request(engine, export):
    model = engine.model
    sampled = SamplingConfig(temperature=0.9, top_p=0.95, seed=7)
    expected_sampled = alone(export, PROMPTS[0], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    expected_greedy = alone(export, PROMPTS[1], max_new_tokens=12)
    stop = expected_greedy[4:6]
    a = engine.submit(model.encode(PROMPTS[0]), sampled, max_new_tokens=12)
    b = engine.submit(model.encode(PROMPTS[1]), max_new_tokens=12, stop=[stop])
    assert collect(a) == expected_sampled
    assert collect(b) == expected_greedy[: expected_greedy.index(stop)]
    assert b.stats.finish_reason == "stop"


def test_a_follow_up_reuses_its_slot_prefix(engine, export):
    model = engine.model
    history = [{"role": "user", "content": PROMPTS[1]}]
    first = collect(engine.submit(model.encode(history), max_new_tokens=8))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": PROMPTS[2]}]
    follow_up = engine.submit(model.encode(history), max_new_tokens=8)
    assert collect(follow_up) == alone(export, history, max_new_tokens=8)
    assert follow_up.stats.cached_tokens >= len(model.encode(history[:1]))


def test_cancel_frees_the_slot_at_once(engine):
    model = engine.model
    context = model.context_length
    request = engine.submit(model.encode(PROMPTS[0]), max_new_tokens=context)
    pieces = request.pieces()
    next(pieces)
    request.cancel()
    assert request.done.wait(5)
    assert engine.running == 0 and request.stats.finish_reason is None
    assert request.stats.completion_tokens < context // 2


def test_a_client_that_leaves_while_queued_is_dropped(export):
    model = load(export, providers=["cpu"], threads=1, verify=False)
    engine = BatchEngine(model, max_batch=1, max_queue=1)  # not started: nothing runs, requests queue
    first = engine.submit(model.encode(PROMPTS[0]), max_new_tokens=4)
    with pytest.raises(QueueFullError, match="waiting already"):
        engine.submit(model.encode(PROMPTS[1]), max_new_tokens=4)
    gone = iter(first.pieces(poll=lambda: True, interval=0.01))
    assert list(gone) == [] and first.cancelled
    engine.start()
    try:
        assert first.done.wait(5) and engine.waiting == 0 and first.stats.completion_tokens == 0
    finally:
        engine.stop()


def test_prompts_that_do_not_fit_are_refused_at_submit(engine):
    with pytest.raises(ContextLengthError):
        engine.submit([5] * engine.model.context_length, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], max_new_tokens=4)


def test_a_failing_step_fails_its_requests_not_the_engine(engine, export):
    model = engine.model
    real_forward = model.decoder.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real_forward(*args, **kwargs)

    model.decoder.forward = flaky
    try:
        failed = engine.submit(model.encode(PROMPTS[3]), max_new_tokens=10)
        with pytest.raises(Exception, match="injected"):
            collect(failed)
        time.sleep(0.05)
        assert collect(engine.submit(model.encode(PROMPTS[3]), max_new_tokens=10)) == alone(
            export, PROMPTS[3], max_new_tokens=10
        )
    finally:
        del model.decoder.forward


def test_an_idle_slot_keeps_its_prefix_while_higher_rows_decode(engine, export):
    """A finished conversation's slot sits inside the batch's range while others decode (it is fed a filler
    token each step); its follow-up must still find its prefix intact."""
    model = engine.model
    first_prompt = "w60 w61 w62 w63 w64 w65"
    first = collect(engine.submit(model.encode(first_prompt, chat=False), max_new_tokens=6))
    others = [engine.submit(model.encode(p, chat=False), max_new_tokens=12) for p in PROMPTS[1:3]]
    rows = {s.row for s in engine.slots if s.request is not None}
    for other in others:
        collect(other)
    follow_prompt = f"{first_prompt} {first} w70"
    follow_up = engine.submit(model.encode(follow_prompt, chat=False), max_new_tokens=8)
    assert collect(follow_up) == alone(export, follow_prompt, chat=False, max_new_tokens=8)
    assert follow_up.stats.cached_tokens >= 6
    if engine.batched:
        assert 0 not in rows  # the others ran above row 0, which held the first conversation


def test_stopping_the_engine_ends_every_request(export):
    model = load(export, providers=["cpu"], threads=1, verify=False)
    engine = BatchEngine(model, max_batch=1, max_queue=4).start()
    running = engine.submit(model.encode(PROMPTS[0]), max_new_tokens=model.context_length)
    queued = engine.submit(model.encode(PROMPTS[1]), max_new_tokens=4)
    next(running.pieces())
    engine.stop()
    assert running.done.wait(5) and queued.done.wait(5)
    for request in (running, queued):
        with pytest.raises(Exception, match="stopped"):
            collect(request)
    with pytest.raises(Exception, match="engine is stopped"):
        engine.submit(model.encode(PROMPTS[0]), max_new_tokens=4)


def test_bad_requests_fail_the_caller_not_the_engine(engine, export):
    model = engine.model
    ids = model.encode(PROMPTS[0])
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        engine.submit(ids, max_new_tokens=0)
    with pytest.raises(ValueError):
        engine.submit(ids, SamplingConfig(temperature=0.7, seed=-1), max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty"):
        engine.submit(ids, max_new_tokens=4, stop=[""])
    # A string is one stop string, not a set of characters; the engine still serves.
    full = alone(export, PROMPTS[1], max_new_tokens=12)
    stop = full[3:6]
    assert collect(engine.submit(model.encode(PROMPTS[1]), max_new_tokens=12, stop=stop)) == full[: full.index(stop)]
