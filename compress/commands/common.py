"""Helpers shared by the subcommands (the library's own helpers live below compress/commands)."""

from __future__ import annotations

from compress.terminal import console

__all__ = ["console"]
