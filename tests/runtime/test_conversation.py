"""Prefix reuse: a kept KV cache must give what a fresh prefill gives, whatever happened to the last call.

A tiny random Llama exported both ways (GroupQueryAttention with its shared buffer, and the standard-ops graph
whose cache grows by copying), checked against a fresh cache on every turn: logits within float tolerance,
greedy continuations identical, and the cache holding exactly the tokens it claims.
"""

from __future__ import annotations

import numpy as np
import pytest
from smolexport_runtime import SmolexportRuntimeError, kv_state, load
from smolexport_runtime.conversation import ConversationBusyError, PromptCacheError
from smolexport_runtime.generate import prefill

# The tiny tokenizer's words are w3..w319 (tests/conftest.py).
SYSTEM = {"role": "system", "content": "w10 w11 w12 w13 w14 w15 w16 w17"}
QUESTIONS = ["w20 w21 w22", "w30 w31 w32 w33", "w40 w41", "w50 w51 w52", "w60"]


@pytest.fixture(scope="module")
def export(llama_export):
    return llama_export


@pytest.fixture
def model(export):
    return load(export, providers=["cpu"], threads=1)


def fresh_logits(model, ids):
    logits, _, _ = prefill(model.decoder, ids)
    return logits


def fresh_answer(export, messages, **kwargs):
    """The same request on a newly loaded model: nothing cached."""
    return load(export, providers=["cpu"], threads=1, verify=False).generate(messages, **kwargs)


def test_turns_reuse_the_history_and_answer_as_a_fresh_model(model, export):
    history = [SYSTEM]
    for turn, question in enumerate(QUESTIONS):
        history.append({"role": "user", "content": question})
        answer = model.generate(history, max_new_tokens=12)
        stats = model.last_stats
        assert answer == fresh_answer(export, history, max_new_tokens=12)
        if turn:
            # Everything up to the previous answer's last fed token is reused; at least the old history is.
            previous = model.encode(history[:-2], add_generation_prompt=False)
            assert stats.cached_tokens >= len(previous)
            assert stats.cached_tokens < stats.prompt_tokens
        history.append({"role": "assistant", "content": answer})
        # The cache holds exactly its tokens: its next-token logits match a fresh prefill of them.
        state = model.default_conversation.state
        cached = np.array(state.tokens)
        probe = model.default_conversation.state.extend([5])
        np.testing.assert_allclose(probe, fresh_logits(model, [*cached, 5]), atol=1e-4, rtol=1e-4)


def test_a_diverging_prompt_truncates_to_the_common_part(model):
    model.generate("w5 w6 w7 w8 w9 w10", chat=False, max_new_tokens=4)
    ids = model.encode("w5 w6 w7 w99 w100", chat=False)
    state = model.default_conversation.state
    assert kv_state.common_prefix(state.tokens, ids) == 3
    model.generate("w5 w6 w7 w99 w100", chat=False, max_new_tokens=1)
    assert model.last_stats.cached_tokens == 3
    assert state.tokens == ids  # the common prefix, then the new prompt's rest
    np.testing.assert_allclose(state.extend([7]), fresh_logits(model, [*ids, 7]), atol=1e-4, rtol=1e-4)


def test_a_stop_string_cut_answer_is_reused_exactly(model, export):
    history = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    full = fresh_answer(export, history, max_new_tokens=12)
    stop = full[3:5]
    cut = model.generate(history, max_new_tokens=12, stop=stop)
    assert cut == full[: full.index(stop)]
    history += [{"role": "assistant", "content": cut}, {"role": "user", "content": QUESTIONS[1]}]
    assert model.generate(history, max_new_tokens=12) == fresh_answer(export, history, max_new_tokens=12)
    assert model.last_stats.cached_tokens > 0


def test_closing_a_stream_mid_way_keeps_a_true_cache(model, export):
    history = [SYSTEM, {"role": "user", "content": QUESTIONS[2]}]
    pieces = model.stream(history, max_new_tokens=12)
    partial = next(pieces) + next(pieces)
    pieces.close()
    history += [{"role": "assistant", "content": partial}, {"role": "user", "content": QUESTIONS[3]}]
    assert model.generate(history, max_new_tokens=12) == fresh_answer(export, history, max_new_tokens=12)
    assert model.last_stats.cached_tokens > 0


class FailingDecoder:
    """Raises on the n-th forward pass, then behaves."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.inner.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_error_mid_generation_leaves_a_usable_cache(model, export):
    history = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    model.generate(history, max_new_tokens=6)
    model.decoder = FailingDecoder(model.decoder, fail_at=3)
    model.default_conversation.state.decoder = model.decoder
    history2 = [*history, {"role": "assistant", "content": "ok"}, {"role": "user", "content": QUESTIONS[1]}]
    with pytest.raises(RuntimeError, match="injected"):
        model.generate(history2, max_new_tokens=12)
    assert model.generate(history2, max_new_tokens=12) == fresh_answer(export, history2, max_new_tokens=12)


def test_dropping_old_turns_still_reuses_the_system_prompt(model, export):
    history = [SYSTEM]
    for question in QUESTIONS[:3]:
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": model.generate(history, max_new_tokens=8)})
    trimmed = [SYSTEM, *history[3:], {"role": "user", "content": QUESTIONS[3]}]  # the first exchange dropped
    answer = model.generate(trimmed, max_new_tokens=8)
    assert model.last_stats.cached_tokens >= len(model.encode([SYSTEM], add_generation_prompt=False)) - 1
    assert answer == fresh_answer(export, trimmed, max_new_tokens=8)


def test_the_buffer_grows_past_its_first_capacity(model, export, monkeypatch):
    monkeypatch.setattr(kv_state, "CAPACITY_STEP", 16)
    monkeypatch.setattr(kv_state, "CPU_FIRST_CAPACITY", 16)
    history = [SYSTEM]
    capacities = []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        answer = model.generate(history, max_new_tokens=10)
        capacities.append(model.default_conversation.state.capacity)
        history.append({"role": "assistant", "content": answer})
    assert answer == fresh_answer(export, history[:-1], max_new_tokens=10)
    if capacities[0] is not None:  # the shared-buffer graph: grown, never past the context length
        assert capacities[-1] > capacities[0] and capacities[-1] <= model.context_length


def test_conversations_are_independent(model, export):
    a, b = model.conversation(), model.conversation()
    ha = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    hb = [{"role": "user", "content": QUESTIONS[4]}]
    ra1, rb1 = a.generate(ha, max_new_tokens=8), b.generate(hb, max_new_tokens=8)
    ha += [{"role": "assistant", "content": ra1}, {"role": "user", "content": QUESTIONS[1]}]
    hb += [{"role": "assistant", "content": rb1}, {"role": "user", "content": QUESTIONS[2]}]
    assert a.generate(ha, max_new_tokens=8) == fresh_answer(export, ha, max_new_tokens=8)
    assert b.generate(hb, max_new_tokens=8) == fresh_answer(export, hb, max_new_tokens=8)
    assert a.last_stats.cached_tokens > 0 and b.last_stats.cached_tokens > 0


def test_one_generation_at_a_time_per_conversation(model):
    conversation = model.conversation()
    first = conversation.stream("w7 w8", chat=False, max_new_tokens=8)
    next(first)
    with pytest.raises(ConversationBusyError, match="already generating"):
        conversation.generate("w9", chat=False)
    first.close()
    assert conversation.generate("w9", chat=False, max_new_tokens=2) is not None
    # The model's own conversation serves a concurrent second stream from a fresh cache instead.
    outer = model.stream("w7 w8", chat=False, max_new_tokens=8)
    next(outer)
    assert model.generate("w7 w8", chat=False, max_new_tokens=4) == load(
        model.manifest.folder, providers=["cpu"], verify=False
    ).generate("w7 w8", chat=False, max_new_tokens=4)
    outer.close()


def test_a_prompt_cache_file_warms_a_new_process(model, export, tmp_path):
    path = tmp_path / "system.npz"
    history = [SYSTEM, {"role": "user", "content": QUESTIONS[1]}]
    assert model.warm_start(path, [SYSTEM]) is False  # computed and saved
    saved = len(model.encode([SYSTEM], add_generation_prompt=False))
    other = load(export, providers=["cpu"], threads=1, verify=False)  # a new process, as far as caches go
    assert other.warm_start(path, [SYSTEM]) is True
    assert other.default_conversation.cached_tokens == saved
    answer = other.generate(history, max_new_tokens=10)
    assert other.last_stats.cached_tokens == saved
    assert answer == fresh_answer(export, history, max_new_tokens=10)
    # A changed system prompt does not match the file: recomputed, and the file rewritten.
    changed = [{"role": "system", "content": "w200 w201"}]
    assert other.warm_start(path, changed) is False and other.warm_start(path, changed) is True


def test_a_prompt_cache_from_another_export_or_damaged_is_refused(model, tmp_path, tiny_models):
    from smolexport.onnx.export import OnnxExportOptions, export_onnx

    path = tmp_path / "system.npz"
    model.default_conversation.save_prefix(path, [SYSTEM])
    src, _ = tiny_models["gqa_tied"]
    other_export = tmp_path / "other"
    export_onnx(str(src), other_export, OnnxExportOptions(quant="fp32"))
    other = load(other_export, providers=["cpu"], verify=False)
    with pytest.raises(PromptCacheError, match="saved for another export"):
        other.default_conversation.load_prefix(path)
    np.save(tmp_path / "array.npy", np.zeros(3))  # a readable numpy file, not a prompt cache
    with pytest.raises(PromptCacheError, match="not a readable prompt cache"):
        model.default_conversation.load_prefix(tmp_path / "array.npy")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PromptCacheError, match="not a readable prompt cache"):
        model.default_conversation.load_prefix(path)
    with pytest.raises(SmolexportRuntimeError, match="no prompt cache file"):
        model.default_conversation.load_prefix(tmp_path / "missing.npz")


def test_decode_steps_reuse_one_io_binding(model):
    from smolexport_runtime.generate import decode_one_token

    logits, cache, length = prefill(model.decoder, [5, 6, 7], capacity=32)
    if not hasattr(cache, "binding"):
        pytest.skip("the standard-ops graph grows its cache by copying: a binding per step")
    binding = cache.binding
    for token in (8, 9, 10):
        logits, cache, length = decode_one_token(model.decoder, token, cache, length)
        assert cache.binding is binding
    np.testing.assert_allclose(logits, fresh_logits(model, [5, 6, 7, 8, 9, 10]), atol=1e-4, rtol=1e-4)
