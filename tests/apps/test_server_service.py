"""The server's Generation (sample_apps/openai_server/service.py) on stand-in engine requests: under
tool_choice "auto", the trained empty call list is replaced by a text answer. No model, no HTTP."""

from __future__ import annotations

import threading

from smolexport_runtime.generate import GenerationStats

from sample_apps.openai_server.service import NO_CALLS, Generation


class Submitted:
    """A BatchRequest stand-in: its pieces, its stats, done once read."""

    def __init__(self, pieces: list[str]) -> None:
        self._pieces = pieces
        self.stats = GenerationStats(prompt_tokens=9, completion_tokens=len(pieces), finish_reason="stop")
        self.done = threading.Event()
        self.cancelled = False

    def pieces(self):
        yield from self._pieces
        self.done.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.done.set()


class Service:
    def __init__(self) -> None:
        self.booked: list[tuple[Submitted, bool]] = []

    def book(self, submitted, cancelled: bool) -> None:
        self.booked.append((submitted, cancelled))


def generation(first: list[str], then: list[str] | None):
    service, follow_ups = Service(), []

    def follow_up():
        follow_ups.append(Submitted(then))
        return follow_ups[-1]

    return Generation(service, Submitted(first), follow_up if then is not None else None), service, follow_ups


def test_the_empty_call_list_is_replaced_by_a_text_answer():
    pieces = ["<tool_call>", "[", "]", "</tool_call>"]
    assert "".join(pieces) == NO_CALLS
    answer, service, follow_ups = generation(pieces, ["The capital", " is Paris."])
    assert list(answer) == ["The capital", " is Paris."]
    assert len(follow_ups) == 1
    assert answer.stats.completion_tokens == 4 + 2  # usage counts both answers' tokens
    answer.close()
    assert [cancelled for _, cancelled in service.booked] == [False, False]


def test_calls_and_text_pass_unchanged():
    call = ["<tool_call>", "[", '{"name": "f", "arguments": {}}', "]</tool_call>"]
    for pieces in (call, ["Hello", " there"], ["<tool_call>", "["]):  # the last one: cut short by max_tokens
        answer, _, follow_ups = generation(pieces, ["never"])
        assert "".join(answer) == "".join(pieces)
        assert follow_ups == []
        assert answer.stats.completion_tokens == len(pieces)


def test_without_a_follow_up_the_empty_list_stays():
    answer, _, _ = generation(["<tool_call>", "[]</tool_call>"], None)
    assert "".join(answer) == NO_CALLS


def test_a_client_that_left_starts_no_follow_up():
    """The client leaves after the empty list was generated (its request is done) but before the answer
    that replaces it was submitted."""
    answer, service, follow_ups = generation(["<tool_call>", "[", "]</tool_call>"], ["never"])
    first = answer._submitted
    read = first.pieces

    def pieces_then_leave():
        yield from read()
        answer.cancel()  # done already: not counted as abandoned, but nothing may start after it

    first.pieces = pieces_then_leave
    answer._pieces = first.pieces()
    assert list(answer) == []
    assert follow_ups == []
    assert service.booked == [(first, False)]
