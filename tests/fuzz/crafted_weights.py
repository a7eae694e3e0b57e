"""Crafted weights files for a factory spec (``--weights``): issue 17's findings about ``.pt`` state
dicts and ``.safetensors`` files, as files.

The hostile state dicts are written by ``torch.save`` itself (what ``torch.load(weights_only=True)``
lets through: a ``_metadata`` that is a list, an integer key, text for a tensor); the archives and
headers are then changed as an attacker would (:mod:`zip_craft`, a safetensors header written by
hand, a file made sparse: gigabytes that take no disk).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from crafted import Crafted
from make_corpus import FACTORY, TORCH_INPUT_SHAPE
from zip_craft import GiB, MiB, copy_zip, patch_member, repeated

_SHAPE = ",".join(map(str, TORCH_INPUT_SHAPE))


def _state_dict():
    import torch
    from fuzz_models import small

    torch.manual_seed(0)
    return small().state_dict()


def _saved(target: Path, state, *, legacy: bool = False) -> Path:
    import torch

    torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    return target


def _with_metadata(metadata):
    state = _state_dict()
    state._metadata = metadata
    return state


def _largest_record(source: Path) -> str:
    with zipfile.ZipFile(source) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename]
        return max(records, key=lambda info: info.file_size).filename


def _legacy_storage_bomb(target: Path) -> Path:
    """A legacy-format state dict whose pickle declares a storage of 2**30 floats (4 GiB) for 4 bytes of data."""
    import torch

    _saved(target, {"fc.bias": torch.zeros(1)}, legacy=True)
    data = bytearray(target.read_bytes())
    at = data.index(b"X\x03\x00\x00\x00cpuq") + 10  # the storage's location, memoised, then its size
    assert data[at : at + 2] == b"K\x01", "a BININT1 of the storage's 1 element"
    data[at : at + 2] = b"J" + struct.pack("<i", 2**30)
    target.write_bytes(data)
    return target


def _safetensors(target: Path, header: dict | bytes, data_size: int, *, header_length: int | None = None) -> Path:
    """A safetensors file: the header (JSON of ``header``, or those bytes) and ``data_size`` bytes of
    zeros, made sparse (no disk taken) by extending the file."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(text) if header_length is None else header_length))
        f.write(text)
        f.truncate(8 + len(text) + data_size)
    return target


def _small_header() -> tuple[dict, int]:
    """The header of ``fuzz_models.small``'s state dict as float32, and its data size."""
    header, offset = {}, 0
    for name, tensor in _state_dict().items():
        nbytes = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


def cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    out = []

    def case(name, finding, path, expect_text, expect="refused"):
        argv = ("summary", FACTORY, "--weights", str(path), "--input-shape", _SHAPE)
        out.append(Crafted(f"weights-{name}", finding, argv, expect=expect, expect_text=expect_text))

    # ------------------------------------------------------------- hostile state dicts (.pt)
    path = _saved(folder / "metadata-list.pt", _with_metadata([1, 2]))
    case("metadata-list", "_metadata is a list: load_state_dict raises AttributeError, a traceback", path, "_metadata")
    path = _saved(folder / "metadata-int.pt", _with_metadata({"": 5}))
    case("metadata-int", "_metadata holds an int where a module's settings go: AttributeError", path, "_metadata")
    path = _saved(folder / "metadata-version-text.pt", _with_metadata({"bn": {"version": "x"}}))
    case(
        "metadata-version-text",
        "_metadata gives BatchNorm2d the version 'x': TypeError comparing it with 2",
        path,
        "version",
    )
    state = _state_dict()
    state[1] = state["fc.bias"]
    path = _saved(folder / "int-key.pt", state)
    case("int-key", "a key is the integer 1: AttributeError ('int' has no startswith)", path, "key 1")
    state = _state_dict()
    state["conv.weight"] = "weights"
    path = _saved(folder / "value-text.pt", state)
    case("value-text", "a parameter's value is text, not a tensor", path, "not a tensor")
    import torch

    state = _state_dict()
    state["fc.bias"] = state["fc.bias"].to(torch.complex64)
    path = _saved(folder / "complex-bias.pt", state)
    case(
        "complex-bias",
        "a complex bias for a real parameter: torch warns that it drops the imaginary part (the "
        "warning must not be printed before the result)",
        path,
        "",
        expect="read",
    )

    # ------------------------------------------------------------------ archives and records
    source = sources["pt"]
    record = _largest_record(source)
    path = copy_zip(source, folder / "record-zeros.pt", replace={record: repeated(4 * GiB + 512 * MiB)})
    case(
        "record-zeros",
        "a tensor's record is 4.5 GiB of deflated zeros (4.5 MB): torch.load reads every record "
        "whole before it checks its size",
        path,
        "over the limit",
    )
    byteorder = next(name for name in zipfile.ZipFile(source).namelist() if name.endswith("/byteorder"))
    path = copy_zip(source, folder / "byteorder-zeros.pt", replace={byteorder: repeated(16 * MiB)})
    case(
        "byteorder-zeros",
        "the byteorder record is 16 MiB of NUL bytes: torch's error quotes them all (control characters, and "
        "20 s and 1 GB to escape them one by one)",
        path,
        "Unknown endianness type",
    )
    path = _legacy_storage_bomb(folder / "legacy-storage.pt")
    case(
        "legacy-storage",
        "the legacy (pre-1.6) format, whose pickle declares a 4 GiB storage for 4 bytes of data: "
        "torch allocates it before reading",
        path,
        "legacy format",
    )
    path = patch_member(copy_zip(source, folder / "record-encrypted.pt"), record, flag_bits=0x1)
    case("record-encrypted", "a record is flagged encrypted", path, "is encrypted")
    path = patch_member(copy_zip(source, folder / "record-method-12.pt"), record, method=12)
    case(
        "record-method-12", "a record claims bzip2, which PyTorch's reader does not read", path, "compression method 12"
    )

    # ------------------------------------------------------------------------------- safetensors
    header, size = _small_header()
    big = 5 * GiB
    header["fc.weight"] = {"dtype": "F32", "shape": [big // 4], "data_offsets": [size, size + big]}
    path = _safetensors(folder / "declares-5gib.safetensors", header, size + big)
    case(
        "declares-5gib",
        "the header declares a 5 GiB tensor and the file is that long (sparse: no disk taken): "
        "safetensors copies it all into memory",
        path,
        "over the limit",
    )
    header, size = _small_header()
    path = _safetensors(folder / "header-length.safetensors", header, size, header_length=2**40)
    case("header-length", "the header's length says 1 TiB", path, "header")
    header["fc.weight"]["data_offsets"] = [0, 10**12]
    path = _safetensors(folder / "offsets-outside.safetensors", header, size)
    case(
        "offsets-outside",
        "a tensor's byte range lies past the end of the file (a lying header)",
        path,
        "data_offsets",
    )
    header, size = _small_header()
    header["fc.weight"]["shape"] = [2, 2**40]
    path = _safetensors(folder / "shape-lies.safetensors", header, size)
    case("shape-lies", "a tensor's shape needs 8 TiB, its byte range holds 2 KiB (a lying header)", path, "safetensors")
    nested = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = _safetensors(folder / "header-nested.safetensors", nested, 0)
    case("header-nested", "the header is 100,000 nested lists", path, "nested deeper than")
    return out
