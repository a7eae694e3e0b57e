"""Reading a ``torch.export`` archive (``.pt2``) without running anything from it, within a memory budget.

``torch.export.load`` is not safe on a file from someone else (torch 2.13): it unpickles the
program's sample inputs (``torch.load(weights_only=True)``, then again with
``weights_only=False`` if that fails), weights and constants whose metadata says
``use_pickle`` (``weights_only=False``), torchbind and opaque constants (``pickle.loads``);
it hands the program's symbolic shape expressions to ``sympy.sympify``, which evaluates
Python; and a graph node may name any callable under ``torch`` (``torch.load``,
``torch.utils.cpp_extension.load_inline``...) to be called when the program runs. It has no
option that turns all of this off, and it reads every member whole, whatever size it claims.

:func:`read_exported_program` reads the same archive with none of it:

* the zip is read through :class:`~bnkit.formats.zipfiles.SafeZip` (no encrypted member, no
  unknown compression method, no name twice), each member only up to a limit derived from what
  it must hold: a few bytes for the version strings, what the memory budget leaves for JSON, the
  bytes a record's tensors span for a weight;
* the program is the archive's JSON (``models/model.json``), checked by
  :func:`bnkit.torch.pt2_program.check_program` (operators, shape expressions, names, integers)
  before torch's own JSON deserialiser reads it;
* weights and constants are raw bytes described by JSON (dtype, sizes, strides, offset), made
  into tensors without pickle; every tensor is charged to the :class:`~bnkit.formats.limits.Budget`
  (its ``numel × itemsize``, whatever its strides share) before anything is allocated, and a
  record's bytes are read straight into the tensor's storage; a part stored as a pickle is
  refused by name;
* the sample inputs (always a pickle) are never loaded: their pickle is only scanned
  (:mod:`bnkit.torch.pickle_scan`) and refused when it names anything but tensor rebuilding.

A refusal is an :class:`UnsafeArchiveError` (a part that would run code) or an
:class:`ArchiveError` (anything else unreadable), naming the part; a part over the budget is a
:class:`~bnkit.formats.limits.LimitExceeded` naming the part and the limit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from bnkit.formats.limits import Budget, LimitExceeded, ReadLimits, format_bytes, parse_json
from bnkit.formats.zipfiles import SafeZip, ZipMemberError
from bnkit.text import one_line
from bnkit.torch.pickle_scan import scan_tensor_pickle
from bnkit.torch.pt2_errors import ArchiveError, UnsafeArchiveError
from bnkit.torch.pt2_program import PROGRAM, check_program, check_text, deserialize

__all__ = ["ArchiveError", "UnsafeArchiveError", "read_exported_program"]

_MODEL = "model"  # the name torch.export.save gives the one program it writes
SMALL_MEMBER = 2**10  # archive_version, byteorder: a few characters
MAX_SAMPLE_INPUTS = 64 * 2**20  # the sample inputs' torch.save zip (real ones: kilobytes)
MAX_EXTRA_FILE = 16 * 2**20  # extra/bnkit.json: a line per layer
MAX_DIMENSIONS = 64  # torch's own limit for most operators
_INT64_MAX = 2**63 - 1
_EMPTY_STREAM = 32  # the most bytes any compression method makes of nothing


def read_exported_program(path, budget: Budget | None = None) -> tuple[object, dict[str, str]]:
    """The ``torch.export.ExportedProgram`` in the archive at ``path``, and its extra files.

    ``budget``: the memory reading may take (default: :class:`~bnkit.formats.limits.ReadLimits`'s).
    Raises :class:`UnsafeArchiveError` for a part that needs pickle or would run code,
    :class:`ArchiveError` for anything else that is not a readable program and
    :class:`~bnkit.formats.limits.LimitExceeded` for a part over the budget.
    """
    budget = budget if budget is not None else ReadLimits().budget()
    try:
        with SafeZip(path, "the archive") as archive:
            reader = _Reader(archive, budget)
            program_json = reader.program_json()
            check_program(program_json)
            state_dict = reader.tensors("weights", "data/weights/", f"data/weights/{_MODEL}_weights_config.json")
            constants = reader.tensors("constants", "data/constants/", f"data/constants/{_MODEL}_constants_config.json")
            reader.check_sample_inputs()
            extra = reader.extra_files()
    except ZipMemberError as e:  # a damaged zip directory or member: its message names it
        raise ArchiveError(str(e)) from e
    return deserialize(program_json, state_dict, constants), extra


# ------------------------------------------------------------------------------------ the zip


class _Reader:
    def __init__(self, archive: SafeZip, budget: Budget) -> None:
        self.archive = archive
        self.budget = budget
        names = [n for n in archive.names() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or not all("/" in n for n in names):
            raise ArchiveError("the archive holds no exported program (not one folder of records)")
        self.root = roots.pop() + "/"
        self.names = {n[len(self.root) :] for n in names}

    def has(self, name: str) -> bool:
        return name in self.names

    def size(self, name: str) -> int:
        return self.archive.size(self.root + name)

    def read(self, name: str, limit: int) -> bytearray:
        """Member ``name`` (relative to the archive's folder), refused if it claims more than ``limit`` bytes."""
        return self.archive.read(self.root + name, limit, one_line(name, 120))

    def small(self, name: str) -> str:
        return self.read(name, SMALL_MEMBER).decode("utf-8", errors="replace").strip()

    def json(self, name: str):
        """Member ``name`` parsed as JSON, within what the budget leaves (charged for Python's objects)."""
        limit = self.budget.json_limit()
        if self.size(name) > limit:
            raise LimitExceeded(
                f"{name} is {format_bytes(self.size(name))} of JSON, over the {format_bytes(limit)} the memory "
                f"limit of {format_bytes(self.budget.total)} leaves for it (raise it with --max-model-bytes)"
            )
        data = self.read(name, limit)
        try:
            return parse_json(data, name, self.budget)
        except LimitExceeded:
            raise
        except ValueError as e:  # its message names the member
            raise ArchiveError(one_line(e)) from e

    def program_json(self) -> dict:
        if any(n.lower() == "data.pkl" for n in self.names):
            raise ArchiveError(
                "the archive holds no exported program: it is a torch.save() pickle (data.pkl); give a state "
                "dict as --weights to a package.module:factory spec"
            )
        if self.has("serialized_exported_program.json"):
            raise UnsafeArchiveError(
                "the torch.export format of torch 2.6 and older, whose weights are pickles "
                "(serialized_state_dict.pt); export the model again with torch 2.7 or newer"
            )
        if not self.has(PROGRAM):
            what = "an AOTInductor package" if any(n.startswith("data/aotinductor/") for n in self.names) else "a zip"
            raise ArchiveError(f"the archive holds no exported program ({PROGRAM}): {what}, not torch.export.save()")
        version = self.small("archive_version") if self.has("archive_version") else ""
        from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

        if version != ARCHIVE_VERSION_VALUE:
            raise ArchiveError(
                f"archive version {one_line(version, 40) or '(none)'!r}, this torch reads {ARCHIVE_VERSION_VALUE!r}"
            )
        byteorder = self.small("byteorder") if self.has("byteorder") else "little"
        if byteorder != "little":
            raise ArchiveError(f"byteorder {one_line(byteorder, 40)!r}: bnkit reads little-endian archives")
        for legacy in (f"data/weights/{_MODEL}.pt", f"data/constants/{_MODEL}.pt"):
            if self.has(legacy):
                raise UnsafeArchiveError(f"{legacy} holds the program's tensors as one pickle (an older format)")
        program_json = self.json(PROGRAM)
        if not isinstance(program_json, dict):
            raise ArchiveError(f"{PROGRAM} is not an exported program")
        return program_json

    # ---------------------------------------------------------------------------- tensors

    def tensors(self, kind: str, folder: str, config_name: str) -> dict:
        """The weights or constants: raw bytes shaped by their JSON description, never a pickle.

        Every tensor is described and charged to the budget first; then each record is read, only
        as far as its tensors reach, into the storage they share. The description is read here,
        field by field, not through torch's generic dataclass reader (a minute for 100,000 entries).
        """
        if not self.has(config_name):
            raise ArchiveError(f"{config_name} is missing")
        config = self.json(config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise ArchiveError(f"{config_name} does not describe {kind} (no 'config' object)")
        records: dict[str, list[_Described]] = defaultdict(list)
        for fqn, entry in entries.items():
            tensor = _describe(kind, folder, fqn, entry)
            tensor.charge(self.budget)
            records[tensor.record].append(tensor)
        result = {}
        for record, tensors in records.items():
            storage = self._storage(record, tensors)
            for tensor in tensors:
                result[tensor.fqn] = tensor.make(storage)
        return result

    def _storage(self, record: str, tensors: list[_Described]):
        """The flat storage of ``record`` its ``tensors`` view, or None for an empty record (all zeros)."""
        import torch

        first = tensors[0]
        if not self.has(record):
            raise ArchiveError(f"{first.what}: {record} is missing")
        mixed = next((t for t in tensors if t.dtype != first.dtype), None)
        if mixed is not None:
            raise ArchiveError(f"{mixed.what}: {record} is shared by tensors of different dtypes")
        declared = self.size(record)
        if declared == 0:  # torch writes an empty record for a fake or empty tensor, and reads zeros
            info = self.archive.zip.getinfo(self.root + record)
            if info.CRC != 0 or info.compress_size > _EMPTY_STREAM:  # the directory's size was changed
                raise ArchiveError(
                    f"{record} claims to hold nothing, but {info.compress_size} bytes with CRC {info.CRC:#010x}"
                )
            return None
        itemsize = first.itemsize
        if declared % itemsize:
            raise ArchiveError(f"{record}: {declared} bytes is not a whole number of {first.dtype} values")
        widest = max(tensors, key=lambda t: t.extent)
        if widest.extent * itemsize > declared:
            raise ArchiveError(
                f"{widest.what}: shape {widest.sizes} needs {widest.extent} values, {record} holds "
                f"{declared // itemsize} (truncated?)"
            )
        nbytes = widest.extent * itemsize
        # strides and offsets can make a record span more than its tensors' own bytes, already charged
        beyond = nbytes - sum(t.nbytes for t in tensors)
        if beyond > 0:
            self.budget.charge(beyond, f"{record} (the {format_bytes(nbytes)} its tensors' strides and offsets span)")
        if nbytes == 0:
            return torch.empty(0, dtype=first.dtype)
        buffer = self.archive.read_prefix(self.root + record, nbytes, record)
        try:
            return torch.frombuffer(buffer, dtype=first.dtype)  # shares the buffer: no copy
        except (RuntimeError, ValueError, TypeError) as e:  # a dtype torch cannot view bytes as
            raise ArchiveError(f"{first.what}: {record} cannot be read as {first.dtype} ({one_line(e)})") from e

    # ------------------------------------------------------------------------ other parts

    def check_sample_inputs(self) -> None:
        """The sample inputs are a torch.save() pickle: never loaded, but refused if they name code."""
        name = f"data/sample_inputs/{_MODEL}.pt"
        if self.has(name):
            part = f"the program's sample inputs ({name})"
            self.budget.charge(min(self.size(name), MAX_SAMPLE_INPUTS), part)
            try:
                data = self.read(name, MAX_SAMPLE_INPUTS)
            except LimitExceeded as e:
                raise UnsafeArchiveError(f"{part}: {e}") from e
            scan_tensor_pickle(data, part)

    def extra_files(self) -> dict[str, str]:
        extra = {}
        for name in sorted(self.names):
            if name.startswith("extra/"):
                limit = min(MAX_EXTRA_FILE, self.budget.json_limit())
                self.budget.charge(min(self.size(name), limit), name)
                try:  # torch's own reader fails on one that is not UTF-8 too
                    extra[name[len("extra/") :]] = self.read(name, limit).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ArchiveError(f"{one_line(name, 120)} is not UTF-8 text ({one_line(e)})") from e
        return extra


# ---------------------------------------------------------------------------- tensor descriptions


@dataclass
class _Described:
    """One weight or constant as its JSON describes it, checked: what it costs and where its bytes are."""

    what: str  # "weight 'conv.weight'"
    fqn: str
    record: str
    dtype: object
    itemsize: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    is_param: bool
    requires_grad: bool
    extent: int  # the values of the record it spans (0 when it has none)
    nbytes: int = 0  # charged

    def charge(self, budget: Budget) -> None:
        self.nbytes = budget.charge_tensor(
            self.sizes, self.itemsize, f"{self.what} ({self.record}: {self.dtype} of shape {self.sizes})"
        )

    def make(self, storage):
        import torch

        try:
            if self.extent == 0 or storage is None:  # no values, or an empty record: zeros, as torch reads it
                tensor = torch.zeros(self.sizes, dtype=self.dtype)
            else:
                tensor = storage.as_strided(self.sizes, self.strides, self.offset)
            if self.is_param:
                tensor = torch.nn.Parameter(tensor, requires_grad=self.requires_grad)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ArchiveError(f"{self.what} ({self.record}) cannot be made ({one_line(e, 200)})") from e
        return tensor


def _describe(kind: str, folder: str, fqn, entry) -> _Described:
    """One entry of a payload config (torch's ``PayloadMeta``), checked field by field."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import deserialize_scalar_type
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX

    check_text(fqn, f"{kind[:-1]} name")
    what = f"{kind[:-1]} {fqn!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
        raise ArchiveError(f"{what} names no record")
    path_name = entry["path_name"]
    record = folder + path_name
    prefix = WEIGHT_FILENAME_PREFIX if kind == "weights" else TENSOR_CONSTANT_FILENAME_PREFIX
    if entry.get("use_pickle") or not path_name.startswith(prefix):
        stored = "a pickle (use_pickle: true)" if entry.get("use_pickle") else "a pickled object"
        raise UnsafeArchiveError(f"{what} ({one_line(record, 120)}) is stored as {stored}")
    meta = entry.get("tensor_meta")
    if not isinstance(meta, dict):
        raise ArchiveError(f"{what} ({record}) has no tensor description")
    try:
        dtype = deserialize_scalar_type(ScalarType(meta.get("dtype")))
    except (ValueError, KeyError) as e:
        raise ArchiveError(f"{what} has dtype {one_line(repr(meta.get('dtype')), 40)}, not one torch writes") from e
    sizes, strides = _ints(meta.get("sizes"), what, "sizes"), _ints(meta.get("strides"), what, "strides")
    (offset,) = _ints([meta.get("storage_offset")], what, "storage offset")
    if len(sizes) != len(strides):
        raise ArchiveError(f"{what} has {len(sizes)} sizes and {len(strides)} strides")
    if len(sizes) > MAX_DIMENSIONS:
        raise ArchiveError(f"{what} has {len(sizes)} dimensions (at most {MAX_DIMENSIONS})")
    itemsize = dtype.itemsize
    extent = 0 if 0 in sizes else offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1
    if extent * itemsize > _INT64_MAX:
        raise ArchiveError(f"{what} spans {extent} values of {dtype}: more bytes than any file holds")
    is_param, requires_grad = bool(entry.get("is_param")), bool(meta.get("requires_grad"))
    if is_param and requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise ArchiveError(f"{what} is a parameter of {dtype} that requires grad: only floating point ones can")
    return _Described(what, fqn, record, dtype, itemsize, sizes, strides, offset, is_param, requires_grad, extent)


def _ints(values, what: str, field: str) -> tuple[int, ...]:
    """``[{"as_int": 4}, ...]`` (torch's SymInts, all concrete for a stored tensor) as int64s >= 0."""
    if not isinstance(values, list):
        raise ArchiveError(f"{what} has no list of {field}")
    found = []
    for value in values:
        number = value.get("as_int") if isinstance(value, dict) and len(value) == 1 else None
        if type(number) is not int or not 0 <= number <= _INT64_MAX:
            shown = one_line(repr(value), 60)
            raise ArchiveError(f"{what} has {field} holding {shown}, not a concrete int64 >= 0 (as_int)")
        found.append(number)
    return tuple(found)
