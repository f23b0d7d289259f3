"""The PySide6 chat window, headless (QT_QPA_PLATFORM=offscreen): streamed answers, history, stop, loading."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest
from smolexport_runtime import load
from smolexport_runtime.tools import ToolCall

from sample_apps.builtin_tools import describe_call, run_tool

from .conftest import REAL_EXPORT, slow_model

os.environ["QT_QPA_PLATFORM"] = "offscreen"

try:
    import PySide6
    from PySide6.QtWidgets import QApplication
except ImportError as exc:  # not installed, or Qt's system libraries (libEGL, fontconfig...) are missing
    pytest.skip(f"PySide6 is not importable: {exc}", allow_module_level=True)

if PySide6.__version__.startswith("6.12.") and sys.version_info < (3, 12):
    pytest.skip("PySide6 6.12 aborts Python < 3.12 at exit (refcount bug); use PySide6 < 6.12", allow_module_level=True)

from sample_apps.desktop_chat.app import ChatWindow  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


def wait_for(app, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the window"
        app.processEvents()
        time.sleep(0.005)


@pytest.fixture
def window_factory(app):
    windows = []

    def make(**kwargs):
        window = ChatWindow(**kwargs)
        window.show()
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.close()
        window.deleteLater()
    app.processEvents()


def send(app, window, text):
    pieces, results = [], []
    window.piece_received.connect(pieces.append)
    window.answer_finished.connect(results.append)
    window.input.setText(text)
    window.send_button.click()
    return pieces, results


def test_chat_streams_answers_with_history(app, window_factory, tiny_model, tmp_path):
    window = window_factory(model=tiny_model, model_dir="tiny", max_new_tokens=10)
    window.temperature.setValue(0.0)
    window.system_edit.setText("w9 w10")
    pieces, results = send(app, window, "w5 w6")
    assert window.busy and window.stop_button.isEnabled() and not window.send_button.isEnabled()
    wait_for(app, lambda: not window.busy)
    system = [{"role": "system", "content": "w9 w10"}]
    first = tiny_model.generate(system + [{"role": "user", "content": "w5 w6"}], max_new_tokens=10, temperature=0)
    assert len(pieces) > 1 and "".join(pieces) == first
    assert results[0]["text"] == first and not results[0]["stopped"] and results[0]["error"] is None
    assert first in window.transcript.toPlainText()
    assert window.send_button.isEnabled() and not window.stop_button.isEnabled()

    pieces2, _ = send(app, window, "w77 w78")
    wait_for(app, lambda: not window.busy)
    history = system + [
        {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "w77 w78"},
    ]
    assert "".join(pieces2) == tiny_model.generate(history, max_new_tokens=10, temperature=0)
    assert [m["role"] for m in window.history] == ["user", "assistant", "user", "assistant"]

    shot = tmp_path / "desktop_chat.png"
    assert window.grab().save(str(shot)) and shot.stat().st_size > 1000

    window.new_button.click()
    assert window.history == [] and window.transcript.toPlainText() == ""


def test_stop_button_ends_the_answer_and_the_window_stays_responsive(app, window_factory, tiny_export):
    model = slow_model(tiny_export, 0.03)  # 30 ms a token, no eos: 200 tokens would take 6 s
    window = window_factory(model=model, model_dir="tiny", max_new_tokens=200)
    pieces, results = send(app, window, "w5")
    worker_done = []
    window._generation.finished.connect(lambda: worker_done.append(True))
    wait_for(app, lambda: len(pieces) >= 3)  # the event loop runs while the model generates
    window.stop_button.click()
    passes_at_stop = model.decoder.calls
    # Generous timeouts: they only guard against a hang. The checks are on what happened, not on how fast.
    wait_for(app, lambda: worker_done and results and not window.busy, timeout=60)
    assert results[0]["stopped"] and results[0]["error"] is None
    tokens = results[0]["stats"]["completion_tokens"]
    assert tokens < 200 and model.decoder.calls <= passes_at_stop + 3  # ended within a token or two of Stop
    assert window.history[-1] == {"role": "assistant", "content": results[0]["text"]}
    assert "[stopped]" in window.transcript.toPlainText()
    assert window.send_button.isEnabled() and not window.stop_button.isEnabled()


def export_without_chat_template(export, folder):
    shutil.copytree(export, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return load(folder, verify=False)  # the manifest's checksums are of the original files


def test_a_model_without_a_chat_template_shows_the_error(app, window_factory, tiny_export, tmp_path):
    model = export_without_chat_template(tiny_export, tmp_path / "no-template")
    assert model.chat_template is None and model.context_length
    window = window_factory(model=model, model_dir="no-template", max_new_tokens=4)
    for attempt in range(2):
        pieces, results = send(app, window, f"w5 w{attempt}")
        wait_for(app, lambda: not window.busy)
        assert window.history == []  # no stacked, unanswered user messages
        assert window.transcript.toPlainText().count("error: this model has no chat template") == attempt + 1
        assert window.input.text() == f"w5 w{attempt}"  # the message is kept, to send again
        assert window.send_button.isEnabled() and not pieces
        window.input.clear()


def test_loads_a_folder_off_the_ui_thread_and_reports_bad_ones(app, window_factory, tiny_export, tmp_path):
    window = window_factory(model_dir=str(tiny_export))
    assert not window.send_button.isEnabled()  # still loading
    wait_for(app, lambda: window.model is not None and window._loader is None)
    assert tiny_export.name in window.folder_label.text() and window.send_button.isEnabled()

    broken = window_factory(model_dir=str(tmp_path / "missing"))
    wait_for(app, lambda: broken._loader is None)
    assert broken.model is None and "error:" in broken.transcript.toPlainText()
    assert not broken.send_button.isEnabled() and broken.open_button.isEnabled()


@pytest.mark.skipif(not REAL_EXPORT.is_dir(), reason=f"{REAL_EXPORT} not exported (README's first command)")
def test_tools_show_the_call_its_result_and_the_answer(app, window_factory):
    """The "Tools" box on the real 135M int4 (the tiny models' tokenizers cannot drive the grammar), with the
    calculator named as tool_choice so that the model calls it: the call and its result are shown above the
    answer, and go into the history as the trained format's turns; with the box off again, the next turn
    sends the questions and answers only."""
    model = load(REAL_EXPORT, providers="cpu")
    window = window_factory(model=model, model_dir="real", max_new_tokens=100)
    window.temperature.setValue(0.0)
    window.tools_box.setChecked(True)
    window.tool_choice = {"type": "function", "function": {"name": "calculator"}}
    shown = []
    window.tool_shown.connect(lambda kind, text: shown.append((kind, text)))
    pieces, results = send(app, window, "What is 17 times 23?")
    wait_for(app, lambda: not window.busy, timeout=120)
    assert results[0]["error"] is None, results[0]["error"]
    assert [m["role"] for m in window.history] == ["user", "assistant", "tool", "assistant"]
    (call,) = window.history[1]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    result = run_tool(ToolCall("calculator", arguments))
    assert shown == [("call", describe_call(ToolCall("calculator", arguments))), ("result", result)]
    assert window.history[2]["content"] == result
    answer = results[0]["text"]
    assert answer.strip() and "".join(pieces) == answer and window.history[3]["content"] == answer
    transcript = window.transcript.toPlainText()
    call_line, result_line = f"tool call: {shown[0][1]}", f"tool result: {result}"
    assert transcript.index(call_line) < transcript.index(result_line) < transcript.rindex(answer)

    window.tools_box.setChecked(False)
    pieces2, _ = send(app, window, "Thanks!")
    wait_for(app, lambda: not window.busy, timeout=120)
    plain = [{"role": "user", "content": "What is 17 times 23?"}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Thanks!"}]  # fmt: skip
    assert "".join(pieces2) == model.generate(plain, max_new_tokens=100, temperature=0)
    assert [m["role"] for m in window.history][-2:] == ["user", "assistant"] and len(shown) == 2
