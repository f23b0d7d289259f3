"""Saves a screenshot of the chat window after a scripted conversation (works headless).

QT_QPA_PLATFORM=offscreen python -m sample_apps.desktop_chat.screenshot EXPORT_DIR OUT.png "question" ...
"""

from __future__ import annotations

import sys
import time

from PySide6.QtWidgets import QApplication

from .app import ChatWindow


def wait(app: QApplication, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not finish in time")
        app.processEvents()
        time.sleep(0.01)


def screenshot(export_dir: str, out: str, questions: list[str], system: str = "", temperature: float = 0.0) -> None:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = ChatWindow(export_dir, max_new_tokens=96)
    window.show()
    wait(app, lambda: window.model is not None and window._loader is None)
    window.system_edit.setText(system)
    window.temperature.setValue(temperature)
    for question in questions:
        window.input.setText(question)
        window.send()
        wait(app, lambda: not window.busy)
    app.processEvents()
    window.grab().save(out)
    window.close()


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    screenshot(sys.argv[1], sys.argv[2], sys.argv[3:], system="You are a concise assistant.")
