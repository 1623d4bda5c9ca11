"""The terminal: one rich console for every layer that prints (commands, the pipeline, benchmarks)."""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from rich.console import Console

LOG_EVERY_S = 30.0
"""How often a progress bar writes a line when the output is a log or a pipe rather than a terminal."""


def console() -> Console:
    """A rich console; wide when not a terminal so tables in logs and pipes are not squeezed."""
    # rich.console takes about 0.1 s to import: paid only by a command that prints a table
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)


class _Lines:
    """tqdm's output for a log or a pipe: each refresh as a line of its own, not carriage-return redraws."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar that writes at most one line per ``mininterval``: postfix updates wait for the next line."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Any = None, *, every_s: float = LOG_EVERY_S, disable: bool = False,
                 stream: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; in a log or a pipe, a plain line every ``every_s`` seconds (0: every update) and
    one at the end, so long work is never silent there."""
    stream = stream or sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(iterable, disable=disable, file=stream, **kwargs)
    return _LogBar(iterable, file=_Lines(stream), mininterval=every_s, maxinterval=max(every_s, 1.0), miniters=1,
                   bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}"
                              "{postfix}]", **kwargs)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
