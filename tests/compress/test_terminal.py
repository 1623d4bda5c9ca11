"""Progress in a log or a pipe: plain lines at a bounded rate, never silent, never carriage-return redraws."""

from __future__ import annotations

import io

from compress.terminal import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_update_when_asked_and_the_postfix_rides_along():
    log = io.StringIO()
    with progress_bar(total=3, desc="distilling", every_s=0, stream=log) as bar:
        for i in range(3):
            bar.update(1)
            bar.set_postfix({"loss": f"{i + 0.5}"})
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("distilling: ") for line in lines)
    assert [line.split()[1] for line in lines[:4]] == ["0/3", "1/3", "2/3", "3/3"]
    assert "loss=2.5" in lines[-1]


def test_a_log_is_written_at_most_every_interval_plus_the_first_and_last_line():
    log = io.StringIO()
    with progress_bar(total=1000, desc="labelling", stream=log) as bar:  # 1000 fast updates inside 30 s
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("labelling: 1000/1000 (100%)")


def test_a_terminal_gets_the_usual_redrawn_bar_and_disable_stays_silent():
    tty = _Terminal()
    with progress_bar(total=2, desc="x", stream=tty) as bar:
        bar.update(2)
    assert "\r" in tty.getvalue() and "2/2" in tty.getvalue()
    quiet = io.StringIO()
    with progress_bar(total=2, desc="x", stream=quiet, disable=True) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""
