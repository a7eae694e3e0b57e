"""Options several commands share, parsed the same way everywhere."""

from __future__ import annotations

import argparse
import re

__all__ = ["parse_shape", "parse_shapes", "add_input_shape"]

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
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, like {_EXAMPLE}; got {text!r}"
        )
    return shape


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Several input shapes separated by ``;`` (a model with several inputs)."""
    return tuple(parse_shape(part) for part in text.split(";"))


def add_input_shape(parser: argparse.ArgumentParser, help: str, *, several: bool = False) -> None:
    """``--input-shape``, checked before any model is loaded (a typo fails fast)."""
    parser.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=parse_shapes if several else parse_shape,
        help=help,
    )
