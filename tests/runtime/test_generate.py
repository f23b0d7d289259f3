"""The generation loop against stub decoders: stopping, limits, context checks, determinism, stats."""

import numpy as np
import pytest
from smolexport_runtime import ContextLengthError, Model, SamplingConfig, make_sampler
from smolexport_runtime.generate import (
    GenerationStats,
    decode_one_token,
    generate_tokens,
    position_ids_from_mask,
    prefill,
)
from smolexport_runtime.sequence import stream_generate

from .conftest import ENDOFTEXT, IM_END, ids, random_decoder, scripted_decoder

PROMPT = "Q:"


def scripted_model(tokenizer, script, context_length=64):
    decoder = scripted_decoder(len(ids(PROMPT)), script)
    return Model(decoder, tokenizer, context_length=context_length, eos_token_ids={ENDOFTEXT, IM_END})


def test_stops_on_eos_without_showing_it(tokenizer):
    model = scripted_model(tokenizer, [*ids("Paris"), IM_END, *ids("junk")])
    pieces = list(model.stream(PROMPT, chat=False))
    assert pieces == list("Paris")
    stats = model.last_stats
    assert (stats.prompt_tokens, stats.completion_tokens, stats.finish_reason) == (2, 6, "stop")
    # Prefill, then one decode step per token "Paris" (the last one samples eos); none after eos.
    assert model.decoder.calls == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]


def test_stop_string_split_across_tokens(tokenizer):
    model = scripted_model(tokenizer, ids("Hello\n\nWorld"))
    assert model.generate(PROMPT, chat=False, stop=["\n\n"]) == "Hello"
    assert model.last_stats.finish_reason == "stop"
    assert model.last_stats.completion_tokens == 7  # "Hello" + both newlines


def test_max_new_tokens(tokenizer):
    model = scripted_model(tokenizer, ids("abcdefgh"))
    assert model.generate(PROMPT, chat=False, max_new_tokens=3) == "abc"
    assert model.last_stats.finish_reason == "length"
    assert model.last_stats.completion_tokens == 3
    assert len(model.decoder.calls) == 3  # prefill + 2 decodes: the last token needs no forward
    assert model.generate(PROMPT, chat=False, max_new_tokens=0) == ""


def test_prompt_longer_than_context_raises_at_the_call(tokenizer):
    model = scripted_model(tokenizer, ids("abc"), context_length=10)
    with pytest.raises(ContextLengthError, match=r"11 tokens .* context length is 10"):
        model.stream("x" * 11, chat=False)  # raised before iterating


def test_completion_is_clamped_to_the_context(tokenizer):
    model = scripted_model(tokenizer, ids("abcdefgh"), context_length=6)
    assert model.generate(PROMPT, chat=False, max_new_tokens=100) == "abcd"
    assert model.last_stats.finish_reason == "length"


def test_utf8_across_tokens_streams_whole_characters(tokenizer):
    model = scripted_model(tokenizer, [*ids("né😀!"), IM_END])
    pieces = list(model.stream(PROMPT, chat=False))
    assert pieces == ["n", "é", "😀", "!"]


def test_greedy_follows_the_argmax_chain(tokenizer):
    decoder = random_decoder()
    model = Model(decoder, tokenizer, context_length=64)
    text = model.generate("a", chat=False, greedy=True, max_new_tokens=5)
    token = ord("a")
    expected = []
    for _ in range(5):
        token = int(np.argmax(decoder.next_logits(token, 0)))
        expected.append(token)
    assert text == tokenizer.decode(expected)


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = Model(random_decoder(), tokenizer, context_length=128)

    def run(seed):
        return model.generate("a", chat=False, temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=30)

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_sampled_tokens_stay_inside_top_k(tokenizer):
    decoder = random_decoder()
    sampler = make_sampler(SamplingConfig(temperature=1.5, top_k=3, seed=0))
    tokens = list(generate_tokens(decoder, ids("a"), sampler, 40))
    previous = [ord("a"), *tokens[:-1]]
    for prev, token in zip(previous, tokens, strict=True):
        top3 = np.argsort(decoder.next_logits(prev, 0))[-3:]
        assert token in top3


def test_prefill_in_chunks_matches_one_call(tokenizer):
    prompt = ids("a longer prompt")
    whole_logits, whole_cache, n = prefill(random_decoder(), prompt)
    decoder = random_decoder()
    logits, cache, m = prefill(decoder, prompt, chunk_size=4)
    assert n == m == len(prompt)
    assert decoder.calls == [(0, 4), (4, 4), (8, 4), (12, 3)]
    np.testing.assert_array_equal(logits, whole_logits)
    for a, b in zip(cache, whole_cache, strict=True):
        np.testing.assert_array_equal(a, b)
    _, cache, length = decode_one_token(decoder, 5, cache, m)
    assert length == m + 1 and cache[0].shape[2] == m + 1


def test_prefill_takes_the_decoders_chunk_size(tokenizer):
    prompt = ids("a longer prompt")
    decoder = random_decoder()
    prefill(decoder, prompt)
    assert decoder.calls == [(0, len(prompt))]  # no prefill_chunk: PREFILL_CHUNK (512) covers it
    decoder = random_decoder()
    decoder.prefill_chunk = 6
    prefill(decoder, prompt)
    assert decoder.calls == [(0, 6), (6, 6), (12, 3)]


def test_empty_prompt_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        stream_generate(random_decoder(), tokenizer, [], make_sampler(SamplingConfig()), max_new_tokens=3)


def test_stats_are_filled(tokenizer):
    stats = GenerationStats()
    decoder = scripted_decoder(1, ids("abcdef"))
    stream = stream_generate(decoder, tokenizer, [1], make_sampler(SamplingConfig()), max_new_tokens=6, stats=stats)
    assert "".join(stream) == "abcdef"
    assert stats.ttft_s > 0 and stats.decode_tok_s > 0 and stats.total_s >= stats.ttft_s
    assert (stats.prompt_tokens, stats.completion_tokens, stats.finish_reason) == (1, 6, "length")


def test_position_ids_from_left_padded_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask, 5), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(position_ids_from_mask(mask, 1), [[2], [4]])


def test_prefill_chunks_never_end_in_a_single_token():
    from smolexport_runtime.generate import prefill_chunks

    for n in range(1, 300):
        chunks = prefill_chunks(list(range(n)), 128)
        assert [t for c in chunks for t in c] == list(range(n))
        assert all(1 <= len(c) <= 128 for c in chunks)
        small = prefill_chunks(list(range(n)), 2)
        assert [t for c in small for t in c] == list(range(n)) and (n == 1 or min(map(len, small)) >= 2)
        assert n == 1 or len(chunks[-1]) > 1


def test_decode_masks_are_views_of_one_array():
    from smolexport_runtime.generate import ones_mask

    a, b = ones_mask(10), ones_mask(11)
    assert a.shape == (1, 10) and b.shape == (1, 11) and a.all() and b.all()
    assert np.shares_memory(a, b) and not b.flags.writeable
