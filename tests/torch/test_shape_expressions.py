"""Shape expressions of ``.pt2`` programs are parsed as bounded integer arithmetic, never evaluated.

The accepted side is what torch itself writes: every expression of a program exported with free
batch, height and width (convolutions with stride, ceil-mode pooling, a reshape, a slice, an
interpolation by a scale factor, a remainder) is accepted, and its regenerated text is the same
sympy expression. The refused side is issue 17's hangs and what is next to them.
"""

from __future__ import annotations

import json
import re
import time
import zipfile

import pytest
import torch
from torch import nn

from bnkit.torch.shape_expressions import MAX_BITS, MAX_DEPTH, MAX_LENGTH, ExpressionError, check_expression

S0 = "Symbol('s0', positive=True, integer=True)"


class Dynamic(nn.Module):
    """Shapes through the operators whose sizes give torch's expressions their variety."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y):
        z = self.pool(self.bn(self.conv(x)))
        rows = z.reshape(z.shape[0] * z.shape[2], -1)
        scaled = nn.functional.interpolate(x, scale_factor=0.5)
        counted = torch.arange(x.shape[3] % 5 + 1)
        return rows.sum() + y[: x.shape[2] // 3].sum() + scaled.mean() + counted.sum()


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    torch.manual_seed(0)
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        Dynamic().eval(),
        (torch.randn(2, 3, 17, 19), torch.randn(30)),
        dynamic_shapes=({0: auto, 2: auto, 3: auto}, {0: auto}),
    )
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.pt2"
    torch.export.save(program, str(path))
    return path


def _expressions(path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        text = archive.read(f"{root}/models/model.json").decode()
    found, stack = set(), [json.loads(text)]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.update(v for k, v in item.items() if k == "expr_str")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _sympify(text: str):
    """``text`` read as torch's deserialiser reads it (only for the trusted expressions torch wrote)."""
    import sympy
    from torch.utils._sympy import functions

    names = {name: getattr(functions, name) for name in dir(functions) if name[:1].isupper()}
    return sympy.sympify(text, locals=names)


def test_every_expression_torch_writes_is_accepted_and_regenerated_as_the_same(dynamic_pt2):
    expressions = _expressions(dynamic_pt2)
    written = " ".join(expressions)
    for name in ("FloorDiv", "Mod", "Max", "Mul", "Add", "TruncToInt", "ToFloat", "Float"):
        assert name + "(" in written, f"the program should exercise {name}"
    for text in expressions:
        regenerated = check_expression(text)
        assert _sympify(regenerated) == _sympify(text), text


def test_a_dynamic_program_reads_and_runs_as_torch_reads_it(dynamic_pt2):
    from bnkit.torch.pt2_archive import read_exported_program

    ours, _ = read_exported_program(dynamic_pt2)
    theirs = torch.export.load(str(dynamic_pt2))  # a file written here: trusted
    inputs = (torch.randn(3, 3, 17, 29), torch.randn(40))  # the reshape needs the same pooled height
    torch.testing.assert_close(ours.module()(*inputs), theirs.module()(*inputs), rtol=0, atol=0)
    assert {str(k): (v.lower, v.upper) for k, v in ours.range_constraints.items()} == {
        str(k): (v.lower, v.upper) for k, v in theirs.range_constraints.items()
    }


@pytest.mark.parametrize(
    ("text", "regenerated"),
    [
        (f"Mul(Integer(4),  {S0})", f"Mul(Integer(4), {S0})"),
        ("Integer(0x10)", "Integer(16)"),
        ("Integer(-1)", "Integer(-1)"),
        (f"Pow({S0}, 2)", f"Pow({S0}, Integer(2))"),
        ("-oo", "-oo"),
        ("Float('1.0000000000000001e-5', precision=53)", "Float('1.0000000000000001e-5', precision=53)"),
        (f"StrictLessThan({S0}, Integer(3))", f"StrictLessThan({S0}, Integer(3))"),
        ("Symbol('u0', integer=True)", "Symbol('u0', integer=True)"),
    ],
)
def test_the_text_handed_to_sympy_is_written_from_the_checked_tree(text, regenerated):
    assert check_expression(text) == regenerated


def test_products_of_several_sizes_fit_the_bound():
    sizes = ", ".join(f"Symbol('s{i}', positive=True, integer=True)" for i in range(6))
    check_expression(f"Mul(Integer({2**40}), {sizes})")  # 6 x 64 + 41 bits


_LONG = "Add(" + ", ".join(["Integer(1)"] * 500) + ")"
_DEEP = "Add(" * (MAX_DEPTH + 1) + "Integer(1)" + ")" * (MAX_DEPTH + 1)
_TOWER = f"Pow(Pow(Pow({S0}, 64), 64), 64)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # issue 17: each ran until killed (Float ignored SIGTERM and SIGINT)
        ("Integer(10)**Integer(10)**Integer(10)", "the Python operator '\\*\\*'"),
        ("9**9**9", "the Python operator '\\*\\*'"),
        ("Pow(10, 10**8)", "calls Pow with an exponent that is not a small integer literal"),
        ("Pow(Integer(10), Integer(100000000))", "calls Pow with an exponent that is not a small integer literal"),
        ("2**68719476736", "the Python operator '\\*\\*'"),
        ("LShift(1, 10**10)", "calls LShift with a shift count that is not a small integer literal"),
        ("LShift(Integer(1), Integer(10000000000))", "shift count that is not a small integer literal"),
        ("Float('1e999999999')", "a Float that is not a plain decimal literal"),
        ("Float('1e9999', precision=53)", "a Float of magnitude 1e9999"),
        # what is next to them
        (_TOWER, f"can reach 2\\*\\*262144 \\(at most 2\\*\\*{MAX_BITS}\\)"),
        (f"Mul(Pow({S0}, 64), Pow({S0}, 64))", "Mul\\(...\\) can reach 2\\*\\*8192"),
        ("Integer(36893488147419103232)", "an integer of 66 bits"),
        ("Rational(1, 0)", "Rational\\(..., 0\\)"),
        ("Float('0.5', precision=10**9)", "a Float that is not a plain decimal literal"),
        ("FloatPow(Float('2.0', precision=53), Float('1e300', precision=53))", "holds 'FloatPow'"),
        ("Symbol('__import__')", "a Symbol whose name is not one torch writes"),
        ("Symbol('s0', positive='yes')", "not a true/false assumption"),
        ("Symbol('s0', evaluate=True)", "not a true/false assumption"),
        ("Integer('5')", "Integer\\(...\\) of something other than integers"),
        ("Integer(1.5)", "Integer\\(...\\) of something other than integers"),
        ("Max(Integer(1), exec('print(1)'))", "holds 'exec'"),
        ("Symbol.__class__", "Python syntax \\(Attribute\\)"),
        ("Add(Integer(1), Integer(2), evaluate=False)", "keyword arguments"),
        ("Mod(Integer(1))", "calls Mod with 1 arguments"),
        ("lambda: 1", "Python syntax \\(Lambda\\)"),
        ("Add(1, 2", "not an expression"),
        ("Integer(1)\x00", "not an expression"),
        (_LONG, "more than 1000 parts"),
        (_DEEP, f"nested more than {MAX_DEPTH} deep"),
        ("Integer(1)" + " " * MAX_LENGTH, f"of {MAX_LENGTH + 10} characters"),
        (12, "not a string"),
    ],
)
def test_an_expression_that_is_not_bounded_integer_arithmetic_is_refused_at_once(text, message):
    started = time.monotonic()
    with pytest.raises(ExpressionError, match=message):
        check_expression(text)
    assert time.monotonic() - started < 1.0


def test_the_bit_bound_follows_what_sympy_would_fold():
    """A product's bound is its factors' bits added: at the bound it is accepted, one bit over refused."""
    check_expression(f"Mul(Pow({S0}, 32), Pow({S0}, 32))")  # 64 x 32 x 2 = 4096 bits: at the bound
    with pytest.raises(ExpressionError, match=re.escape("Mul(...) can reach 2**4097")):
        check_expression(f"Mul(Integer(1), Pow({S0}, 32), Pow({S0}, 32))")
