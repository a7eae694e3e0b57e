"""Weights files for a ``package.module:factory`` spec (``.pt``, ``.safetensors``) checked as data.

Before the loader runs, what it will allocate is charged to the
:class:`~bnkit.formats.limits.Budget` from what the file declares:

* a ``.pt`` (:func:`check_pt_archive`) is the zip archive ``torch.save`` writes; ``torch.load``
  reads every record whole, into a buffer of the size the zip directory claims (a record of
  deflated zeros claims gigabytes from a few megabytes), and unpickles ``data.pkl`` into objects
  (a tensor costs kilobytes and can be pickled in a few bytes). The legacy format (before PyTorch
  1.6) is refused: its pickle declares storage sizes that are allocated before they are read;
* a ``.safetensors`` (:func:`check_safetensors_header`) is an 8-byte length, a JSON header that
  gives each tensor's dtype, shape and byte range, and the bytes, which safetensors copies into
  memory: the header is read bounded, parsed with a size and depth limit and checked (every range
  inside the file and as long as its shape says), and each tensor charged.

After loading, :func:`checked_state_dict` refuses what ``Module.load_state_dict`` would trip over
with an error other than its own (an ``AttributeError`` for an integer key or a ``_metadata`` that
is a list, a ``TypeError`` for a version that is text).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.limits import JSON_EXPANSION, TENSOR_OVERHEAD, Budget, LimitExceeded, format_bytes, parse_json
from bnkit.formats.zipfiles import SafeZip, ZipMemberError, is_zip
from bnkit.text import one_line, printable

__all__ = ["check_pt_archive", "check_safetensors_header", "checked_state_dict"]

# measured: torch.load of 100,000 tensors pickled in 7.7 MB took 192 MB (25 bytes per byte); a
# pickle of memo references alone spends ~15 bytes on a tensor of ~2 KiB
PICKLE_EXPANSION = 128
# what PyTorch's zip reader (miniz) decompresses
_TORCH_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# safetensors' own limit on the header (SAFETENSORS_MAX_HEADER_SIZE in its Rust code)
MAX_SAFETENSORS_HEADER = 100_000_000
# bytes per element of the dtypes safetensors.torch reads (its _TYPES)
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _key(name: object) -> str:
    return one_line(repr(name), 120)


# ------------------------------------------------------------------------------------------ .pt


def check_pt_archive(path: Path, budget: Budget) -> None:
    """Check a ``torch.save`` archive's directory and charge its records (see the module doc)."""
    shown = printable(str(path))
    if not is_zip(path):
        raise ModelFileError(
            f"{shown}: not a zip archive: bnkit reads the format torch.save writes since PyTorch 1.6 "
            "(the legacy format declares storage sizes that are allocated before they are read)"
        )
    try:
        with SafeZip(path, "the archive") as archive:
            for info in archive.zip.infolist():
                name = one_line(info.filename, 120)
                if info.compress_type not in _TORCH_METHODS:
                    raise ModelFileError(
                        f"{shown}: record {name!r} uses compression method {info.compress_type}, which "
                        "PyTorch's reader does not read (stored or deflate)"
                    )
                size = info.file_size
                if info.filename.lower().endswith(".pkl"):
                    budget.charge(size * PICKLE_EXPANSION, f"record {name!r} ({format_bytes(size)} of pickle)")
                else:
                    budget.charge(size + TENSOR_OVERHEAD, f"record {name!r}")
    except ZipMemberError as e:
        raise ModelFileError(f"{shown}: {e}") from e


# --------------------------------------------------------------------------------- .safetensors


def check_safetensors_header(path: Path, budget: Budget) -> None:
    """Read a ``.safetensors`` header bounded, check it against the file, and charge its tensors.

    Read here rather than by safetensors, which maps the whole file into memory first.
    """
    shown = printable(str(path))
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{shown}: not a safetensors file ({file_size} bytes: no header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > file_size - 8:
            raise ModelFileError(
                f"{shown}: the header claims {length} bytes, more than the file holds (truncated, or not safetensors?)"
            )
        if length > MAX_SAFETENSORS_HEADER:
            limit = format_bytes(MAX_SAFETENSORS_HEADER)
            raise LimitExceeded(f"the header is {format_bytes(length)}, over safetensors' own limit of {limit}")
        budget.charge(length * JSON_EXPANSION, f"the header ({format_bytes(length)} of JSON)")
        header = f.read(length)
    try:
        entries = parse_json(header, "the header")
    except LimitExceeded:
        raise
    except ValueError as e:
        raise ModelFileError(f"{shown}: not a readable safetensors file ({e})") from e
    if not isinstance(entries, dict):
        raise ModelFileError(f"{shown}: not a readable safetensors file (the header is not a JSON object)")
    data_size = file_size - 8 - length
    for name, entry in entries.items():
        if name != "__metadata__":
            _check_tensor_entry(shown, f"tensor {_key(name)}", entry, data_size, budget)


def _check_tensor_entry(shown: str, what: str, entry, data_size: int, budget: Budget) -> None:
    """One tensor of a safetensors header: a known dtype, a shape, a byte range in the file as long as they say."""
    if not isinstance(entry, dict):
        raise ModelFileError(f"{shown}: {what}: expected dtype, shape and data_offsets in the header")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        raise ModelFileError(f"{shown}: {what} has a dtype bnkit does not read: {one_line(repr(dtype), 40)}")
    if not (isinstance(shape, list) and all(type(size) is int and size >= 0 for size in shape)):
        raise ModelFileError(f"{shown}: {what} has a shape that is not a list of sizes: {one_line(repr(shape), 80)}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(offset) is int for offset in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        given = one_line(repr(offsets), 80)
        raise ModelFileError(f"{shown}: {what} has data_offsets {given} outside the {data_size} bytes of data")
    nbytes = budget.charge_tensor(shape, itemsize, what)
    if nbytes != offsets[1] - offsets[0]:
        raise ModelFileError(
            f"{shown}: {what} of shape {one_line(repr(shape), 80)} ({dtype}) takes {nbytes} bytes, its "
            f"data_offsets give {offsets[1] - offsets[0]}"
        )


# ------------------------------------------------------------------------------ after loading


def checked_state_dict(state, shown: str) -> dict:
    """``state`` if ``load_state_dict`` can take it as data: a dict of tensors under text keys, and a
    ``_metadata`` (module versions) that is a dict of dicts; else one :class:`ModelFileError`."""
    import torch

    if not isinstance(state, dict):
        raise ModelFileError(f"{shown}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelFileError(f"{shown}: key {_key(key)} ({type(key).__name__}) is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{shown}: {_key(key)} is not a tensor but {type(value).__name__}")
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            kind = "meta" if value.is_meta else "quantized" if value.is_quantized else str(value.layout)
            raise ModelFileError(f"{shown}: {_key(key)} is a {kind} tensor; bnkit reads dense tensors")
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return state
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{shown}: its _metadata (module versions) is not a dict but {type(metadata).__name__}")
    for prefix, entry in metadata.items():
        if not isinstance(prefix, str) or not isinstance(entry, dict):
            raise ModelFileError(
                f"{shown}: its _metadata entry {_key(prefix)} is not a dict of module settings under a module "
                f"name but {type(entry).__name__}"
            )
        version = entry.get("version")
        if version is not None and type(version) is not int:
            raise ModelFileError(f"{shown}: its _metadata gives module {_key(prefix)} the version {_key(version)}")
    return state
