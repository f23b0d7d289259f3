"""A desktop chat window (Qt for Python, PySide6) over a smolexport export, on `smolexport_runtime` only.

    python -m sample_apps.desktop_chat [EXPORT_DIR]

Loading and generation run on worker threads (QThread) and report back through signals, so the window
stays responsive; answers stream in token by token and the Stop button ends one at the next token.
The conversation (with the system prompt) goes through the model's chat template on every turn.
The "Tools" box offers the model a calculator and the current time (sample_apps/builtin_tools.py): a call
it makes is shown with its arguments, run, its result shown and sent back, then its answer streams.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QThread, Signal, Slot
from PySide6.QtGui import QColor, QFont, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)
from smolexport_runtime import Model, SmolexportRuntimeError, load

from ..builtin_tools import render, stream_with_tools, without_tool_turns
from ..chat_history import fit_history

Message = dict[str, Any]


class LoadThread(QThread):
    """Loads an export folder (hashing and session creation take a moment) off the UI thread."""

    loaded = Signal(object, str)  # model, folder
    failed = Signal(str)

    def __init__(self, folder: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.folder = folder

    def run(self) -> None:
        try:
            self.loaded.emit(load(self.folder), self.folder)
        except SmolexportRuntimeError as exc:
            self.failed.emit(str(exc))
        except Exception as exc:  # a worker thread must never die silently
            self.failed.emit(f"could not load {self.folder}: {exc}")


class GenerationThread(QThread):
    """Streams one answer; `piece` carries each new piece of text, `tool_event` each tool call and result
    (with `tools`), `done` the outcome."""

    piece = Signal(str)
    tool_event = Signal(str, str)  # "call" and `name({arguments})`, or "result" and the result's text
    done = Signal(object)  # a dict: {"text", "stopped", "error", "stats", "added"}

    def __init__(
        self,
        model: Model,
        messages: list[Message],
        options: dict[str, Any],
        parent=None,
        *,
        tools: bool = False,
        tool_choice: Any = "auto",
    ) -> None:
        super().__init__(parent)
        self.model, self.messages, self.options = model, messages, options
        self.tools, self.tool_choice = tools, tool_choice
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        text, error, stats = [], None, None
        added: list[Message] = []  # with tools: the calls and their results, before the answer
        try:
            if self.tools:
                self._run_with_tools(text, added)
                stats = self.model.last_stats  # the last generation's: the final answer
            else:
                pieces = self.model.stream(self.messages, **self.options)
                stats = self.model.last_stats
                try:
                    for piece in pieces:
                        if self._stop.is_set():
                            break
                        text.append(piece)
                        self.piece.emit(piece)
                finally:
                    pieces.close()  # ends the decoder loop at once
        except SmolexportRuntimeError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"generation failed: {exc}"
        self.done.emit(
            {
                "text": "".join(text),
                "stopped": self._stop.is_set(),
                "error": error,
                "stats": None if stats is None else dict(vars(stats)),
                "added": added,
            }
        )

    def _run_with_tools(self, text: list[str], added: list[Message]) -> None:
        events = stream_with_tools(self.model, self.messages, added, tool_choice=self.tool_choice, **self.options)
        try:
            for event in events:
                if self._stop.is_set():
                    break
                if event.kind == "text":
                    text.append(event.text)
                    self.piece.emit(event.text)
                else:
                    self.tool_event.emit(event.kind, event.text)
        finally:
            events.close()


class ChatWindow(QMainWindow):
    """The chat window. Pass `model_dir` to load a folder, or an already loaded `model`."""

    piece_received = Signal(str)  # each streamed piece of the answer, as it is shown
    answer_finished = Signal(object)  # after each answer: {"text", "stopped", "error", "stats", "added"}
    tool_shown = Signal(str, str)  # each tool call ("call", `name({arguments})`) and result ("result", text)

    def __init__(self, model_dir: str | None = None, *, model: Model | None = None, max_new_tokens: int = 512):
        super().__init__()
        self.setWindowTitle("smolexport chat")
        self.resize(760, 560)
        self.model: Model | None = None
        self.history: list[Message] = []
        self._generation: GenerationThread | None = None
        self._loader: LoadThread | None = None

        self.folder_label = QLabel("no model loaded")
        self.open_button = QPushButton("Open export…")
        self.open_button.clicked.connect(self.choose_folder)
        self.system_edit = QLineEdit()
        self.system_edit.setPlaceholderText("System prompt (optional), e.g. You are a concise assistant.")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.7)
        self.temperature.setToolTip("0 = greedy (always the most likely token)")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(max_new_tokens)
        self.tools_box = QCheckBox("Tools")
        self.tools_box.setToolTip(
            "Offer the model a calculator and the current time; its calls and their results are shown"
        )
        self.tool_choice: Any = "auto"  # or "required", a tool's name: what a turn with tools asks for
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self.new_chat)
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)
        self.input = QLineEdit()
        self.input.setPlaceholderText("Type a message and press Enter")
        self.input.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)

        top = QHBoxLayout()
        top.addWidget(self.open_button)
        top.addWidget(self.folder_label, 1)
        settings = QHBoxLayout()
        settings.addWidget(QLabel("System:"))
        settings.addWidget(self.system_edit, 1)
        settings.addWidget(QLabel("Temperature:"))
        settings.addWidget(self.temperature)
        settings.addWidget(QLabel("Max tokens:"))
        settings.addWidget(self.max_tokens)
        settings.addWidget(self.tools_box)
        settings.addWidget(self.new_button)
        bottom = QHBoxLayout()
        bottom.addWidget(self.input, 1)
        bottom.addWidget(self.send_button)
        bottom.addWidget(self.stop_button)
        layout = QVBoxLayout()
        layout.addLayout(top)
        layout.addLayout(settings)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(bottom)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Open an export folder to start")
        self._update_buttons()

        if model is not None:
            self._on_loaded(model, model_dir or "model")
        elif model_dir:
            self.load_folder(model_dir)

    # -- state

    @property
    def busy(self) -> bool:
        return self._generation is not None

    def _update_buttons(self) -> None:
        ready = self.model is not None and not self.busy and self._loader is None
        self.send_button.setEnabled(ready)
        self.input.setEnabled(self.model is not None and self._loader is None)
        self.stop_button.setEnabled(self.busy)
        self.open_button.setEnabled(not self.busy and self._loader is None)
        self.new_button.setEnabled(not self.busy)

    # -- loading

    @Slot()
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a smolexport export folder")
        if folder:
            self.load_folder(folder)

    def load_folder(self, folder: str) -> None:
        self.statusBar().showMessage(f"Loading {folder}…")
        self._loader = LoadThread(str(folder), self)
        self._loader.loaded.connect(self._on_loaded)
        self._loader.failed.connect(self._on_load_failed)
        self._loader.finished.connect(self._loader_finished)
        self._update_buttons()
        self._loader.start()

    @Slot(object, str)
    def _on_loaded(self, model: Model, folder: str) -> None:
        self.model = model
        self.new_chat()
        manifest = model.manifest
        quant = manifest.quant.get("mode", "?") if manifest is not None else "?"
        self.folder_label.setText(f"{Path(folder).name}  ({quant}, context {model.context_length} tokens)")
        if model.context_length:
            self.max_tokens.setMaximum(model.context_length)
        self.statusBar().showMessage("Ready")
        self._update_buttons()
        self.input.setFocus()

    @Slot(str)
    def _on_load_failed(self, message: str) -> None:
        self.statusBar().showMessage("Could not load the export")
        self._note(f"error: {message}")

    @Slot()
    def _loader_finished(self) -> None:
        if self._loader is not None:
            self._loader.deleteLater()
        self._loader = None
        self._update_buttons()

    # -- chatting

    @Slot()
    def new_chat(self) -> None:
        if self.busy:
            return
        self.history.clear()
        self.transcript.clear()

    @Slot()
    def send(self) -> None:
        text = self.input.text().strip()
        if not text or self.model is None or self.busy:
            return
        self.history.append({"role": "user", "content": text})
        system = self.system_edit.text().strip()
        messages = ([{"role": "system", "content": system}] if system else []) + self.history
        tools = self.tools_box.isChecked()
        if not tools:  # tools switched off: the earlier turns' calls and results are left out
            messages = without_tool_turns(messages)
        reserve = min(self.max_tokens.value(), (self.model.context_length or 4096) // 4)
        try:
            # Renders the chat template: it may refuse.
            messages = fit_history(self.model, messages, reserve, render if tools else None)
        except SmolexportRuntimeError as exc:  # e.g. a model without a chat template
            self.history.pop()  # the question was not asked: keep it in the input box instead
            self._note(f"error: {exc}")
            self.statusBar().showMessage("Error")
            return
        self.input.clear()
        self._label("You", "#1f5fbf")
        self._write(text)
        self._label("Assistant", "#2e7d32")
        options = {"max_new_tokens": self.max_tokens.value(), "temperature": self.temperature.value(), "top_p": 0.9}
        self._started = time.perf_counter()
        self._generation = GenerationThread(
            self.model, messages, options, self, tools=tools, tool_choice=self.tool_choice
        )
        self._generation.piece.connect(self._on_piece)
        self._generation.tool_event.connect(self._on_tool_event)
        self._generation.done.connect(self._on_done)
        self._generation.finished.connect(self._generation_finished)
        self._update_buttons()
        self.statusBar().showMessage("Generating…")
        self._generation.start()

    @Slot(str)
    def _on_piece(self, piece: str) -> None:
        self._write(piece)
        self.piece_received.emit(piece)

    @Slot(str, str)
    def _on_tool_event(self, kind: str, text: str) -> None:
        """A tool call (name and arguments) or its result, on a line of its own above the answer."""
        cursor = self._cursor()
        if cursor.block().text():
            cursor.insertBlock()
        fmt = QTextCharFormat()
        fmt.setForeground(QColor("#6a1b9a"))
        fmt.setFontFamilies(["monospace"])
        cursor.insertText(("tool call: " if kind == "call" else "tool result: ") + text, fmt)
        cursor.insertBlock()
        self.tool_shown.emit(kind, text)

    @Slot()
    def stop(self) -> None:
        if self._generation is not None:
            self._generation.stop()
            self.statusBar().showMessage("Stopping…")

    @Slot(object)
    def _on_done(self, result: dict) -> None:
        if result["error"]:
            self.history.pop()  # the question that failed
            self._note(f"error: {result['error']}")
            self.statusBar().showMessage("Error")
        else:
            self.history += result["added"]  # with tools: the calls and their results
            self.history.append({"role": "assistant", "content": result["text"]})
            stats = result["stats"] or {}
            if result["stopped"]:
                self._note(" [stopped]", newline=False)
            elif stats.get("finish_reason") == "length":
                self._note(" [max tokens reached]", newline=False)
            self.statusBar().showMessage(
                f"{stats.get('completion_tokens', 0)} tokens, {stats.get('decode_tok_s', 0):.1f} tokens/s, "
                f"first token after {stats.get('ttft_s', 0):.2f} s" + (" (stopped)" if result["stopped"] else "")
            )
        self.answer_finished.emit(result)

    @Slot()
    def _generation_finished(self) -> None:
        if self._generation is not None:
            self._generation.deleteLater()
        self._generation = None
        self._update_buttons()
        self.input.setFocus()

    # -- transcript

    def _cursor(self) -> QTextCursor:
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        return cursor

    def _label(self, who: str, color: str) -> None:
        cursor = self._cursor()
        if not self.transcript.document().isEmpty():
            cursor.insertBlock()
            cursor.insertBlock()
        fmt = QTextCharFormat()
        fmt.setFontWeight(QFont.Weight.Bold)
        fmt.setForeground(QColor(color))
        cursor.insertText(who, fmt)
        cursor.insertBlock()

    @Slot(str)
    def _write(self, text: str) -> None:
        self._cursor().insertText(text, QTextCharFormat())
        bar = self.transcript.verticalScrollBar()
        bar.setValue(bar.maximum())

    def _note(self, text: str, newline: bool = True) -> None:
        cursor = self._cursor()
        if newline and not self.transcript.document().isEmpty():
            cursor.insertBlock()
        fmt = QTextCharFormat()
        fmt.setFontItalic(True)
        fmt.setForeground(QColor("#9a3412"))
        cursor.insertText(text, fmt)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        for thread in (self._generation, self._loader):
            if thread is not None:
                if isinstance(thread, GenerationThread):
                    thread.stop()
                thread.wait(10_000)
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    app = QApplication.instance() or QApplication(argv)
    window = ChatWindow(argv[1] if len(argv) > 1 else None)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
