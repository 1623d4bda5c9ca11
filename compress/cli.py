"""The ``ffsc`` command line: one subcommand group per stage; user mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from compress.commands import deploy, import_, prune, quantize, run, space, teacher
from compress.errors import FFSCError

# Each module in compress/commands registers its subcommands; keep this list in menu order.
COMMAND_MODULES = (teacher, space, prune, run, deploy, quantize, import_)


def usage_error(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message> (see <prog> --help)`` on stderr and exit 2: one line, not a usage block."""
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the command (:func:`usage_error`)."""

    def error(self, message: str) -> NoReturn:
        """The parse error as one line, exit 2."""
        usage_error(self.prog, message)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument; a ``nargs='*'`` positional defaults to [] (see below)."""
        # Without a default argparse makes such a positional required, so `ffsc run` with no recipe was told
        # "required: recipe, overrides" although no override is ever required.
        if kwargs.get("nargs") == "*" and names and not names[0].startswith("-"):
            kwargs.setdefault("default", [])
        return super().add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (their parsers are OneLineParsers too: subparsers take its class)."""
    parser = OneLineParser(prog="ffsc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ffsc`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        misplaced = [a for a in extra if "=" in a and not a.startswith("-")]
        if misplaced and hasattr(args, "overrides"):
            print(f"ffsc {args.command}: error: {' '.join(misplaced)}: key=value overrides go right after the recipe, "
                  f"before any option: ffsc {args.command} RECIPE {misplaced[0]} ... --option VALUE", file=sys.stderr)
            return 2
        usage_error(f"ffsc {args.command}", f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except FFSCError as exc:
        if args.debug:
            raise
        print(f"ffsc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
