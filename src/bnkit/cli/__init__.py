"""The ``bnkit`` command line: one module per command in :mod:`bnkit.cli.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; they are found at start-up, so a new command is a new file.
Command modules import frameworks inside ``run`` so that ``bnkit --help`` stays fast.

Run as the ``bnkit`` console script (``main()`` without ``argv``), a command that reads model files
runs in a child process that a light parent supervises (:mod:`bnkit.cli.supervisor`: it ends a
reader stuck in C code, or past its memory); ``main(argv)`` runs the command in the calling process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import signal
import sys

from bnkit import __version__
from bnkit.streams import keep_framework_output, own_stderr


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


def _valued_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, of the parser and its sub-commands, that takes a value."""
    options = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _valued_options(sub)
        elif action.option_strings and action.nargs != 0:
            options.update(action.option_strings)
    return options


def _attach_negative_values(argv: list[str], options: set[str]) -> list[str]:
    """``--input-shape -1,3`` -> ``--input-shape=-1,3``: argparse takes ``-1,3`` (or ``-1e-3``) for an
    option and says "expected one argument"; joined, the option's own check explains the value."""
    joined: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and re.match(r"-[\d.]", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def _quiet_stdout() -> None:
    """The reader of stdout is gone (``| head -1``): send what is left, and Python's last flush, nowhere."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _stdout_is_devnull() -> bool:
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


def _passive_openmp_threads() -> None:
    """PyTorch's OpenMP threads wait for work by spinning: when another process holds one of the
    cores (a shared machine, a CI runner), a spinning thread keeps the one it waits for off the CPU,
    and a ResNet50 forward pass takes ten times as long on 2 threads as on 1. Passive waiting costs
    next to nothing on an idle machine. Set before PyTorch is first imported (it reads it then), and
    only where the user has not chosen."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Run one command: ``argv`` (the console script: ``sys.argv``, supervised), return its exit status."""
    _passive_openmp_threads()
    # TensorFlow's C++ notices (no CUDA driver, CPU instructions, cuInit) on the command line: its
    # errors reach bnkit as Python exceptions anyway, which bnkit reports in its one line
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_attach_negative_values(argv, _valued_options(parser)))
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    if console and hasattr(args, "max_read_seconds"):  # the command reads model files
        from bnkit.cli.supervisor import supervise

        supervise()  # returns in the child (or where there is no fork), which runs the command
    from bnkit.inputs import InputError
    from bnkit.interrupts import Terminated, raise_if_stop_requested, stop_signals_handled
    from bnkit.io import ModelFileError
    from bnkit.text import printable

    # SIGINT and SIGTERM raise in the main thread and are remembered, so that code which swallows
    # the exception (Keras' bare except:) neither gets a file written nor the command to exit 0.
    # What the frameworks print to stderr meanwhile (torch.fx's traceback of a failing traced
    # module, notices, warnings) is kept off the one error line, and shown with --verbose.
    with stop_signals_handled(), keep_framework_output() as kept:
        try:
            status = int(args._run(args) or 0)
            raise_if_stop_requested()
            sys.stdout.flush()  # a closed pipe shows here, not in Python's exit handler
            return status
        except (CLIError, ModelFileError, InputError) as e:
            # the message may quote a model file (names, a framework's error): one printable line
            _error(args, f"error: {printable(' '.join(str(e).split()))}")
            if getattr(args, "verbose", False):
                for line in getattr(e, "framework_warnings", ()):
                    _error(args, f"while reading: {line}")
            return e.status if isinstance(e, CLIError) else 2
        except BrokenPipeError:
            _quiet_stdout()
            return 128 + signal.SIGPIPE
        except SystemExit as e:  # rich's Console exits with 1 on a closed pipe, after the same redirection
            if e.code == 1 and _stdout_is_devnull():
                return 128 + signal.SIGPIPE
            raise
        except KeyboardInterrupt:
            print("interrupted", file=own_stderr())
            return 130
        except Terminated:
            print("terminated", file=own_stderr())
            return 128 + signal.SIGTERM
        finally:
            if getattr(args, "verbose", False):
                for line in kept.getvalue().splitlines():
                    if line.strip():
                        _error(args, f"framework output: {printable(line)}")


def _error(args: argparse.Namespace, text: str) -> None:
    print(f"bnkit {args.command}: {text}", file=own_stderr())

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
