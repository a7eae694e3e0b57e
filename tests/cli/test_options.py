"""Options shared by several commands parse, and fail, the same way."""

from __future__ import annotations

import argparse

import pytest

from bnkit.cli.options import parse_shape, parse_shapes


@pytest.mark.parametrize(
    ("text", "shape"),
    [("64,64,1", (64, 64, 1)), ("64x64x1", (64, 64, 1)), ("(3, 32, 32)", (3, 32, 32)), ("100", (100,))],
)
def test_shapes_parse(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["3,x", "0,1", "", "a", "2,-1", "1.5"])
def test_bad_shapes_are_refused_with_the_text(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integers") as info:
        parse_shape(text)
    assert repr(text) in str(info.value)


def test_several_inputs():
    assert parse_shapes("3,8,8;4") == ((3, 8, 8), (4,))


def test_argparse_errors_are_one_line(run_cli):
    proc = run_cli("summary", "m.keras", "--input-shape", "3,x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bnkit summary: error: argument --input-shape: must be positive integers separated by commas, "
        "like 64,64,1, without the batch dimension; got '3,x' (see bnkit summary --help)"
    ]
