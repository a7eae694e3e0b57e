"""Options several commands share, parsed the same way everywhere."""

from __future__ import annotations

import argparse
import re

__all__ = [
    "parse_shape",
    "parse_shapes",
    "parse_seed",
    "parse_positive",
    "parse_tolerance",
    "parse_size",
    "add_model",
    "add_reading_options",
    "reading",
]

_EXAMPLE = "64,64,1"


def parse_shape(text: str) -> tuple[int, ...]:
    """``"64,64,1"`` (or ``64x64x1``, ``(64, 64, 1)``) → ``(64, 64, 1)``; argparse-friendly errors."""
    body = re.sub(r"(?<=\d)\s*[x×]\s*(?=\d)", ",", text.strip().strip("()[]"))  # 64x64x1
    parts = [p for p in re.split(r"[,\s]+", body) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        hint = (
            " (-1 is not a size: leave the batch dimension out and give every other one)"
            if any(d < 0 for d in shape)
            else ""
        )
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, like {_EXAMPLE}, without the batch dimension; "
            f"got {text!r}{hint}"
        )
    return shape


def parse_seed(text: str) -> int:
    """A random seed: a non-negative integer (NumPy's generators refuse negative ones)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return seed


def parse_positive(text: str) -> int:
    """A count (batch size, channels...): a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_tolerance(text: str) -> float:
    """A tolerance: a finite non-negative number."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text!r}")
    return value


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Several input shapes separated by ``;`` (a model with several inputs)."""
    return tuple(parse_shape(part) for part in text.split(";"))


MODEL_HELP = (
    "a .keras or .h5 Keras model, a tf-keras 2 SavedModel folder, a .pt2 torch.export program, "
    "or a package.module:factory spec"
)


def add_model(parser: argparse.ArgumentParser) -> None:
    """The ``FILE`` argument and its ``--weights``, as every one-model command takes them."""
    parser.add_argument("model", metavar="FILE", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="WEIGHTS", help=".pt or .safetensors weights for a factory spec")
    add_reading_options(parser)


def parse_size(text: str) -> int:
    """A size in bytes: ``8G``, ``512M``, ``8GiB``, ``8GB`` or a plain number of bytes."""
    from bnkit.formats.limits import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_reading_options(parser: argparse.ArgumentParser) -> None:
    """The limits on reading a model file, and ``--verbose``, as every command that reads one takes them."""
    from bnkit.formats.limits import DEFAULT_MAX_MODEL_BYTES, DEFAULT_MAX_SECONDS, format_bytes

    group = parser.add_argument_group("reading model files (see docs/security.md)")
    group.add_argument(
        "--max-model-bytes",
        metavar="SIZE",
        type=parse_size,
        default=DEFAULT_MAX_MODEL_BYTES,
        help=f"memory a model file may take to read, e.g. 8G (default {format_bytes(DEFAULT_MAX_MODEL_BYTES)})",
    )
    group.add_argument(
        "--max-read-seconds",
        metavar="S",
        type=_parse_seconds,
        default=DEFAULT_MAX_SECONDS,
        help=f"time reading one model file may take (default {DEFAULT_MAX_SECONDS:g})",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="show what PyTorch, Keras and h5py warned while reading"
    )


def reading(args: argparse.Namespace) -> dict:
    """``load_model`` keywords from the options of :func:`add_reading_options`."""
    from bnkit.cli.watchers import for_command
    from bnkit.formats.limits import ReadLimits
    from bnkit.streams import own_stderr

    prefix = f"bnkit {args.command}"

    def show(line: str) -> None:
        print(f"{prefix}: while reading: {line}", file=own_stderr())

    # a reader stuck in C code, or past its memory, is ended from outside (see bnkit.cli.watchers)
    limits = ReadLimits(args.max_model_bytes, args.max_read_seconds, watcher=for_command(prefix))
    return {"limits": limits, "on_warning": show if args.verbose else None}
