"""Incremental detokenization: pieces must concatenate to the right text, never show a broken UTF-8
character, and never show any part of a stop string."""

import pytest
from smolexport_runtime.detokenize import StreamingDetokenizer, find_stop, partial_stop_length

from .conftest import IM_START, ids


def feed(tokenizer, token_ids, stop=()):
    detok = StreamingDetokenizer(tokenizer, stop)
    pieces = [detok.add(t) for t in token_ids]
    pieces.append(detok.finish())
    return pieces, detok


def test_multibyte_characters_are_held_until_complete(tokenizer):
    pieces, _ = feed(tokenizer, ids("a😀é b"))
    assert "".join(pieces) == "a😀é b"
    assert not any("\ufffd" in p for p in pieces)
    # One piece per completed character: the emoji's first three bytes yield nothing.
    assert pieces[:6] == ["a", "", "", "", "😀", ""]


def test_truncated_character_is_flushed_at_the_end(tokenizer):
    pieces, _ = feed(tokenizer, ids("ok") + ids("😀")[:2])
    assert pieces[:4] == ["o", "k", "", ""]
    assert pieces[-1] == "\ufffd"  # generation ended mid-character: show that honestly


def test_special_tokens_are_not_shown(tokenizer):
    pieces, _ = feed(tokenizer, [*ids("hi"), IM_START, *ids("!")])
    assert "".join(pieces) == "hi!"


def test_stop_string_split_across_tokens_is_not_yielded(tokenizer):
    pieces, detok = feed(tokenizer, ids("Hello\n\nworld"), stop=["\n\n"])
    assert "".join(pieces) == "Hello"
    assert detok.stopped


def test_possible_stop_prefix_is_held_then_released(tokenizer):
    detok = StreamingDetokenizer(tokenizer, ["lo!"])
    out = [detok.add(t) for t in ids("Hello there")]
    # Only the tail that could still begin "lo!" is held: the first "l" goes once a second "l" follows it.
    assert out[:5] == ["H", "e", "", "l", ""]
    assert out[5] == "lo "  # the space rules the stop out
    assert "".join(out) + detok.finish() == "Hello there"
    assert not detok.stopped


def test_held_prefix_is_flushed_at_the_end(tokenizer):
    pieces, detok = feed(tokenizer, ids("say lo"), stop=["lo!"])
    assert "".join(pieces) == "say lo" and pieces[-1] == "lo"
    assert not detok.stopped


def test_earliest_of_several_stops_wins(tokenizer):
    pieces, _ = feed(tokenizer, ids("abc END xyz STOP"), stop=["STOP", " END"])
    assert "".join(pieces) == "abc"


def test_stop_inside_a_multi_character_token():
    class WordTokenizer:  # a "token" that contains the whole stop string and more
        def decode(self, token_ids, skip_special_tokens=True):
            return "".join(["Hi", " there.\n\nBye"][i] for i in token_ids)

    detok = StreamingDetokenizer(WordTokenizer(), ["\n\n"])
    assert detok.add(0) == "Hi"
    assert detok.add(1) == " there."
    assert detok.stopped and detok.finish() == ""


def test_helpers():
    assert find_stop("abcabc", ["ca", "bc"]) == 1
    assert find_stop("abc", ["x"]) is None
    assert find_stop("abcabc", ["ab"], start=1) == 3
    assert partial_stop_length("hello wor", ["world"]) == 3
    assert partial_stop_length("hello world", ["world"]) == 0  # a full match is find_stop's job
    assert partial_stop_length("xx", ["xxx"], start=1) == 1


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError):
        StreamingDetokenizer(tokenizer, [""])
