"""Progress on long exports: a tqdm bar with the time left on a terminal; in logs, about ten lines, each with
tqdm's estimate of the time left."""

from __future__ import annotations

import io

from smolexport.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_carry_the_fraction_done_and_the_time_left():
    stream = io.StringIO()
    progress = Progress(stream=stream)
    progress.count("layers + lm_head", 0, 31)
    for done in range(1, 32):
        progress.count("layers + lm_head", done, 31)
    lines = stream.getvalue().splitlines()
    assert 9 <= len(lines) <= 11
    assert "layers + lm_head  10% 3/31 [" in lines[0] and "<" in lines[0]  # elapsed<remaining
    assert "100% 31/31" in lines[-1]


def test_a_terminal_gets_one_bar_redrawn_in_place_and_closed_by_the_next_step():
    stream = Terminal()
    progress = Progress(stream=stream)
    progress.count("prompts", 0, 4)
    for done in range(1, 3):
        progress.count("prompts", done, 4)
    progress.step("scoring the text")  # a step while counting ends the bar on its own line
    out = stream.getvalue()
    assert "\r" in out and "2/4" in out and out.rstrip().endswith("scoring the text")
    assert progress._bar is None


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    progress = Progress(enabled=False, stream=stream)
    progress.step("x")
    progress.count("layers", 1, 2)
    assert stream.getvalue() == ""
