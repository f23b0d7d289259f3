"""Fitting a chat's history into the model's context, shared by the terminal and desktop chats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smolexport_runtime import Model

Message = dict[str, Any]


def fit_history(
    model: Model, messages: list[Message], reserve: int, render: Callable[[list[Message]], list] | None = None
) -> list[Message]:
    """Drops the oldest turns (never the system prompt or the newest message) until the prompt leaves
    `reserve` tokens of the context free for the answer. Renders the chat template at least once, so that a
    model without one (or a template that refuses the messages) raises ChatTemplateError here. `render`: the
    messages as the model sees them, to count (with tools: the tools' system prompt, calls and results)."""
    if model.context_length is None:
        return messages
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    limit = model.context_length - reserve
    while len(model.encode((render or list)(system + turns), chat=True)) > limit and len(turns) > 1:
        turns = turns[1:]  # the oldest question, and all that answered it (tool calls and results too)
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
    return system + turns
