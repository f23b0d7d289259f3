"""`smolexport chat` (driven through stdin) and `smolexport serve` (a real process), and the promise that the
apps run without torch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from smolexport.cli import main

from .conftest import REPO

SYSTEM = "w9 w10"


def chat(args, stdin):
    return CliRunner().invoke(main, ["chat", *args], input=stdin, catch_exceptions=False)


def answer(model, messages, n=8):
    return model.generate(messages, max_new_tokens=n, temperature=0)


def test_chat_keeps_history_and_resets(tiny_export, tiny_model):
    result = chat(
        [str(tiny_export), "--temperature", "0", "--max-new-tokens", "8", "--system", SYSTEM],
        "w5 w6\nw77 w78\n/reset\nw5 w6\n/exit\nw1 w2\n",
    )
    assert result.exit_code == 0, result.output
    system = [{"role": "system", "content": SYSTEM}]
    first = answer(tiny_model, system + [{"role": "user", "content": "w5 w6"}])
    turn2 = system + [
        {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "w77 w78"},
    ]
    second = answer(tiny_model, turn2)
    alone = answer(tiny_model, system + [{"role": "user", "content": "w77 w78"}])
    assert second != alone  # the history changes the answer, so the check below shows it was used
    out = result.output
    positions = [out.index(first), out.index(second, out.index(first) + len(first))]
    assert positions == sorted(positions)
    assert "(new conversation)" in out
    after_reset = out[out.index("(new conversation)") :]
    assert first in after_reset  # same question after /reset: the same answer as the first time
    assert answer(tiny_model, system + [{"role": "user", "content": "w1 w2"}]) not in after_reset  # /exit stopped it


def test_chat_ends_at_end_of_input_and_trims_long_conversations(tiny_export):
    # The tiny model's context is 256 tokens: 20 turns do not fit, so the oldest turns must be dropped.
    lines = "".join(f"w{10 + i} w{40 + i} w{70 + i}\n" for i in range(20))
    result = chat([str(tiny_export), "--max-new-tokens", "12", "--seed", "1"], lines)
    assert result.exit_code == 0, result.output
    assert "error" not in result.output and result.output.count("\n> ") >= 20


def test_chat_system_command_and_errors(tiny_export):
    result = chat([str(tiny_export), "--temperature", "0"], "/system w3 w4\n/help\n" + "w5 " * 300 + "\nw6\n")
    assert result.exit_code == 0, result.output
    assert "(system prompt set; new conversation)" in result.output
    assert "error: the prompt is" in result.output  # too long for the context: reported, the chat goes on
    missing = CliRunner().invoke(main, ["chat", str(tiny_export / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "Traceback" not in missing.output


def test_chat_prompt_cache_warms_the_next_session(tiny_export, tiny_model, tmp_path):
    """--prompt-cache writes the system prompt's cache in the first session and loads it in the next; the
    answers are those of a chat without it."""
    cache = tmp_path / "system.npz"
    args = [str(tiny_export), "--temperature", "0", "--max-new-tokens", "8", "--system", SYSTEM]
    first = chat([*args, "--prompt-cache", str(cache)], "w5 w6\n")
    assert first.exit_code == 0 and cache.is_file() and "prompt cache not used" not in first.output
    saved = cache.stat().st_mtime_ns
    second = chat([*args, "--prompt-cache", str(cache)], "w5 w6\n")
    plain = chat(args, "w5 w6\n")
    assert second.output == first.output == plain.output
    assert cache.stat().st_mtime_ns == saved  # loaded, not rewritten
    size = cache.stat().st_size
    cache.write_bytes(cache.read_bytes()[: size // 2])  # a damaged prompt cache (cut short): rebuilt
    third = chat([*args, "--prompt-cache", str(cache)], "w5 w6\n")
    assert third.output == plain.output and cache.stat().st_size == size


def test_chat_prompt_cache_never_overwrites_another_file(tiny_export, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    args = [str(tiny_export), "--temperature", "0", "--max-new-tokens", "4", "--system", SYSTEM]
    result = chat([*args, "--prompt-cache", str(notes)], "w5 w6\n")
    assert result.exit_code == 0 and "prompt cache not used" in result.output and "not a prompt cache" in result.output
    assert notes.read_text() == "my notes"
    assert result.output.split("not used")[1].count("\n> ") >= 1  # and the chat went on


def run_cli(args, **kwargs):
    exe = [sys.executable, "-c", "from smolexport.cli import main; main()", *args]
    # From another directory: the CLI must find sample_apps/ by itself.
    return subprocess.run(exe, cwd=REPO.parent, capture_output=True, text=True, timeout=60, **kwargs)


def test_chat_command_in_a_real_process(tiny_export, tiny_model):
    result = run_cli(["chat", str(tiny_export), "--temperature", "0", "--max-new-tokens", "4"], input="w5\n")
    assert result.returncode == 0, result.stderr
    expected = answer(tiny_model, [{"role": "user", "content": "w5"}], n=4)  # greedy, the same message
    assert expected.strip()
    # The transcript: help line, the echoed question, the streamed answer, then the prompt that met end of input.
    help_line, _, rest = result.stdout.partition("\n")
    assert help_line.startswith("commands:")
    assert rest == f"> w5\n{expected}\n> \n"


def test_serve_command(tiny_export, tmp_path):
    # stderr goes to a file, not a pipe nobody drains after the first line, and ends up in the failure message.
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", "from smolexport.cli import main; main()", "serve", str(tiny_export)]

    # Ctrl-C's default action, whatever this process inherited: a test run started as a background job has
    # SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt.
    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*cmd, "--port", "0", "--api-key", "k"], cwd=REPO.parent, stderr=stderr, text=True,
            preexec_fn=default_sigint,
        )  # fmt: skip
    try:
        match, deadline = None, time.monotonic() + 120
        while match is None and proc.poll() is None and time.monotonic() < deadline:
            match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())
            time.sleep(0.05)
        assert match, log.read_text()
        request = urllib.request.Request(
            match.group(1) + "/chat/completions",
            data=json.dumps(
                {
                    "model": tiny_export.name,
                    "messages": [{"role": "user", "content": "w5"}],
                    "max_tokens": 3,
                    "temperature": 0,
                }
            ).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"serve did not stop on Ctrl-C within 60 s; its stderr ends:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]


def test_serve_reports_a_port_in_use(tiny_export):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["serve", str(tiny_export), "--port", str(port)])
    assert result.returncode == 1 and result.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("key", ["", "  ", " secret", "secret\n"])
def test_serve_refuses_an_api_key_that_could_never_match_or_is_empty(tiny_export, key):
    result = run_cli(["serve", str(tiny_export), "--port", "0", "--api-key", key])
    assert result.returncode == 2 and "--api-key" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("key", ["", "  ", " secret", "secret\n"])
def test_the_app_itself_refuses_an_api_key_that_could_never_match_or_is_empty(key):
    """The same rule where the key is used, for library callers and `python -m sample_apps.openai_server`."""
    from sample_apps.openai_server import create_app

    create_app(service=None, api_key="secret")  # a good key builds the app (the service is used per request)
    with pytest.raises(ValueError, match="API key is empty or starts or ends with whitespace"):
        create_app(service=None, api_key=key)


def test_apps_do_not_import_torch():
    modules = ["sample_apps.openai_server.server", "sample_apps.terminal_chat.chat", "smolexport.apps_cli",
               "sample_apps.builtin_tools", "sample_apps.extract.extract"]  # fmt: skip
    try:
        import PySide6.QtWidgets  # noqa: F401

        modules.append("sample_apps.desktop_chat.app")
    except ImportError:
        pass
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\nprint(heavy)"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flag", ["--help"])
def test_help(flag):
    for command in ("serve", "chat"):
        result = CliRunner().invoke(main, [command, flag])
        assert result.exit_code == 0 and "EXPORT_DIR" in result.output


def test_chat_with_a_model_without_a_chat_template_reports_it(tiny_export, tmp_path):
    """A model without a chat template: the question is answered with an error line, not a crash, and dropped."""
    import io

    from sample_apps.terminal_chat import chat as run_chat

    from .test_desktop_chat import export_without_chat_template

    model = export_without_chat_template(tiny_export, tmp_path / "no-template")
    out = io.StringIO()
    history = run_chat(model, stdin=io.StringIO("w5 w6\n/exit\n"), stdout=out)
    assert "error: " in out.getvalue() and "chat template" in out.getvalue()
    assert history == []  # the question was not asked
