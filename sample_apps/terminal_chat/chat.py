"""A multi-turn chat in the terminal over a smolexport export, on `smolexport_runtime` only.

    from smolexport_runtime import load
    from sample_apps.terminal_chat.chat import chat
    chat(load("exports/smollm2-135m-int4"), system="Be brief.")

Commands: /reset starts a new conversation, /system TEXT sets the system prompt (and resets), /exit quits
(so does end of input, Ctrl-D). Ctrl-C stops the answer being written and keeps what was written so far.

Each turn passes the whole history to `model.stream`, which reuses the cached prefix and prefills only the
new tokens. With `prompt_cache=FILE`, the system prompt's keys and values are loaded from FILE at start (or
computed and saved there), so the first answer does not pay for a long system prompt either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

from smolexport_runtime import Model, SmolexportRuntimeError

HELP = "commands: /reset new conversation, /system TEXT set the system prompt, /exit quit; Ctrl-C stops an answer"


def fit_history(model: Model, messages: list[dict[str, str]], reserve: int) -> list[dict[str, str]]:
    """Drops the oldest turns (never the system prompt or the newest message) until the prompt leaves
    `reserve` tokens of the context free for the answer."""
    if model.context_length is None:
        return messages
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    limit = model.context_length - reserve
    while len(turns) > 1 and len(model.encode(system + turns, chat=True)) > limit:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user message and the answer to it
    return system + turns


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
) -> list[dict[str, str]]:
    """Runs the chat until /exit or end of input; returns the conversation."""
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
    history: list[dict[str, str]] = []
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
        if prompt_cache and system_prompt:
            try:
                model.warm_start(prompt_cache, [{"role": "system", "content": system_prompt}])
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
        answer = []
        try:  # fit_history renders the chat template, which may refuse (e.g. a model without one)
            messages = fit_history(model, messages, reserve)
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
        finally:
            pieces.close()  # type: ignore[attr-defined]
        say()
        history[:] = [m for m in messages if m["role"] != "system"]
        history.append({"role": "assistant", "content": "".join(answer)})
    return history


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
    args = parser.parse_args()
    chat(load(args.model_dir), system=args.system, temperature=args.temperature, prompt_cache=args.prompt_cache)
