"""The terminal: one rich console for every layer that prints (commands, the pipeline, benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def console() -> Console:
    """A rich console; wide when not a terminal so tables in logs and pipes are not squeezed."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)
