"""``.onnx``: an ONNX model (``onnx.ModelProto``), read as data.

An ONNX file is a protobuf message: parsing it runs nothing. What makes reading one unsafe is what
``onnx.load`` does around the parse, so :func:`read` does that part itself:

* **Memory.** The file's bytes are charged to the :class:`~bnkit.formats.limits.Budget` before it is
  parsed (:data:`PROTO_EXPANSION` times its size: the Python objects the parse builds), and every
  tensor kept in an external file is charged (``prod(dims) × element size``) before it is read.
* **External data** (``external_data`` entries ``location``/``offset``/``length``): the ``location``
  must be a relative path inside the model's folder after every symbolic link is resolved (no ``..``,
  no absolute path, no link leading out, a regular file); ``offset + length`` must lie within that
  file; a tensor whose ``dims × element size`` is more than its data (``length``, what is left of the
  file after ``offset``, or the ``raw_data``/typed values stored inline) is refused by name. The bytes
  are read into ``raw_data``, so the returned model carries all its data and no file path.
* **Operators.** A node must be an operator of the standard domains :data:`STANDARD_DOMAINS`
  (``""``, its alias ``"ai.onnx"``, and ``"ai.onnx.ml"``) that ``onnx.defs`` knows, or a call of a
  function defined in the model itself (``model.functions``, whose bodies are checked the same way;
  a function is a graph of standard operators, data like the rest). Anything else (a custom domain
  such as onnxruntime's ``com.microsoft``, the training domain ``ai.onnx.preview.training``, an
  unknown ``op_type`` in the standard domain) is refused naming the node, its ``op_type`` and domain.
  bnkit never loads a custom-operator library (``SessionOptions.register_custom_ops_library``), so
  such a node could not run anyway.
* ``onnx.checker.check_model`` then checks the graph against the operator schemas; its message
  becomes the cause in the one-line :class:`~bnkit.formats.ModelFileError`. It runs once the data is
  in the model (on external references it opens files relative to the working folder), and not on a model
  of 2 GiB or more, which protobuf cannot serialise for it (the checks above still apply).

Needs ``onnx`` (``pip install 'bnkit[onnx]'``); ``import bnkit`` imports neither onnx nor onnxruntime.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.limits import TENSOR_OVERHEAD, Budget
from bnkit.text import one_line, printable

__all__ = ["read", "load", "STANDARD_DOMAINS", "is_standard_domain"]

#: The operator domains an ONNX model may use: the default domain ("" and its alias "ai.onnx") and the
#: classical machine-learning one. ``ai.onnx.preview.training`` (Gradient, Adam, ...) and vendors'
#: domains (``com.microsoft``, ...) are refused: they are not part of inference graphs bnkit reads.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

#: Bytes of Python objects per byte of protobuf once parsed (the message holds its tensors' bytes once).
PROTO_EXPANSION = 2
_PROTOBUF_LIMIT = 2**31
_DOMAINS = ", ".join(map(repr, STANDARD_DOMAINS))

# element sizes in bits of the types numpy has no exact itemsize for (packed sub-byte types)
_SUB_BYTE_BITS = {"UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}


def is_standard_domain(domain: str) -> bool:
    return domain in STANDARD_DOMAINS


def _onnx():
    from bnkit.frameworks import import_optional

    return import_optional("onnx", "reading an .onnx model")


def load(path: str | os.PathLike, budget: Budget | None = None):
    """The ``onnx.ModelProto`` in ``path``, read safely (see the module doc); ``budget`` defaults to
    :class:`~bnkit.formats.limits.ReadLimits`' default. Errors are :class:`ModelFileError`."""
    from bnkit.formats.limits import LimitExceeded, ReadLimits

    path = Path(path)
    try:
        return read(path, budget or ReadLimits().budget())
    except LimitExceeded as e:
        raise ModelFileError(f"{printable(str(path))}: refused: {e}") from e


def read(path: Path, budget: Budget):
    """The registered reader (:mod:`bnkit.formats`): ``path`` → ``onnx.ModelProto`` with its external data in it."""
    from bnkit.frameworks import MissingFramework

    shown = printable(str(path))
    try:
        onnx = _onnx()
    except MissingFramework as e:  # one line: "reading an .onnx model needs onnx, ... (pip install 'bnkit[onnx]')"
        raise ModelFileError(f"{shown}: {e}") from e
    size = path.stat().st_size
    budget.charge(size * PROTO_EXPANSION, f"the ONNX model ({size:,} bytes of protobuf)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # google.protobuf.message.DecodeError, or onnx's own
        raise ModelFileError(f"{shown}: not a readable ONNX model ({type(e).__name__}: {one_line(e)})") from e
    if not model.HasField("graph"):
        raise ModelFileError(f"{shown}: not an ONNX model (no graph: another protobuf, or an empty file?)")
    _check_operators(model, shown)
    folder = path.resolve().parent
    for where, tensor in _tensors(model):
        _check_tensor(tensor, where, folder, budget, shown)
    if model.ByteSize() >= _PROTOBUF_LIMIT:  # the checker serialises the model, which protobuf cannot past 2 GiB
        return model
    try:
        # after the external data is in the model: on a model that still refers to files, the checker
        # opens them relative to the working folder
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError, or a ValueError for a model over 2 GB
        raise ModelFileError(f"{shown}: not a valid ONNX model ({type(e).__name__}: {one_line(e)})") from e
    return model


# ---------------------------------------------------------------------------------------- operators


def _graphs(graph, where: str):
    """``graph`` and every subgraph in its nodes' attributes (If, Loop, Scan), with where each is."""
    yield graph, where
    for node in graph.node:
        for attribute in node.attribute:
            inner = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for sub in inner:
                yield from _graphs(sub, f"{where}, node {_node_name(node)!r} attribute {attribute.name!r}")


def _in(where: str) -> str:
    return "" if where == "graph" else f" (in the {where})"


def _node_name(node) -> str:
    return node.name or f"({node.op_type} without a name)"


def _check_operators(model, shown: str) -> None:
    """Every node a standard operator that ``onnx.defs`` knows, or a call of a function of the model."""
    import onnx.defs

    local = {(f.domain, f.name) for f in model.functions}
    bodies = [(f.node, f"function {f.domain}.{f.name}") for f in model.functions]
    for graph, where in _graphs(model.graph, "graph"):
        bodies.append((graph.node, where))
    for nodes, where in bodies:
        for node in nodes:
            domain = node.domain
            if (domain, node.op_type) in local:
                continue
            if not is_standard_domain(domain):
                raise ModelFileError(
                    f"{shown}: refused: node {_node_name(node)!r}{_in(where)} is the operator {node.op_type!r} of "
                    f"the domain {domain!r}, not a standard ONNX operator (domains {_DOMAINS}); "
                    "bnkit loads no custom-operator library"
                )
            if not onnx.defs.has(node.op_type, "" if domain == "ai.onnx" else domain):
                raise ModelFileError(
                    f"{shown}: refused: node {_node_name(node)!r}{_in(where)} is {node.op_type!r}, which is no "
                    f"operator of the domain {domain or 'ai.onnx'!r} (a custom operator?); "
                    "bnkit loads no custom-operator library"
                )


# ---------------------------------------------------------------------------------------- tensors


def _tensors(model):
    """``(where, TensorProto)`` for every tensor the model stores: initializers, sparse initializers'
    values and indices, tensors in node attributes (Constant's ``value``), in subgraphs and functions."""
    for graph, where in _graphs(model.graph, "graph"):
        inside = "" if where == "graph" else f" (in the {where})"
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}{inside}", tensor
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name!r}{inside}", sparse.values
            yield f"sparse initializer {sparse.values.name!r}'s indices{inside}", sparse.indices
        yield from _attribute_tensors(graph.node, where)
    for function in model.functions:
        yield from _attribute_tensors(function.node, f"function {function.domain}.{function.name}")


def _attribute_tensors(nodes, where: str):
    for node in nodes:
        for attribute in node.attribute:
            inside = "" if where == "graph" else f" (in the {where})"
            shown = f"node {_node_name(node)!r}'s attribute {attribute.name!r}{inside}"
            if attribute.HasField("t"):
                yield shown, attribute.t
            for tensor in attribute.tensors:
                yield shown, tensor
            if attribute.HasField("sparse_tensor"):
                yield shown, attribute.sparse_tensor.values
                yield shown, attribute.sparse_tensor.indices


def _type_name(data_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"


def _declared_bytes(tensor, what: str, budget: Budget | None) -> int:
    """``prod(dims) × element size`` of ``tensor`` (packed for sub-byte types), charged to ``budget``
    when given (before anything of it is read)."""
    from onnx import TensorProto, helper

    name = _type_name(tensor.data_type)
    if tensor.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        raise ModelFileError(f"{what}: {name} data cannot be stored outside the model")
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelFileError(f"{what}: has a negative size {dims}")
    numel = math.prod(dims)
    bits = _SUB_BYTE_BITS.get(name)
    if bits is None:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{what}: unknown element type {tensor.data_type}") from e
        nbytes = numel * itemsize
    else:
        nbytes = (numel * bits + 7) // 8
    if budget is not None:
        budget.charge(nbytes + TENSOR_OVERHEAD, f"{what} ({name} {dims})")
    return nbytes


# values per element of the typed fields (complex numbers take two), and which field holds each type
_TYPED_FIELD = {
    "FLOAT": ("float_data", 1), "COMPLEX64": ("float_data", 2), "DOUBLE": ("double_data", 1),
    "COMPLEX128": ("double_data", 2), "INT64": ("int64_data", 1), "UINT32": ("uint64_data", 1),
    "UINT64": ("uint64_data", 1), "STRING": ("string_data", 1),
}  # fmt: skip


def _check_inline(tensor, what: str) -> None:
    """A tensor stored in the file: as many values as its dims declare (``raw_data`` bytes or typed values)."""
    name = _type_name(tensor.data_type)
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelFileError(f"{what}: has a negative size {dims}")
    numel = math.prod(dims)
    if tensor.HasField("raw_data"):
        if name == "STRING":
            raise ModelFileError(f"{what}: STRING data cannot be raw bytes")
        have, need, unit = len(tensor.raw_data), _declared_bytes(tensor, what, None), "bytes"
    else:
        field, per = _TYPED_FIELD.get(name, ("int32_data", 1))  # the 8- and 16-bit types, bool, packed 4-bit
        bits = _SUB_BYTE_BITS.get(name)
        # packed sub-byte types hold one byte of packed values per int32
        need = numel * per if bits is None else (numel * bits + 7) // 8
        have, unit = len(getattr(tensor, field)), "values"
    if have < need:
        raise ModelFileError(
            f"refused: {what} declares {name} {dims} ({need:,} {unit}) but stores {have:,} {unit} "
            "(a truncated or crafted file)"
        )
    if have > need and unit == "bytes":
        raise ModelFileError(f"refused: {what} declares {name} {dims} ({need:,} bytes) but stores {have:,} bytes")


def _check_tensor(tensor, what: str, folder: Path, budget: Budget, shown: str) -> None:
    from onnx import TensorProto

    try:
        if tensor.data_location != TensorProto.EXTERNAL:
            _check_inline(tensor, what)
            return
        _read_external(tensor, what, folder, budget)
    except ModelFileError as e:
        raise ModelFileError(f"{shown}: {e}") from e


def _read_external(tensor, what: str, folder: Path, budget: Budget) -> None:
    """Read ``tensor``'s external data from inside ``folder`` into its ``raw_data`` (see the module doc)."""
    from onnx import TensorProto

    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location")
    if not location:
        raise ModelFileError(f"refused: {what} is stored outside the model without a location")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError as e:
        raise ModelFileError(f"refused: {what} has an external-data offset or length that is not a number") from e
    if offset < 0 or (length is not None and length < 0):
        raise ModelFileError(f"refused: {what} has a negative external-data offset or length")
    file = _inside(folder, location, what)
    nbytes = _declared_bytes(tensor, what, None)
    available = file.stat().st_size - offset
    if length is not None:
        if length > available:
            raise ModelFileError(
                f"refused: {what}: its external data ({printable(location)!r}, offset {offset:,}, length {length:,}) "
                f"runs past the end of the file ({file.stat().st_size:,} bytes: truncated?)"
            )
        available = length
    if nbytes > available:
        raise ModelFileError(
            f"refused: {what} declares {_type_name(tensor.data_type)} {list(tensor.dims)} ({nbytes:,} bytes) but "
            f"its external data ({printable(location)!r}, offset {offset:,}) holds {max(available, 0):,} bytes"
        )
    _declared_bytes(tensor, what, budget)  # charged before the bytes are read
    with open(file, "rb") as f:
        f.seek(offset)
        data = f.read(nbytes)
    if len(data) != nbytes:  # the file shrank while it was read
        raise ModelFileError(f"refused: {what}: its external data {printable(location)!r} ended early")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _inside(folder: Path, location: str, what: str) -> Path:
    """The regular file ``location`` names, which must lie in ``folder`` once every link is resolved."""
    shown = printable(location)
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ModelFileError(
            f"refused: {what}: its external data {shown!r} is an absolute path, not inside the model's folder"
        )
    if ".." in parts:
        raise ModelFileError(f"refused: {what}: its external data {shown!r} leads out of the model's folder ('..')")
    if "\0" in location:
        raise ModelFileError(f"refused: {what}: its external data location has a NUL byte")
    target = (folder / location).resolve()
    if not target.is_relative_to(folder):
        raise ModelFileError(
            f"refused: {what}: its external data {shown!r} is a link leading out of the model's folder (to "
            f"{printable(str(target))!r})"
        )
    if not target.exists():
        raise ModelFileError(f"{what}: its external data {shown!r} is missing from the model's folder")
    if not target.is_file():
        raise ModelFileError(f"refused: {what}: its external data {shown!r} is not a regular file")
    return target
