"""The ``bnkit`` command line: one module per command in :mod:`bnkit.cli.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; they are found at start-up, so a new command is a new file.
Command modules import frameworks inside ``run`` so that ``bnkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from bnkit import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2 unless given."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _commands():
    from bnkit.cli import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"bnkit.cli.commands.{info.name}")


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors every bnkit command gives (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnkit",
        description="Batch normalization that is exact and fast across PyTorch and Keras.",
    )
    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    from bnkit.io import ModelFileError

    try:
        return int(args._run(args) or 0)
    except CLIError as e:
        print(f"bnkit {args.command}: error: {e}", file=sys.stderr)
        return e.status
    except ModelFileError as e:
        print(f"bnkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
