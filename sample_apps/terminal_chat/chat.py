"""A multi-turn chat in the terminal over a smolexport export, on `smolexport_runtime` only.

    from smolexport_runtime import load
    from sample_apps.terminal_chat.chat import chat
    chat(load("exports/smollm2-135m-int4"), system="Be brief.")

Commands: /reset starts a new conversation, /system TEXT sets the system prompt (and resets), /exit quits
(so does end of input, Ctrl-D). Ctrl-C stops the answer being written and keeps what was written so far.

Each turn passes the whole history to `model.stream`, which reuses the cached prefix and prefills only the
new tokens. With `tools=True` the model is offered a calculator and the current time (tool_choice "auto",
sample_apps/builtin_tools.py): a call it makes is shown, run, its result shown and sent back, and its answer
streams. With `prompt_cache=FILE`, the system prompt's keys and values are loaded from FILE at start (or
computed and saved there), so the first answer does not pay for a long system prompt either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

from smolexport_runtime import Model, SmolexportRuntimeError

from ..builtin_tools import render, stream_with_tools
from ..chat_history import fit_history

HELP = "commands: /reset new conversation, /system TEXT set the system prompt, /exit quit; Ctrl-C stops an answer"


def chat(
    model: Model,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    read: Callable[[str], str] | None = None,
    prompt_cache: str | Path | None = None,
    tools: bool = False,
    tool_choice: Any = "auto",
) -> list[dict[str, Any]]:
    """Runs the chat until /exit or end of input; returns the conversation. tools=True offers the built-in
    tools (sample_apps/builtin_tools.py) under `tool_choice`."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if read is None:
        if stdin.isatty():
            with suppress(ImportError):
                import readline  # noqa: F401  # line editing and history for input()
            read = input
        else:
            read = _line_reader(stdin, stdout)
    system_prompt = system
    history: list[dict[str, Any]] = []
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    reserve = min(max_new_tokens, (model.context_length or max_new_tokens * 4) // 4)

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    def warm_start() -> None:
        if prompt_cache and (system_prompt or tools):  # with tools, the tools' system prompt is long
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            try:
                model.warm_start(prompt_cache, render(system) if tools else system)
            except (SmolexportRuntimeError, OSError) as exc:  # a cache is an optimisation: chat without it
                say(f"(prompt cache not used: {exc})")

    say(HELP)
    warm_start()
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            say()
            break
        except UnicodeDecodeError:
            say("error: that line is not valid UTF-8 text (check the terminal's encoding)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            say("(new conversation)")
            continue
        if text == "/system" or text.startswith("/system "):
            system_prompt = text[len("/system") :].strip() or None
            history.clear()
            say(f"(system prompt {'set' if system_prompt else 'cleared'}; new conversation)")
            warm_start()
            continue
        if text in ("/help", "/?"):
            say(HELP)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
        answer: list[str] = []
        added: list[dict[str, Any]] = []  # with tools: the calls and their results, before the answer
        try:  # fit_history renders the chat template, which may refuse (e.g. a model without one)
            messages = fit_history(model, messages, reserve, render if tools else None)
            if tools:
                pieces = _tool_turn(model, messages, added, tool_choice, options, say)
            else:
                pieces = model.stream(messages, **options)
        except SmolexportRuntimeError as exc:
            history.pop()
            say(f"error: {exc}")
            continue
        try:
            for piece in pieces:
                answer.append(piece)
                say(piece, end="")
        except KeyboardInterrupt:
            say(" [stopped]", end="")
        except SmolexportRuntimeError as exc:  # with tools, a turn runs several generations
            say("\nerror: " if answer else "error: ", end="")
            say(str(exc))
            history.pop()
            continue
        finally:
            pieces.close()  # type: ignore[attr-defined]
        say()
        history[:] = [m for m in messages if m["role"] != "system"]
        history += added
        history.append({"role": "assistant", "content": "".join(answer)})
    return history


def _tool_turn(
    model: Model,
    messages: list[dict[str, Any]],
    added: list[dict[str, Any]],
    tool_choice: Any,
    options: dict[str, Any],
    say: Callable[..., None],
) -> Generator[str, None, None]:
    """The answer's text pieces, as `model.stream` gives them; tool calls and results are shown on the way."""
    events = stream_with_tools(model, messages, added, tool_choice=tool_choice, **options)
    try:
        for event in events:
            if event.kind == "text":
                yield event.text
            elif event.kind == "call":
                say(f"[tool call] {event.text}")
            else:
                say(f"[tool result] {event.text}")
    finally:
        events.close()


def _line_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str]:
    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        stdout.write(line if line.endswith("\n") else line + "\n")  # echo piped input, for a readable transcript
        return line

    return read


if __name__ == "__main__":
    import argparse

    from smolexport_runtime import load

    parser = argparse.ArgumentParser(description="Chat with a smolexport export in the terminal.")
    parser.add_argument("model_dir")
    parser.add_argument("--system", default=None)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--prompt-cache", default=None, help="file for the system prompt's KV cache")
    parser.add_argument("--tools", action="store_true", help="offer a calculator and the current time")
    args = parser.parse_args()
    chat(
        load(args.model_dir),
        system=args.system,
        temperature=args.temperature,
        prompt_cache=args.prompt_cache,
        tools=args.tools,
    )
