"""The symbolic shape expressions of a ``torch.export`` program, checked as bounded integer arithmetic.

A ``.pt2`` program writes each dynamic size as the ``sympy.srepr`` of an expression, e.g.
``Mul(Integer(512), Symbol('s77', positive=True, integer=True))``, and torch's reader hands that
string to ``sympy.sympify``, which evaluates it as Python. Even with names restricted to sympy's
classes, evaluation is unbounded: ``Pow(Integer(10), Integer(10**8))`` or ``LShift(1, 10**10)``
compute numbers of gigabytes, and ``Float('1e999999999')`` loops in C code that no signal
interrupts.

:func:`check_expression` parses the string with :mod:`ast` (which builds a tree and evaluates
nothing) and accepts only what ``srepr`` writes for torch's integer arithmetic: calls of the
functions in :data:`FUNCTIONS` with a bounded number of arguments, ``Symbol('s0', ...)`` with
boolean assumptions, ``Integer``/``Rational`` literals of at most 64 bits, ``Float`` literals as
sympy writes them (a decimal of a few digits, exponent within a double's range), exponents and
shift counts that are small integer literals. It bounds the tree's size and depth and, for every
subexpression, the bits its value can have (symbols are int64), so whatever sympy folds stays
small. It returns a string regenerated from the checked tree: what sympy parses is exactly what
was checked, not the file's text.
"""

from __future__ import annotations

import ast
import re
from decimal import Decimal, InvalidOperation

__all__ = ["ExpressionError", "check_expression", "FUNCTIONS", "MAX_LENGTH", "MAX_NODES", "MAX_DEPTH", "MAX_BITS"]

MAX_LENGTH = 16_384  # characters; torch's expressions for real networks are a few hundred
MAX_NODES = 1_000
MAX_DEPTH = 48
MAX_LITERAL_BITS = 64  # |Integer(n)| <= 2**64
MAX_EXPONENT = 64  # of Pow/PowByNatural, and LShift's count
MAX_BITS = 4_096  # the most bits any subexpression's value may need
SYMBOL_BITS = 64  # a symbol is a size: an int64 (hints and ranges are checked to be int64 too)
MAX_ARGUMENTS = 64
MAX_FLOAT_EXPONENT = 400  # decimal exponent of a Float literal; a double reaches 1e308


class ExpressionError(ValueError):
    """A shape expression that is not bounded integer arithmetic; the message says what is wrong."""


# How the value of each function's result is bounded by its arguments' bits (see _bits):
#   "max": at most the largest argument (divisions, remainders, comparisons' operands...)
#   "max+1": one bit more than the largest (sums, Max/Min of mixed signs, conditionals)
#   "sum": the sum of the arguments' bits (products, true divisions)
#   "bool": a truth value
# with the number of arguments each takes (min, max).
FUNCTIONS: dict[str, tuple[str, int, int]] = {
    "Add": ("max+1", 1, MAX_ARGUMENTS),
    "Mul": ("sum", 1, MAX_ARGUMENTS),
    "Max": ("max+1", 1, MAX_ARGUMENTS),
    "Min": ("max+1", 1, MAX_ARGUMENTS),
    "Abs": ("max", 1, 1),
    "Mod": ("max", 2, 2),
    "PythonMod": ("max", 2, 2),
    "FloorDiv": ("max", 2, 2),
    "CleanDiv": ("max", 2, 2),
    "CeilDiv": ("max+1", 2, 2),
    "ModularIndexing": ("max", 3, 3),
    "RShift": ("max", 2, 2),
    "IntTrueDiv": ("sum", 2, 2),
    "FloatTrueDiv": ("sum", 2, 2),
    "ToFloat": ("max", 1, 1),
    "TruncToFloat": ("max", 1, 1),
    "TruncToInt": ("max", 1, 1),
    "FloorToInt": ("max+1", 1, 1),
    "CeilToInt": ("max+1", 1, 1),
    "RoundToInt": ("max+1", 1, 1),
    "Identity": ("max", 1, 1),
    "Where": ("max+1", 3, 3),
    "Piecewise": ("max+1", 1, MAX_ARGUMENTS),
    "ExprCondPair": ("max+1", 2, 2),
    "IsNonOverlappingAndDenseIndicator": ("bool", 2, MAX_ARGUMENTS),
    "Equality": ("bool", 2, 2),
    "Unequality": ("bool", 2, 2),
    "StrictLessThan": ("bool", 2, 2),
    "LessThan": ("bool", 2, 2),
    "StrictGreaterThan": ("bool", 2, 2),
    "GreaterThan": ("bool", 2, 2),
    "And": ("bool", 1, MAX_ARGUMENTS),
    "Or": ("bool", 1, MAX_ARGUMENTS),
    "Not": ("bool", 1, 1),
}
_POWERS = {"Pow", "PowByNatural"}  # (base, small integer exponent)
_SHIFTS = {"LShift"}  # (value, small non-negative count)
_CONSTANTS = {"true": 1, "false": 1, "oo": SYMBOL_BITS, "int_oo": SYMBOL_BITS}  # bare names srepr writes
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")  # torch's symbols: s0, s77, u3, zuf0...
_ASSUMPTIONS = {
    "integer", "positive", "nonnegative", "negative", "nonpositive", "nonzero", "zero", "real", "finite",
    "extended_real", "rational", "even", "odd", "commutative",
}  # fmt: skip
_NAMES = {*FUNCTIONS, *_POWERS, *_SHIFTS, *_CONSTANTS, "Symbol", "Integer", "Rational", "Float"}
_FLOAT_LITERAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{0,40})?(e[-+]?[0-9]{1,4})?")
_PRECISION = 53  # sympy writes Float(..., precision=53) for a double


def check_expression(text) -> str:
    """``text`` checked (see the module doc) and written again from the checked tree.

    Raises :class:`ExpressionError` naming what is not allowed.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"a shape expression that is not a string ({type(text).__name__})")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"a shape expression of {len(text)} characters (at most {MAX_LENGTH})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL, a huge int literal
        raise ExpressionError(f"a shape expression that is not an expression ({type(e).__name__})") from e
    nodes = 0
    for node in ast.walk(tree):  # the names first: they say best what a crafted expression was for
        nodes += 1
        if nodes > MAX_NODES:
            raise ExpressionError(f"a shape expression of more than {MAX_NODES} parts")
        if isinstance(node, ast.Name) and node.id not in _NAMES:
            raise ExpressionError(f"a shape expression holds {_show(node.id)}, which is not integer arithmetic")
    checked = _Checker()
    text, _ = checked.expression(tree.body, 1)
    return text


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Checker:
    """Walks the parsed tree: each method returns (the regenerated text, the bits its value may need)."""

    def expression(self, node: ast.AST, depth: int) -> tuple[str, int]:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"a shape expression nested more than {MAX_DEPTH} deep")
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return node.id, _CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Name):
            if node.operand.id in ("oo", "int_oo"):  # -oo, -int_oo
                return f"-{node.operand.id}", SYMBOL_BITS
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ExpressionError(
                f"a shape expression holds {_describe(node)}, which is not how torch writes integer arithmetic "
                "(sympy.srepr calls such as Mul(Integer(2), Symbol('s0', integer=True)))"
            )
        name = node.func.id
        if name == "Symbol":
            return self.symbol(node)
        if name in ("Integer", "Rational"):
            return self.integer_literal(node, name)
        if name == "Float":
            return self.float_literal(node)
        if node.keywords:
            raise ExpressionError(f"a shape expression calls {name} with keyword arguments")
        if name in _POWERS or name in _SHIFTS:
            return self.power(node, name, depth)
        kind, least, most = FUNCTIONS[name]
        if not least <= len(node.args) <= most:
            raise ExpressionError(f"a shape expression calls {name} with {len(node.args)} arguments")
        parts = [self.expression(arg, depth + 1) for arg in node.args]
        bits = [b for _, b in parts]
        if kind == "sum":
            total = sum(bits)
        elif kind == "bool":
            total = 1
        else:
            total = max(bits) + (kind == "max+1")
        return f"{name}({', '.join(t for t, _ in parts)})", self.bounded(total, name)

    @staticmethod
    def bounded(bits: int, name: str) -> int:
        if bits > MAX_BITS:
            raise ExpressionError(
                f"a shape expression whose {name}(...) can reach 2**{bits} (at most 2**{MAX_BITS}): "
                "no tensor has such a size"
            )
        return bits

    def symbol(self, node: ast.Call) -> tuple[str, int]:
        if len(node.args) != 1 or not _is_str(node.args[0]) or not _SYMBOL_NAME.fullmatch(node.args[0].value):
            raise ExpressionError(
                "a shape expression holds a Symbol whose name is not one torch writes (such as 's0', 'u3')"
            )
        assumptions = []
        for keyword in node.keywords:
            if keyword.arg not in _ASSUMPTIONS or not _is_bool(keyword.value):
                raise ExpressionError(
                    f"a shape expression holds a Symbol with {_show(keyword.arg)}=..., not a true/false assumption"
                )
            assumptions.append(f"{keyword.arg}={keyword.value.value}")
        return f"Symbol({', '.join([repr(node.args[0].value), *assumptions])})", SYMBOL_BITS

    def integer_literal(self, node: ast.Call, name: str) -> tuple[str, int]:
        count = 1 if name == "Integer" else 2
        values = [_int_literal(arg) for arg in node.args]
        if node.keywords or len(values) != count or None in values:
            raise ExpressionError(f"a shape expression holds {name}(...) of something other than integers")
        bits = max(max(abs(v).bit_length() for v in values), 1)
        if bits > MAX_LITERAL_BITS:
            raise ExpressionError(f"a shape expression holds an integer of {bits} bits (at most {MAX_LITERAL_BITS})")
        if name == "Rational" and values[1] == 0:
            raise ExpressionError("a shape expression holds Rational(..., 0)")
        return f"{name}({', '.join(map(str, values))})", bits

    def float_literal(self, node: ast.Call) -> tuple[str, int]:
        """``Float('0.5', precision=53)``: the only form of a float torch's programs hold (from scale factors)."""
        text = node.args[0].value if len(node.args) == 1 and _is_str(node.args[0]) else None
        precision = {k.arg: _int_literal(k.value) for k in node.keywords}
        if text is None or precision not in ({}, {"precision": _PRECISION}) or not _FLOAT_LITERAL.fullmatch(text):
            raise ExpressionError(
                "a shape expression holds a Float that is not a plain decimal literal "
                f"(such as Float('0.5', precision={_PRECISION}))"
            )
        try:
            value = Decimal(text)
        except InvalidOperation as e:  # not reached: the pattern is a decimal
            raise ExpressionError(f"a shape expression holds Float({text!r})") from e
        exponent = value.adjusted() if value else 0  # the power of ten of its first digit
        if abs(exponent) > MAX_FLOAT_EXPONENT:
            raise ExpressionError(
                f"a shape expression holds a Float of magnitude 1e{exponent} (at most 1e±{MAX_FLOAT_EXPONENT})"
            )
        # bits either way: what a product or a division by it can do to a value's magnitude
        return f"Float({text!r}, precision={_PRECISION})", 4 * abs(exponent) + 4

    def power(self, node: ast.Call, name: str, depth: int) -> tuple[str, int]:
        if len(node.args) != 2:
            raise ExpressionError(f"a shape expression calls {name} with {len(node.args)} arguments")
        exponent = _small_integer(node.args[1])
        least = 0 if name in _SHIFTS else -MAX_EXPONENT
        if exponent is None or not least <= exponent <= MAX_EXPONENT:
            what = "a shift count" if name in _SHIFTS else "an exponent"
            raise ExpressionError(
                f"a shape expression calls {name} with {what} that is not a small integer literal "
                f"({least}..{MAX_EXPONENT}): it could compute a number of any size"
            )
        base, bits = self.expression(node.args[0], depth + 1)
        total = bits + exponent if name in _SHIFTS else bits * max(abs(exponent), 1)
        return f"{name}({base}, Integer({exponent}))", self.bounded(total, name)


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _is_bool(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, bool)


def _int_literal(node: ast.AST) -> int | None:
    """``5`` or ``-5`` as written (no arithmetic), else None."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    if negative:
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return -node.value if negative else node.value
    return None


def _small_integer(node: ast.AST) -> int | None:
    """An exponent: ``Integer(3)``, ``3`` or ``-3``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
        if len(node.args) == 1 and not node.keywords:
            return _int_literal(node.args[0])
        return None
    return _int_literal(node)


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp):
        return f"the Python operator {_OPERATORS.get(type(node.op), type(node.op).__name__)!r}"
    if isinstance(node, ast.Constant):
        return f"the bare literal {_show(node.value)}"
    return f"Python syntax ({type(node).__name__})"


_OPERATORS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
    ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^", ast.MatMult: "@",
}  # fmt: skip
