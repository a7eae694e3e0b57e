"""Reading a ``torch.export`` archive (``.pt2``) without running anything from it.

``torch.export.load`` is not safe on a file from someone else (torch 2.13): it unpickles the
program's sample inputs (``torch.load(weights_only=True)``, then again with
``weights_only=False`` if that fails), weights and constants whose metadata says
``use_pickle`` (``weights_only=False``), torchbind and opaque constants (``pickle.loads``);
it hands the program's symbolic shape expressions to ``sympy.sympify``, which evaluates
Python; and a graph node may name any callable under ``torch`` (``torch.load``,
``torch.utils.cpp_extension.load_inline``...) to be called when the program runs. It has no
option that turns all of this off.

:func:`read_exported_program` reads the same archive with none of it:

* the program is the archive's JSON (``models/model.json``), read with torch's own JSON
  deserialiser, after checking that every operator it calls is a registered PyTorch operator
  (or one of the few arithmetic functions torch's serialiser writes), and that every shape
  expression is a plain ``srepr`` of integer arithmetic;
* weights and constants are raw bytes described by JSON (dtype, sizes, strides), made into
  tensors without pickle; a part stored as a pickle is refused by name;
* the sample inputs (always a pickle) are never loaded: their pickle is only scanned, opcode by
  opcode without executing it, and refused when it names anything but tensor rebuilding.

Every refusal is an :class:`UnsafeArchiveError` naming the part of the archive.
"""

from __future__ import annotations

import contextlib
import io
import json
import keyword
import logging
import math
import pickletools
import re
import zipfile

__all__ = ["ArchiveError", "UnsafeArchiveError", "read_exported_program"]

_MODEL = "model"  # the name torch.export.save gives the one program it writes


class ArchiveError(ValueError):
    """An archive that is not a readable ``torch.export`` program."""


class UnsafeArchiveError(ArchiveError):
    """An archive with a part that would run code (a pickle, a callable, a Python expression)."""


def read_exported_program(path, budget=None) -> tuple[object, dict[str, str]]:
    """The ``torch.export.ExportedProgram`` in the archive at ``path``, and its extra files.

    Raises :class:`UnsafeArchiveError` for a part that needs pickle or would run code, and
    :class:`ArchiveError` for anything else that is not a readable program.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"not a zip archive: truncated, or another format? ({e})") from e
    with archive:
        reader = _Reader(archive)
        program_json = reader.program_json()
        _check_program(program_json)
        state_dict = reader.tensors("weights", "data/weights/", f"data/weights/{_MODEL}_weights_config.json")
        constants = reader.tensors("constants", "data/constants/", f"data/constants/{_MODEL}_constants_config.json")
        reader.check_sample_inputs()
        extra = reader.extra_files()
    return _deserialize(program_json, state_dict, constants), extra


# ------------------------------------------------------------------------------------ the zip


class _Reader:
    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        names = [n for n in archive.namelist() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or not all("/" in n for n in names):
            raise ArchiveError("the archive holds no exported program (not one folder of records)")
        self.root = roots.pop() + "/"
        self.names = {n[len(self.root):] for n in names}

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> bytes:
        try:
            return self.archive.read(self.root + name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # CRC errors, truncated members
            raise ArchiveError(f"{name} cannot be read ({e})") from e

    def json(self, name: str):
        try:
            return json.loads(self.read(name).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArchiveError(f"{name} is not valid JSON ({e})") from e

    def program_json(self) -> dict:
        if self.has("data.pkl"):
            raise ArchiveError(
                "the archive holds no exported program: it is a torch.save() pickle (data.pkl); give a state "
                "dict as --weights to a package.module:factory spec"
            )
        if self.has("serialized_exported_program.json"):
            raise UnsafeArchiveError(
                "the torch.export format of torch 2.6 and older, whose weights are pickles "
                "(serialized_state_dict.pt); export the model again with torch 2.7 or newer"
            )
        program = f"models/{_MODEL}.json"
        if not self.has(program):
            what = "an AOTInductor package" if any(n.startswith("data/aotinductor/") for n in self.names) else "a zip"
            raise ArchiveError(f"the archive holds no exported program ({program}): {what}, not torch.export.save()")
        version = self.read("archive_version").decode(errors="replace").strip() if self.has("archive_version") else ""
        from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

        if version != ARCHIVE_VERSION_VALUE:
            raise ArchiveError(f"archive version {version or '(none)'!r}, this torch reads {ARCHIVE_VERSION_VALUE!r}")
        for legacy in (f"data/weights/{_MODEL}.pt", f"data/constants/{_MODEL}.pt"):
            if self.has(legacy):
                raise UnsafeArchiveError(f"{legacy} holds the program's tensors as one pickle (an older format)")
        program_json = self.json(program)
        if not isinstance(program_json, dict):
            raise ArchiveError(f"{program} is not an exported program")
        return program_json

    def tensors(self, kind: str, folder: str, config_name: str) -> dict:
        """The weights or constants: raw bytes shaped by their JSON description, never a pickle."""
        import torch
        from torch._export.serde import schema
        from torch._export.serde.serialize import (
            _dict_to_dataclass,
            deserialize_scalar_type,
            deserialize_size,
            deserialize_storage_offset,
            deserialize_stride,
        )
        from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX

        if not self.has(config_name):
            raise ArchiveError(f"{config_name} is missing")
        try:
            config = _dict_to_dataclass(schema.PayloadConfig, self.json(config_name))
        except Exception as e:  # a malformed description: torch asserts
            raise ArchiveError(f"{config_name} does not describe {kind} ({_one_line(e)})") from e
        prefix = WEIGHT_FILENAME_PREFIX if kind == "weights" else TENSOR_CONSTANT_FILENAME_PREFIX
        storages: dict[str, torch.Tensor] = {}  # one per record: tensors that share a record stay aliased
        result = {}
        for fqn, meta in config.config.items():
            _check_text(fqn, f"{kind[:-1]} name")
            record = folder + meta.path_name
            if meta.use_pickle or not meta.path_name.startswith(prefix):
                what = "a pickle (use_pickle: true)" if meta.use_pickle else "a pickled object"
                raise UnsafeArchiveError(f"{kind[:-1]} {fqn!r} ({record}) is stored as {what}")
            if meta.tensor_meta is None:
                raise ArchiveError(f"{kind[:-1]} {fqn!r} ({record}) has no tensor description")
            tm = meta.tensor_meta
            try:
                dtype = deserialize_scalar_type(tm.dtype)
                sizes, strides = deserialize_size(tm.sizes), deserialize_stride(tm.strides)
                offset = deserialize_storage_offset(tm.storage_offset)
            except (KeyError, AssertionError, AttributeError) as e:
                raise ArchiveError(f"{kind[:-1]} {fqn!r} has an unreadable description ({_one_line(e)})") from e
            if record not in storages:
                if not self.has(record):
                    raise ArchiveError(f"{kind[:-1]} {fqn!r}: {record} is missing")
                data = self.read(record)
                itemsize = torch.empty((), dtype=dtype).element_size()
                if len(data) % itemsize:
                    raise ArchiveError(f"{record}: {len(data)} bytes is not a whole number of {dtype} values")
                storages[record] = (
                    torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
                )
            flat = storages[record]
            if flat.dtype != dtype:
                raise ArchiveError(f"{kind[:-1]} {fqn!r}: {record} is shared by tensors of different dtypes")
            needed = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1
            if any(s < 0 for s in sizes) or any(st < 0 for st in strides) or offset < 0:
                raise ArchiveError(f"{kind[:-1]} {fqn!r} has a negative size, stride or offset")
            if math.prod(sizes) == 0:
                tensor = torch.zeros(sizes, dtype=dtype)
            elif needed > flat.numel():
                if flat.numel() == 0:  # torch writes an empty record for an all-zero tensor
                    tensor = torch.zeros(sizes, dtype=dtype)
                else:
                    raise ArchiveError(
                        f"{kind[:-1]} {fqn!r}: shape {tuple(sizes)} needs {needed} values, {record} holds "
                        f"{flat.numel()} (truncated?)"
                    )
            else:
                tensor = flat.as_strided(sizes, strides, offset)
            if getattr(meta, "is_param", False):
                tensor = torch.nn.Parameter(tensor, requires_grad=bool(tm.requires_grad))
            result[fqn] = tensor
        return result

    def check_sample_inputs(self) -> None:
        """The sample inputs are a torch.save() pickle: never loaded, but refused if they name code."""
        name = f"data/sample_inputs/{_MODEL}.pt"
        if self.has(name):
            scan_tensor_pickle(self.read(name), f"the program's sample inputs ({name})")

    def extra_files(self) -> dict[str, str]:
        extra = {}
        for name in sorted(self.names):
            if name.startswith("extra/"):
                extra[name[len("extra/"):]] = self.read(name).decode("utf-8", errors="replace")
        return extra


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------- pickles, never loaded

_TORCH_REBUILD = {
    f"torch._utils._rebuild_{kind}"
    for kind in ("tensor", "tensor_v2", "tensor_v3", "parameter", "device_tensor_from_cpu_tensor")
}
_TORCH_STORAGE = re.compile(r"torch\.(cuda\.)?[A-Z][A-Za-z0-9]*Storage")
_PLAIN_GLOBALS = {"collections.OrderedDict", "torch.serialization._get_layout", "torch.Size", "torch.device"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_NO_STACK_EFFECT = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def _tensor_global(name: str) -> bool:
    import torch

    if name in _PLAIN_GLOBALS or name in _TORCH_REBUILD or _TORCH_STORAGE.fullmatch(name):
        return True
    module, _, attr = name.rpartition(".")  # a dtype, which _rebuild_tensor_v3 names
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)


def scan_tensor_pickle(data: bytes, part: str) -> None:
    """Refuse ``data`` (a ``torch.save`` zip) unless its pickle names only tensor rebuilding.

    The pickle is read opcode by opcode with :func:`pickletools.genops`, which decodes and
    executes nothing; every global it would import must be one ``torch.save`` writes for
    tensors. A global whose name cannot be read statically is refused too.
    """
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
        pickles = [n for n in inner.namelist() if n.endswith(".pkl")]
        payloads = [inner.read(n) for n in pickles]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UnsafeArchiveError(f"{part} is not in torch.save's zip format ({_one_line(e)})") from e
    if not payloads:
        raise UnsafeArchiveError(f"{part} holds no pickle bnkit can check")
    for payload in payloads:
        for name in _pickle_globals(payload, part):
            if not _tensor_global(name):
                raise UnsafeArchiveError(f"{part} would call {name} when unpickled")


def _pickle_globals(data: bytes, part: str):
    """The ``module.name`` of every global the pickle imports, found without unpickling it."""
    recent: list = []  # what the last opcodes pushed: a str, or None for anything else
    memo: dict = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif name == "GLOBAL":
                yield arg.replace(" ", ".", 1)
                recent.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise UnsafeArchiveError(f"{part} is a pickle that imports a name bnkit cannot read statically")
                yield f"{module}.{attr}"
                recent.append(None)
            elif name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise UnsafeArchiveError(f"{part} is a pickle that creates objects ({name})")
            elif name not in _NO_STACK_EFFECT:
                recent.append(None)
    except ValueError as e:  # genops on bytes that are not a pickle
        raise UnsafeArchiveError(f"{part} is not a readable pickle ({_one_line(e)})") from e


# ------------------------------------------------------------------------ the program's JSON

# names sympy.srepr writes for torch's shape expressions; anything else (and any '.', '[', '_'
# at a name's start, or a quote around more than a plain name) is refused before sympify sees it
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Xor", "Piecewise", "ExprCondPair", "true", "false", "True",
    "False", "BooleanTrue", "BooleanFalse", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "NaN", "Half",
    "One", "Zero", "NegativeOne", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
}  # fmt: skip
_SYMPY_TOKEN = re.compile(
    r"\s+|(?P<kw>[a-z]+)=(?!=)|'(?P<str>[A-Za-z0-9_.+\-]*)'|(?P<name>[A-Za-z][A-Za-z0-9_]*)"
    r"|(?P<num>\d+(\.\d*)?([eE][+-]?\d+)?)|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>&|~^])"
)
_SYMBOL = re.compile(r"[a-z]+\d+")
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?([eE][-+]?\d+)?")


def _check_expression(text: str) -> None:
    if not isinstance(text, str) or len(text) > 100_000:
        raise UnsafeArchiveError("a shape expression that is not a short string")
    position = 0
    while position < len(text):
        match = _SYMPY_TOKEN.match(text, position)
        name = match and match.group("name")
        literal = match and match.group("str")
        if (
            match is None
            or (name and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name))
            or (literal is not None and not (_SYMBOL.fullmatch(literal) or _NUMBER.fullmatch(literal)))
        ):
            bad = name or literal or text[position : position + 20]
            bad = bad if len(bad) <= 40 else bad[:37] + "..."
            raise UnsafeArchiveError(
                f"a shape expression holds {bad!r}, which is not integer arithmetic: "
                "torch would evaluate it as Python (sympy.sympify)"
            )
        position = match.end()


# the non-operator call targets torch's serialiser writes, by the name it writes them under
_ARITHMETIC = {f"_operator.{n}" for n in (
    "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow", "truediv",
    "and_", "or_", "lshift", "rshift", "getitem",
)} | {"math.trunc", "math.ceil", "math.floor", "math.sqrt"} | {f"torch.{n}" for n in (
    "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_sum", "_sym_sqrt",
    "_C._set_grad_enabled", "autograd.grad_mode.set_grad_enabled", "amp.autocast_mode._enter_autocast",
    "amp.autocast_mode._exit_autocast",
)}  # fmt: skip
# registered operators that read or write files
_FILE_OPERATORS = {"aten::save", "aten::from_file", "debugprims::load_tensor"}


def _check_target(target) -> None:
    if not isinstance(target, str):
        raise UnsafeArchiveError(f"a graph node calls {_show(target)}, which is not an operator name")
    if target in _ARITHMETIC:
        return
    if target.startswith("torch.ops."):
        resolved = _resolve_operator(target)
        import torch

        if isinstance(resolved, torch._ops.HigherOrderOperator):
            return
        if isinstance(resolved, torch._ops.OpOverload):
            if resolved._schema.name in _FILE_OPERATORS:
                raise UnsafeArchiveError(f"a graph node calls {target}, which reads or writes files")
            return
        if resolved is None:  # torch reports an unknown operator itself, as an unreadable program
            return
    raise UnsafeArchiveError(
        f"a graph node calls {_show(target)[1:-1]}, which is not a PyTorch operator: "
        "it could run any code when the model runs"
    )


def _resolve_operator(target: str):
    import torch

    value = torch
    for part in target.split(".")[1:]:
        try:
            value = getattr(value, part)
        except (AttributeError, RuntimeError):
            return None
    return value


_IDENTIFIER_KEYS = {"name", "as_name", "user_input_name"}  # become Python names in generated code
_PATH_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}
_NODE_METADATA = ("nn_module_stack", "source_fn_stack", "torch_fn")  # the rest (stack traces...) is dropped
# a character that could end a string or a comment in the Python code torch.fx generates from these names
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\"\\\u2028\u2029]")


def _check_identifier(value, what: str) -> None:
    if not (isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)):
        raise UnsafeArchiveError(
            f"{what} {_show(value)} is not a Python name: torch.fx would write it into code it runs"
        )


def _check_text(value, what: str) -> None:
    if not isinstance(value, str) or _UNSAFE_CHARACTER.search(value):
        raise UnsafeArchiveError(f"{what} {_show(value)} holds a quote, backslash or control character")


def _check_node_metadata(node: dict) -> None:
    metadata = node.get("metadata")
    if not isinstance(metadata, dict):
        return
    node["metadata"] = kept = {key: metadata[key] for key in _NODE_METADATA if key in metadata}
    for key, value in kept.items():
        _check_text(value, f"node metadata {key}")


def _check_program(program: dict) -> None:
    """Walk the program's JSON: every call target, operator argument, name and shape expression.

    Also drops what bnkit never needs and torch would turn into code: the program's guards
    (Python source, run on every call), node stack traces and annotations (written into the
    generated forward as comments).
    """
    program["guards_code"] = []
    if isinstance(program.get("graph_module"), dict):
        program["graph_module"]["metadata"] = {}
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if {"target", "inputs", "outputs"} <= item.keys():
                _check_target(item["target"])
                _check_node_metadata(item)
            for key, value in item.items():
                if key == "as_operator":
                    _check_target(value)
                elif key == "expr_str":
                    _check_expression(value)
                elif key in _IDENTIFIER_KEYS and isinstance(value, str):
                    _check_identifier(value, key.replace("_", " "))
                elif key in _PATH_KEYS:
                    _check_text(value, key.replace("_", " "))
                elif key == "forward_arg_names" and isinstance(value, list):
                    for name in value:
                        _check_identifier(name, "forward argument")
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _deserialize(program_json: dict, state_dict: dict, constants: dict):
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    export_log = logging.getLogger("torch._export.serde.serialize")
    with _quiet(export_log):
        try:
            serialized = _dict_to_dataclass(schema.ExportedProgram, program_json)
            # no sample inputs: they are a pickle, and a program runs without them
            return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
        except Exception as e:  # torch raises assertion, key, serialize and spec errors on a bad program
            raise ArchiveError(f"models/{_MODEL}.json is not a program this torch reads ({_one_line(e)})") from e


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

