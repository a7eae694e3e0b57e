"""Mutants of valid model files, drawn by hypothesis strategies (``mutants(fmt, source)``).

A mutant is a valid file (made by the real tools: see ``make_corpus.py``) changed in one to four
*steps*, each chosen to reach a different layer of a reader's logic:

* bytes: a bit flip, an overwritten byte or little-endian integer, a truncation, an insertion,
  a deletion, a duplicated run: what the container's own checks (CRCs, HDF5's structure) meet;
* zip archives (``.pt2``, ``.keras``, ``.pt``): members dropped, duplicated, renamed (another
  member's name, another case, a path out of the archive), replaced, recompressed with another
  method, deflated zeros, changed byte by byte (the CRC stays right, so the bytes reach the
  parser behind it), and the headers patched: declared sizes and CRCs, the encryption flag, an
  unknown compression method, a name that is not UTF-8, the end record's counts;
* JSON members (a ``.pt2``'s program and weight descriptions, a ``.keras`` config, a
  safetensors header): any value replaced by a huge, negative, fractional or wrong-typed one, keys
  deleted or added, lists changed, nesting made deep, numbers of thousands of digits; and
  targeted: a graph node's operator, an operator's arguments, a shape expression, a tensor's
  sizes/strides/dtype/offset/record, a Keras class name, module or layer setting;
* HDF5 (``.h5``, the weights inside a ``.keras``), through h5py: datasets with another shape or
  dtype (declared huge without data, or chunked zeros), attributes replaced or dropped (the JSON
  ``model_config`` gets the JSON steps), objects deleted, soft links that loop, external links
  to other files.

Some steps cannot change the model (a zip comment, a timestamp, bytes outside every member, an
unrelated HDF5 attribute): a mutant made only of those is *inert*, and a reader that reads it must
give the same model as from the source. Everything is drawn from hypothesis, so a seed gives the
same mutants of the same source files.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass

from hypothesis import strategies as st

__all__ = ["Mutant", "mutants", "FORMATS"]

FORMATS = ("pt2", "keras", "h5", "pt", "safetensors")
# what making a mutant may allocate here, in the test's own process: steps repeat on one file, so
# each step that grows something is bounded, and a mutant over MAX_MUTANT_BYTES is a bug of this module
_MAX_REPEATED = 10_000  # characters of a string repeated 64 times
_MAX_WRITTEN = 2**20  # bytes of a dataset written with data
MAX_MUTANT_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Mutant:
    fmt: str
    data: bytes
    steps: tuple[str, ...]  # what was done, in order, for a failure report
    inert: bool  # no step can change the model: if read, it must read as the source does

    def __repr__(self) -> str:  # hypothesis prints it for a failure: the steps, not 30 KB of bytes
        return f"Mutant({self.fmt}, {len(self.data)} bytes, inert={self.inert}, steps={list(self.steps)})"


# --------------------------------------------------------------------------------- hostile values

HOSTILE_INTS = (
    0, 1, -1, 2, 3, 7, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**62,
    2**63 - 1, 2**63, 2**64, 10**20, -(2**31), -(2**63), 10**300,
)  # fmt: skip
HOSTILE_FLOATS = (0.5, -0.0, 1e-300, 1e308, -1e308, 3.5)
HOSTILE_STRINGS = (
    "", " ", "0", "-1", "1e999", "NaN", "null", "\x1b]0;pwned\x07\x1b[2J\x1b[1;32mOK", "\u202eevil", "a\nb",
    "{0.__class__.__mro__}", "{0.__repr__.__func__.__globals__}", "%s%s%n", "../../etc/passwd", "/etc/passwd",
    "__import__('os').system('true')", "builtins.eval", "torch.load", "\ud800", "x" * 5000,
)  # fmt: skip


class Raw:
    """JSON text put in as is: what :func:`json.dumps` would not write (deep nesting, 5000 digits, NaN)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r}...)" if len(self.text) > 20 else f"Raw({self.text!r})"


RAW_VALUES = (
    Raw("[" * 300 + "]" * 300), Raw("[" * 100_000 + "]" * 100_000), Raw('{"a":' * 5000 + "1" + "}" * 5000),
    Raw("1" + "0" * 5000), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("1.5e-400"),
)  # fmt: skip


def hostile_values():
    """Any JSON value an attacker would put where a reader expects something sane."""
    return st.one_of(
        st.sampled_from(HOSTILE_INTS),
        st.integers(),
        st.sampled_from(HOSTILE_FLOATS),
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=12),
        st.sampled_from((None, True, False, [], {}, [[]], [1, 2], {"a": 1})).map(copy.deepcopy),  # edited later
        st.lists(st.sampled_from(HOSTILE_INTS), min_size=1, max_size=6),
        st.sampled_from(RAW_VALUES),
    )


def dumps(value) -> bytes:
    """``value`` as JSON, with every :class:`Raw` as its text."""
    raws: list[str] = []

    def default(obj):
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(obj).__name__)

    text = json.dumps(value, default=default, ensure_ascii=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------------------- bytes


@st.composite
def byte_step(draw, data: bytes) -> tuple[bytes, str]:
    """One raw change of ``data``."""
    n = len(data)
    kinds = ("flip", "byte", "integer", "truncate", "insert", "delete", "repeat") if n else ("insert",)
    kind = draw(st.sampled_from(kinds))
    at = draw(st.integers(0, max(n - 1, 0)))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :], f"flip bit {bit} of byte {at}"
    if kind == "byte":
        value = draw(st.sampled_from((0, 0xFF, 0x7F, 0x80, 0x01)) | st.integers(0, 255))
        return data[:at] + bytes([value]) + data[at + 1 :], f"byte {at} = {value:#x}"
    if kind == "integer":
        width = draw(st.sampled_from((2, 4, 8)))
        value = draw(st.sampled_from(HOSTILE_INTS)) % (1 << (8 * width))
        return data[:at] + value.to_bytes(width, "little") + data[at + width :], f"{width}-byte int at {at} = {value}"
    if kind == "truncate":
        return data[:at], f"truncate to {at} bytes"
    if kind == "insert":
        extra = draw(st.binary(min_size=1, max_size=64))
        return data[:at] + extra + data[at:], f"insert {len(extra)} bytes at {at}"
    length = draw(st.integers(1, 256))
    if kind == "delete":
        return data[:at] + data[at + length :], f"delete {length} bytes at {at}"
    return data[: at + length] + data[at : at + length] + data[at + length :], f"repeat {length} bytes at {at}"


# ------------------------------------------------------------------------------------------- JSON


def _paths(value, path=()):
    """Every node's path (keys and indices), the root first."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*path, i))


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _set(doc, path, value):
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _show_path(path) -> str:
    return "/".join(str(p) for p in path) or "(root)"


@st.composite
def json_step(draw, doc):
    """One change of a parsed JSON document (changed in place, or a new root returned)."""
    path = draw(st.sampled_from(list(_paths(doc))))
    node = _get(doc, path)
    ops = ["value"]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        ops += ["near", "near", "as string"]
    if isinstance(node, str):
        ops += ["other string"] + (["longer"] if len(node) <= _MAX_REPEATED else [])
    if isinstance(node, dict) and node:
        ops += ["delete key", "add key", "delete key"]
    if isinstance(node, list) and node:
        ops += ["delete item", "repeat item", "append", "reverse"]
    op = draw(st.sampled_from(ops))
    where = _show_path(path)
    if op == "value":
        value = draw(hostile_values())
        return _set(doc, path, value), f"{where} = {_short(value)}"
    if op == "near":
        near = [node + 1, node - 1, node * 2, -node, node * 2**20]
        if abs(node) < 1e300:  # a float beside it (larger ints have none)
            near.append(node + 0.5)
        value = draw(st.sampled_from(near))
        return _set(doc, path, value), f"{where} = {_short(value)}"
    if op == "as string":
        return _set(doc, path, str(node)), f"{where} as the string {str(node)!r}"
    if op == "other string":
        strings = sorted({v for p in _paths(doc) if isinstance(v := _get(doc, p), str)})
        value = draw(st.sampled_from(strings))
        return _set(doc, path, value), f"{where} = {_short(value)}"
    if op == "longer":
        return _set(doc, path, node * 64), f"{where} repeated 64 times"
    if op == "delete key":
        key = draw(st.sampled_from(sorted(node)))
        del node[key]
        return doc, f"delete {_show_path((*path, key))}"
    if op == "add key":
        key = draw(st.text(max_size=8) | st.sampled_from(sorted(node)).map(lambda k: k + "_"))
        node[key] = draw(hostile_values())
        return doc, f"add {_show_path((*path, key))} = {_short(node[key])}"
    i = draw(st.integers(0, len(node) - 1))
    if op == "delete item":
        del node[i]
        return doc, f"delete {where}/{i}"
    if op == "repeat item":
        node.insert(i, json.loads(json.dumps(node[i], default=repr)) if not _has_raw(node[i]) else node[i])
        return doc, f"repeat {where}/{i}"
    if op == "append":
        node.append(draw(hostile_values()))
        return doc, f"append {_short(node[-1])} to {where}"
    node.reverse()
    return doc, f"reverse {where}"


def _has_raw(value) -> bool:
    return any(isinstance(_get(value, p), Raw) for p in _paths(value))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# targeted JSON steps: what a generic step reaches once in a thousand nodes

OPERATOR_TARGETS = (
    "torch.ops.aten.add.Tensor", "torch.ops.aten.mul.Tensor", "torch.ops.aten.relu.default",
    "torch.ops.aten.conv2d.default", "torch.ops.aten.linear.default", "torch.ops.aten.view.default",
    "torch.ops.aten.expand.default", "torch.ops.aten.repeat.default", "torch.ops.aten.zeros.default",
    "torch.ops.aten.full.default", "torch.ops.aten.empty.memory_format", "torch.ops.aten.arange.default",
    "torch.ops.aten._print.default", "torch.ops.aten.save.default", "torch.ops.aten.from_file.default",
    "torch.ops.higher_order.while_loop", "torch.ops.higher_order.cond", "torch.ops.higher_order.map_impl",
    "torch.ops.aten.nonexistent.default", "torch.ops.aten", "builtins.print", "builtins.eval", "os.system",
    "torch.load", "_operator.getitem", "_operator.pow", "math.floor", "torch.sym_max", "",
)  # fmt: skip
SYMBOL = "Symbol('s77', positive=True, integer=True)"
EXPRESSIONS = (
    "Integer(10)**Integer(10)**Integer(10)", "Pow(Integer(10), Integer(100000000))", "9**9**9",
    "Integer(2)**Integer(68719476736)", "Float('1e999999999')", "Float('1.5')", "Rational(1, 3)",
    "Mul(Integer(-1), " + SYMBOL + ")", "Add(" + SYMBOL + ", Integer(-2))", "Integer(0)", "Integer(-5)",
    "Symbol('s0')", "s77", "oo", "zoo", "nan", "Max(" + SYMBOL + ", Integer(4611686018427387904))",
    "FloorDiv(" + SYMBOL + ", Integer(0))", "Mod(" + SYMBOL + ", Integer(0))", "Symbol('s77', positive=True)",
    "Piecewise((Integer(1), Eq(" + SYMBOL + ", Integer(3))), (Integer(2), True))",
    "__import__('os').system('true')", "lambda: 0", "(" * 500 + "1" + ")" * 500, "Integer(1" + "0" * 5000 + ")",
)  # fmt: skip


_FUNCTIONS = ("Add", "Mul", "Pow", "Mod", "FloorDiv", "Max", "Min", "CeilDiv", "PowByNatural", "LShift")


@st.composite
def shape_expressions(draw, depth: int = 3):
    """Integer arithmetic over the program's batch size, nested a few levels: what torch would write, and worse."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(HOSTILE_INTS).map(lambda n: f"Integer({n})") | st.just(SYMBOL))
    function = draw(st.sampled_from(_FUNCTIONS))
    return f"{function}({draw(shape_expressions(depth - 1))}, {draw(shape_expressions(depth - 1))})"


def _nodes_with(doc, keys) -> list:
    """The paths of every dict in ``doc`` that has all of ``keys``."""
    return [p for p in _paths(doc) if isinstance(n := _get(doc, p), dict) and set(keys) <= n.keys()]


@st.composite
def program_step(draw, doc):
    """A targeted change of a ``.pt2``'s program or tensor descriptions; None when it has no such part."""
    kinds = []
    if _nodes_with(doc, ("target", "inputs")):
        kinds += ["target", "argument"]
    if _nodes_with(doc, ("expr_str",)):
        kinds.append("expression")
    if _nodes_with(doc, ("sizes", "strides")):
        kinds += ["tensor", "tensor"]
    if _nodes_with(doc, ("path_name", "tensor_meta")):
        kinds.append("record")
    if not kinds:
        return None
    kind = draw(st.sampled_from(kinds))
    if kind == "target":
        path = draw(st.sampled_from(_nodes_with(doc, ("target", "inputs"))))
        target = draw(st.sampled_from(OPERATOR_TARGETS))
        _get(doc, path)["target"] = target
        return doc, f"node {_show_path(path)} calls {target!r}"
    if kind == "argument":
        paths = [p for p in _nodes_with(doc, ("arg",)) if isinstance(_get(doc, p)["arg"], dict) and _get(doc, p)["arg"]]
        if not paths:
            return None
        path = draw(st.sampled_from(paths))
        arg = _get(doc, path)["arg"]
        kind_of = draw(st.sampled_from(sorted(arg)))
        value = draw(
            st.one_of(
                hostile_values(),
                st.lists(st.sampled_from(HOSTILE_INTS), max_size=5),
                st.sampled_from(HOSTILE_STRINGS),
                st.sampled_from(({"name": "nonexistent"}, {"name": "x"}, {"as_int": 10**9})),
            )
        )
        new_kind = draw(st.sampled_from((kind_of, kind_of, "as_int", "as_ints", "as_float", "as_string", "as_tensor")))
        _get(doc, path)["arg"] = {new_kind: value}
        return doc, f"argument {_show_path(path)} = {{{new_kind!r}: {_short(value)}}} (was {kind_of})"
    if kind == "expression":
        path = draw(st.sampled_from(_nodes_with(doc, ("expr_str",))))
        expression = draw(st.sampled_from(EXPRESSIONS) | shape_expressions())
        _get(doc, path)["expr_str"] = expression
        return doc, f"expression {_show_path(path)} = {_short(expression)}"
    if kind == "record":
        path = draw(st.sampled_from(_nodes_with(doc, ("path_name", "tensor_meta"))))
        entry = _get(doc, path)
        field = draw(st.sampled_from(("path_name", "use_pickle", "is_param")))
        if field == "path_name":
            names = sorted(
                {n for p in _nodes_with(doc, ("path_name",)) if isinstance(n := _get(doc, p)["path_name"], str)}
            )
            value = draw(st.sampled_from(names) | st.sampled_from(("weight_99", "../weight_0", "", "data.pkl")))
        else:
            value = not entry.get(field)
        entry[field] = value
        return doc, f"{_show_path(path)}/{field} = {value!r}"
    path = draw(st.sampled_from(_nodes_with(doc, ("sizes", "strides"))))
    meta = _get(doc, path)
    field = draw(st.sampled_from(("sizes", "strides", "sizes", "dtype", "storage_offset", "requires_grad", "layout")))
    where = f"{_show_path(path)}/{field}"
    if field in ("sizes", "strides") and isinstance(meta[field], list):
        dims = meta[field]
        op = draw(st.sampled_from(("set", "set", "add dim", "drop dim", "expression")))
        if op == "set" and dims:
            i = draw(st.integers(0, len(dims) - 1))
            value = draw(st.sampled_from(HOSTILE_INTS))
            dims[i] = {"as_int": value}
            return doc, f"{where}[{i}] = {value}"
        if op == "drop dim" and dims:
            dims.pop()
            return doc, f"{where}: last dim dropped"
        if op == "expression":
            i = draw(st.integers(0, max(len(dims) - 1, 0)))
            expression = draw(st.sampled_from(EXPRESSIONS) | shape_expressions())
            dims[i : i + 1] = [{"as_expr": {"expr_str": expression, "hint": {"as_int": 2}}}]
            return doc, f"{where}[{i}] = {_short(expression)}"
        value = draw(st.sampled_from(HOSTILE_INTS))
        dims.append({"as_int": value})
        return doc, f"{where}: dim {value} added"
    if field == "dtype":
        value = draw(st.integers(0, 50) | st.sampled_from(HOSTILE_INTS) | st.sampled_from(("float32", None)))
    elif field == "storage_offset":
        value = {"as_int": draw(st.sampled_from(HOSTILE_INTS))}
    else:
        value = draw(st.sampled_from((True, False, 0, 1, 7, 99, None)))
    meta[field] = value
    return doc, f"{where} = {_short(value)}"


KERAS_CLASSES = (
    "Lambda", "TFOpLambda", "Functional", "Sequential", "Model", "Dense", "Conv2D", "BatchNormalization",
    "InputLayer", "Add", "Concatenate", "Reshape", "Embedding", "TorchModuleWrapper", "\x1b]0;pwned\x07Dense",
    "os.system", "builtins.eval", "__main__.Evil", "", "function", "Conv2D" * 100,
)  # fmt: skip
KERAS_MODULES = ("builtins", "os", "subprocess", "keras.src.ops", "keras.layers", "keras.src.saving", "torch", "")
KERAS_SETTINGS = (
    "units", "filters", "kernel_size", "strides", "pool_size", "batch_shape", "axis", "momentum", "epsilon",
    "dilation_rate", "groups", "padding", "dtype", "name", "trainable", "synchronized", "center", "scale",
    "inbound_nodes", "input_layers", "output_layers", "activation", "data_format", "use_bias", "sparse",
)  # fmt: skip


@st.composite
def keras_config_step(draw, doc):
    """A targeted change of a Keras ``config.json`` (or ``model_config``); None when nothing fits."""
    kind = draw(st.sampled_from(("class", "module", "setting", "setting", "layer name")))
    if kind in ("class", "module"):
        key = "class_name" if kind == "class" else "module"
        paths = _nodes_with(doc, (key,))
        if not paths:
            return None
        path = draw(st.sampled_from(paths))
        value = draw(st.sampled_from(KERAS_CLASSES if kind == "class" else KERAS_MODULES))
        _get(doc, path)[key] = value
        return doc, f"{_show_path(path)}/{key} = {value!r}"
    if kind == "layer name":
        paths = [p for p in _nodes_with(doc, ("name",)) if isinstance(_get(doc, p)["name"], str)]
        if not paths:
            return None
        path = draw(st.sampled_from(paths))
        names = sorted({_get(doc, p)["name"] for p in paths})
        value = draw(st.sampled_from(names) | st.sampled_from(HOSTILE_STRINGS))
        _get(doc, path)["name"] = value
        return doc, f"{_show_path(path)}/name = {_short(value)}"
    setting = draw(st.sampled_from(KERAS_SETTINGS))
    paths = _nodes_with(doc, (setting,))
    if not paths:
        return None
    path = draw(st.sampled_from(paths))
    old = _get(doc, path)[setting]
    choices = hostile_values()
    if isinstance(old, list) and old:
        choices = choices | st.lists(st.sampled_from(HOSTILE_INTS), min_size=len(old), max_size=len(old))
    value = draw(choices)
    _get(doc, path)[setting] = value
    return doc, f"{_show_path(path)}/{setting} = {_short(value)}"


@st.composite
def json_member_step(draw, data: bytes, targeted=None):
    """A JSON document's bytes changed by a generic or (``targeted``) format-aware step; None if not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if targeted is not None and draw(st.booleans()):
        changed = draw(targeted(doc))
        if changed is not None:
            doc, step = changed
            return dumps(doc), step
    doc, step = draw(json_step(doc))
    return dumps(doc), step


# -------------------------------------------------------------------------------------------- zip


@dataclass
class Member:
    name: str
    data: bytes
    method: int
    date: tuple


def read_zip(data: bytes) -> list[Member] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [
                Member(info.filename, archive.read(info), info.compress_type, info.date_time)
                for info in archive.infolist()
            ]
    except Exception:  # noqa: BLE001 - an archive an earlier step broke: the zip steps do not apply
        return None


def write_zip(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        with zipfile.ZipFile(buffer, "w") as archive:
            for member in members:
                info = zipfile.ZipInfo(member.name, date_time=member.date)
                info.compress_type = member.method
                archive.writestr(info, member.data)
    return buffer.getvalue()


_METHODS = {"stored": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2,
            "lzma": zipfile.ZIP_LZMA}  # fmt: skip


@st.composite
def member_step(draw, members: list[Member], fmt: str):
    """One change of an archive's members (``members`` changed in place); returns (step, inert)."""
    if not members:
        return "no member to change", True
    parsed = [j for j, x in enumerate(members) if x.name.endswith((".json", ".h5", ".pkl", ".pt"))]
    if parsed and draw(st.booleans()):  # half the time, one a reader parses (not a raw tensor record)
        i = draw(st.sampled_from(parsed))
    else:
        i = draw(st.integers(0, len(members) - 1))
    m = members[i]
    json_like = m.name.endswith(".json")
    h5_like = m.name.endswith(".h5")
    zip_like = m.data[:4] == b"PK\x03\x04"
    kinds = ["drop", "duplicate", "rename", "replace", "recompress", "bytes", "bytes", "zeros"]
    if json_like:
        kinds += ["json"] * 6
    if h5_like:
        kinds += ["h5"] * 4
    if zip_like:
        kinds += ["inner zip"] * 2
    kind = draw(st.sampled_from(kinds))
    name = repr(m.name)
    if kind == "drop":
        del members[i]
        return f"drop {name}", False
    if kind == "duplicate":
        other = draw(st.sampled_from([x.data for x in members]) | st.just(m.data))
        members.insert(i + 1, Member(m.name, other, m.method, m.date))
        return f"a second member named {name}", False
    if kind == "rename":
        root, _, rest = m.name.rpartition("/")
        new = draw(
            st.sampled_from(sorted({x.name for x in members}))
            | st.sampled_from((m.name.upper(), m.name + "x", "../" + m.name, "/" + m.name, rest, m.name + "/",
                               f"{root}/../{rest}", m.name.replace("/", "\\"), m.name * 20))
            | st.text(min_size=1, max_size=12)
        )  # fmt: skip
        members[i] = Member(new, m.data, m.method, m.date)
        return f"rename {name} to {new!r}", False
    if kind == "replace":
        data = draw(
            st.binary(max_size=64) | st.sampled_from([x.data for x in members]) | st.just(m.data[: len(m.data) // 2])
        )
        members[i] = Member(m.name, data, m.method, m.date)
        return f"replace {name} by {len(data)} bytes", False
    if kind == "recompress":
        method = draw(st.sampled_from(sorted(_METHODS)))
        members[i] = Member(m.name, m.data, _METHODS[method], m.date)
        return f"recompress {name} with {method}", False  # the same bytes: a reader might still refuse the method
    if kind == "zeros":
        size = draw(st.sampled_from((2**20, 2**24)))
        members[i] = Member(m.name, bytes(size), zipfile.ZIP_DEFLATED, m.date)
        return f"replace {name} by {size} deflated zeros", False
    if kind == "bytes":
        data, step = draw(byte_step(m.data)) if m.data else (b"\x00", "one byte")
        members[i] = Member(m.name, data, m.method, m.date)
        return f"in {name}: {step}", False
    if kind == "json":
        targeted = program_step if fmt == "pt2" else keras_config_step if fmt == "keras" else None
        changed = draw(json_member_step(m.data, targeted))
        if changed is None:
            return f"{name} is not JSON: unchanged", True
        members[i] = Member(m.name, changed[0], m.method, m.date)
        return f"in {name}: {changed[1]}", False
    if kind == "h5":
        data, step, inert = draw(h5_step(m.data))
        members[i] = Member(m.name, data, m.method, m.date)
        return f"in {name}: {step}", inert
    inner = read_zip(m.data)
    if inner is None:
        return f"{name} is not a zip: unchanged", True
    step, inert = draw(member_step(inner, "inner"))
    members[i] = Member(m.name, write_zip(inner), m.method, m.date)
    return f"in {name}: {step}", inert


def zip_records(data: bytes) -> list[tuple[int, int]]:
    """``(central header offset, local header offset)`` of each member, read from the central directory."""
    end = data.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 > len(data):
        return []
    count, _, start = struct.unpack_from("<HII", data, end + 10)
    records, at = [], start
    for _ in range(count):
        if data[at : at + 4] != b"PK\x01\x02" or at + 46 > len(data):
            break
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        local = struct.unpack_from("<I", data, at + 42)[0]
        records.append((at, local))
        at += 46 + name_len + extra_len + comment_len
    return records


# (where, field): offset in that header, width
_HEADER_FIELDS = {
    ("local", "flags"): (6, 2), ("local", "method"): (8, 2), ("local", "crc"): (14, 4),
    ("local", "compressed size"): (18, 4), ("local", "size"): (22, 4), ("local", "name length"): (26, 2),
    ("local", "extra length"): (28, 2), ("central", "flags"): (8, 2), ("central", "method"): (10, 2),
    ("central", "crc"): (16, 4), ("central", "compressed size"): (20, 4), ("central", "size"): (24, 4),
    ("central", "name length"): (28, 2), ("central", "offset"): (42, 4),
}  # fmt: skip
_END_FIELDS = {"entries on this disk": (8, 2), "entries": (10, 2), "directory size": (12, 4),
               "directory offset": (16, 4)}  # fmt: skip


def _patch(data: bytes, at: int, width: int, value: int) -> bytes:
    if at < 0 or at + width > len(data):
        return data
    return data[:at] + (value % (1 << 8 * width)).to_bytes(width, "little") + data[at + width :]


@st.composite
def header_step(draw, data: bytes):
    """One change of a zip's headers (declared sizes, flags, method, names, end record); returns (data, step)."""
    records = zip_records(data)
    if not records:
        return data, "no zip directory: unchanged"
    kind = draw(st.sampled_from(("field", "field", "encrypted", "method", "name", "end")))
    i = draw(st.integers(0, len(records) - 1))
    central, local = records[i]
    if kind == "end":
        field = draw(st.sampled_from(sorted(_END_FIELDS)))
        offset, width = _END_FIELDS[field]
        value = draw(st.sampled_from(HOSTILE_INTS))
        value %= 1 << 8 * width
        return _patch(data, data.rfind(b"PK\x05\x06") + offset, width, value), f"end record: {field} = {value}"
    if kind == "encrypted":
        for at in (local + 6, central + 8):
            if at + 2 <= len(data):
                data = _patch(data, at, 2, struct.unpack_from("<H", data, at)[0] | 1)
        return data, f"member {i} flagged encrypted"
    if kind == "method":
        method = draw(st.sampled_from((1, 6, 9, 12, 14, 93, 95, 96, 97, 98, 99, 0xFFFF)) | st.integers(0, 0xFFFF))
        data = _patch(_patch(data, local + 8, 2, method), central + 10, 2, method)
        return data, f"member {i}: compression method {method}"
    if kind == "name":
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if not name_len:
            return data, "empty name: unchanged"
        j = draw(st.integers(0, name_len - 1))
        byte = draw(st.sampled_from((0xFF, 0x80, 0xC3, 0x00, 0x2F)))
        for start, flags in ((local + 30, local + 6), (central + 46, central + 8)):
            data = _patch(data, start + j, 1, byte)
            if flags + 2 <= len(data):
                data = _patch(data, flags, 2, struct.unpack_from("<H", data, flags)[0] | 0x800)  # "names are UTF-8"
        return data, f"member {i}: name byte {j} = {byte:#x}, flagged UTF-8"
    where, field = draw(st.sampled_from(sorted(_HEADER_FIELDS)))
    offset, width = _HEADER_FIELDS[(where, field)]
    at = (local if where == "local" else central) + offset
    old = int.from_bytes(data[at : at + width], "little") if at + width <= len(data) else 0
    value = draw(st.sampled_from((old + 1, old - 1, 0, old * 2, old * 1000, 2**31, 2**32 - 1, 2**32 - 2))
                 | st.integers(0, 2**32 - 1))  # fmt: skip
    return _patch(data, at, width, value), f"member {i}: {where} {field} = {value % (1 << 8 * width)} (was {old})"


@st.composite
def zip_inert_step(draw, data: bytes):
    """A change that leaves every member as it was: a comment, a timestamp, bytes before or after."""
    kind = draw(st.sampled_from(("comment", "timestamp", "prefix", "suffix")))
    end = data.rfind(b"PK\x05\x06")
    if end < 0:
        return data, "no zip end record: unchanged"
    if kind == "comment":
        comment = draw(st.binary(max_size=200).filter(lambda b: b"PK" not in b))
        return data[: end + 20] + struct.pack("<H", len(comment)) + comment, f"zip comment of {len(comment)} bytes"
    if kind == "timestamp":
        stamp = draw(st.integers(0, 0xFFFF))
        for central, local in zip_records(data):
            data = _patch(_patch(data, local + 10, 2, stamp), central + 12, 2, stamp)
        return data, f"every member's time = {stamp:#x}"
    extra = draw(st.binary(min_size=1, max_size=512).filter(lambda b: b"PK" not in b))
    if kind == "suffix":
        return data + extra, f"{len(extra)} bytes after the end record"
    return extra + data, f"{len(extra)} bytes before the first member"


# ------------------------------------------------------------------------------------------- HDF5


def _h5_objects(f):
    found = []
    f.visititems(lambda name, obj: found.append(name))
    return sorted(found)


def h5_inert_step(data: bytes):
    """A change of an HDF5 file that keeps what a reader reads (an unrelated attribute on the root)."""
    return h5_step(data, inert=True)


@st.composite
def h5_step(draw, data: bytes, inert: bool = False):
    """One change of an HDF5 file through h5py; returns (data, step, inert)."""
    import h5py
    import numpy as np

    fd, path = tempfile.mkstemp(suffix=".h5")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            f = h5py.File(path, "r+")
        except Exception:  # noqa: BLE001 - an earlier step broke the file
            return data, "not an HDF5 file: unchanged", True
        with f:
            try:
                step, inert = _h5_change(draw, f, h5py, np, inert)
            except Exception as e:  # noqa: BLE001 - h5py refused a change half-way: the file is a mutant still
                step, inert = f"a change h5py refused half-way ({type(e).__name__}: {e})", False
        with open(path, "rb") as f:
            return f.read(), step, inert
    finally:
        os.unlink(path)


def _h5_change(draw, f, h5py, np, inert_only=False):
    names = _h5_objects(f)
    datasets = [n for n in names if isinstance(f.get(n, getlink=False), h5py.Dataset)]
    with_attrs = [n for n in ["/", *names] if len(f[n].attrs)]
    kinds = ["inert attribute", "delete", "soft link", "external link", "hard link"]
    kinds += ["dataset shape", "dataset shape", "dataset dtype", "dataset huge"] if datasets else []
    kinds += ["attribute", "attribute", "attribute"] if with_attrs else []
    kind = "inert attribute" if inert_only else draw(st.sampled_from(kinds))
    if kind == "inert attribute":
        f.attrs["fuzz_note"] = draw(st.sampled_from(("x", "y" * 1000)) | st.integers(0, 10))
        return "an unrelated attribute on the root", True
    if kind == "attribute":
        owner = draw(st.sampled_from(with_attrs))
        key = draw(st.sampled_from(sorted(f[owner].attrs)))
        return _h5_attribute(draw, f[owner].attrs, key, np) + f" (on {owner})", False
    name = draw(st.sampled_from(names or ["/"]))
    if kind == "delete" and names:
        del f[name]
        return f"delete {name}", False
    if kind == "soft link":
        parent = name.rpartition("/")[0] or "/"
        target = draw(st.sampled_from((f"/{parent}", "/", f"/{name}", "/nowhere")))
        link = draw(st.sampled_from((name, f"{name}_link")))
        if link in f:
            del f[link]
        f[link] = h5py.SoftLink(target)
        return f"{link} -> soft link to {target}", False
    if kind == "external link":
        if name in f:
            del f[name]
        target = draw(st.sampled_from(("/etc/passwd", "/proc/self/environ", "small.h5", "/dev/zero")))
        f[name] = h5py.ExternalLink(target, "/")
        return f"{name} -> external link to {target}", False
    if kind == "hard link":
        other = draw(st.sampled_from(names or ["/"]))
        if other == name or name not in f:
            return "hard link to itself: unchanged", True
        obj = f[other]
        del f[name]
        f[name] = obj
        return f"{name} -> hard link to {other}", False
    name = draw(st.sampled_from(datasets))
    old = f[name]
    shape, dtype = old.shape, old.dtype
    del f[name]
    if kind == "dataset huge":
        shape = draw(st.sampled_from(((2**31,), (2**20, 2**20), (2**62,), (4096, 4096, 64))))
        chunked = draw(st.booleans())
        f.create_dataset(name, shape=shape, dtype=dtype, chunks=(1024,) * len(shape) if chunked else None,
                         maxshape=shape if chunked else None)  # fmt: skip
        return f"{name} declared {shape}, no data ({'chunked' if chunked else 'contiguous'})", False
    if kind == "dataset dtype":
        dtype = draw(st.sampled_from(("float16", "float64", "int8", "int64", "bool", "complex64", "S8", "uint8")))
        f.create_dataset(name, shape=shape, dtype=dtype)
        return f"{name} as {dtype}", False
    new = draw(
        st.sampled_from(((), (0,), tuple(reversed(shape)), shape[:-1], (*shape, 1), tuple(2 * s for s in shape)))
        | st.lists(st.integers(0, 8), max_size=4).map(tuple)
    )
    if math.prod(new) * dtype.itemsize <= _MAX_WRITTEN:
        f.create_dataset(name, data=np.ones(new, dtype=dtype))
    else:  # an earlier step declared it huge: declared again, never allocated here
        f.create_dataset(name, shape=new, dtype=dtype)
    return f"{name} shaped {new} (was {shape})", False


def _h5_attribute(draw, attrs, key, np):
    value = attrs[key]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if isinstance(text, str):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if doc is not None and isinstance(doc, (dict, list)):
            changed = draw(json_member_step(text.encode(), keras_config_step))
            if changed is not None:
                attrs[key] = changed[0].decode("utf-8", "surrogateescape")
                return f"attribute {key}: {changed[1]}"
    kind = draw(st.sampled_from(("delete", "value", "names")))
    if kind == "delete":
        del attrs[key]
        return f"attribute {key} deleted"
    if kind == "names" and getattr(value, "shape", ()) and len(value):
        items = list(value)
        op = draw(st.sampled_from(("drop", "repeat", "rename")))
        j = draw(st.integers(0, len(items) - 1))
        if op == "drop":
            del items[j]
        elif op == "repeat":
            items.insert(j, items[j])
        else:
            items[j] = draw(st.sampled_from(HOSTILE_STRINGS[:12])).encode("utf-8")
        attrs[key] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in items]
        return f"attribute {key}: item {j} {op}"
    new = draw(
        st.sampled_from(HOSTILE_INTS[:-1]) | st.sampled_from(HOSTILE_FLOATS) | st.sampled_from(HOSTILE_STRINGS[:12])
        | st.just(np.zeros((3, 3))) | st.just(np.array([], dtype="float64"))
    )  # fmt: skip
    try:
        attrs[key] = new
    except (TypeError, ValueError, OverflowError):
        del attrs[key]
        return f"attribute {key} deleted (h5py cannot store {_short(new)})"
    return f"attribute {key} = {_short(new)}"


# ------------------------------------------------------------------------------------ safetensors


@st.composite
def safetensors_step(draw, data: bytes, inert: bool = False):
    """A change of a safetensors file's JSON header (length-prefixed); returns (data, step, inert).

    ``inert``: only a change that keeps every tensor (a ``__metadata__`` entry)."""
    if len(data) < 8:
        return data, "no header: unchanged", True
    length = int.from_bytes(data[:8], "little")
    header, body = data[8 : 8 + length], data[8 + length :]
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        return data, "header is not JSON: unchanged", True
    kind = "metadata" if inert else draw(st.sampled_from(("json", "json", "tensor", "tensor", "metadata", "length")))
    if kind == "length":
        value = draw(st.sampled_from(HOSTILE_INTS) | st.sampled_from((length + 1, length - 1, len(data))))
        return _patch(data, 0, 8, value), f"header length = {value % 2**64} (was {length})", False
    if kind == "metadata" and isinstance(doc, dict):
        meta = doc.setdefault("__metadata__", {})
        if isinstance(meta, dict):
            meta[draw(st.text(max_size=8))] = draw(st.text(max_size=16))
            return _header(doc, body), "a __metadata__ entry added", True
    tensors = sorted(k for k, v in doc.items() if isinstance(v, dict) and "dtype" in v) if isinstance(doc, dict) else []
    if kind == "tensor" and tensors:
        name = draw(st.sampled_from(tensors))
        field = draw(st.sampled_from(("dtype", "shape", "data_offsets")))
        if field == "dtype":
            value = draw(st.sampled_from(("F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", "")))
        elif field == "shape":
            value = draw(st.lists(st.sampled_from(HOSTILE_INTS), max_size=4) | st.just([]))
        else:
            offsets = doc[name].get("data_offsets")
            valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
            start, stop = offsets if valid else (0, 0)  # an earlier step changed them
            lying = ([stop, start], [start, start], [0, len(body) + 4], [start, 2**64 - 1], [start + 1, stop + 1])
            value = draw(st.sampled_from(lying) | st.lists(st.sampled_from(HOSTILE_INTS), min_size=2, max_size=2))
        doc[name][field] = value
        return _header(doc, body), f"{name}/{field} = {_short(value)}", False
    doc, step = draw(json_step(doc))
    return _header(doc, body), step, False


def _header(doc, body: bytes) -> bytes:
    header = dumps(doc)
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + body


# -------------------------------------------------------------------------------------- mutants


# how a mutant is made: mostly by structured steps, which reach the logic behind the container's
# checks; a corrupt container (headers, raw bytes) stops most readers at its first check
_PLANS = ("structured",) * 6 + ("headers", "headers", "bytes", "bytes", "everything", "inert")


class _Source(bytes):
    """A valid file's bytes, shown by their size (hypothesis shows a strategy's arguments)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def mutants(fmt: str, source: bytes):
    """A strategy of :class:`Mutant` s of ``source`` (a valid file of format ``fmt``, one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    return _mutants(fmt, _Source(source))


@st.composite
def _mutants(draw, fmt: str, source: bytes):
    zipped = fmt in ("pt2", "keras", "pt")
    plan = draw(st.sampled_from(_PLANS if zipped else tuple(p for p in _PLANS if p != "headers")))
    steps: list[str] = []
    inert = True
    data = bytes(source)
    if plan == "inert":
        if zipped:
            data, step = draw(zip_inert_step(data))
        elif fmt == "h5":
            data, step, inert = draw(h5_inert_step(data))
        else:
            data, step, inert = draw(safetensors_step(data, inert=True))
        return Mutant(fmt, data, (step,), inert)
    if plan in ("structured", "everything"):
        count = draw(st.integers(1, 3))
        if zipped:
            members = read_zip(data)
            original = list(members)
            for _ in range(count):
                step, step_inert = draw(member_step(members, fmt))
                steps.append(step)
                inert = inert and step_inert
            if members != original:
                data = write_zip(members)  # rewritten only when a member changed, the rest keep the tool's layout
        else:
            file_step = h5_step if fmt == "h5" else safetensors_step
            for _ in range(count):
                data, step, step_inert = draw(file_step(data))
                steps.append(step)
                inert = inert and step_inert
    if zipped and plan in ("headers", "everything"):
        data, step = draw(header_step(data))
        steps.append(step)
        inert = False
    if zipped and plan != "bytes" and draw(st.integers(0, 3)) == 0:
        data, step = draw(zip_inert_step(data))
        steps.append(step)
    if plan in ("bytes", "everything"):
        for _ in range(draw(st.integers(1, 2))):
            data, step = draw(byte_step(data))
            steps.append(step)
            inert = False
    assert len(data) <= MAX_MUTANT_BYTES, f"a mutant of {len(data)} bytes: {steps}"
    return Mutant(fmt, data, tuple(steps), inert)
