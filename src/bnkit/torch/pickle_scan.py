"""A ``torch.save`` pickle checked opcode by opcode, never loaded.

A ``.pt2`` archive holds its program's sample inputs as a ``torch.save`` zip. bnkit never loads
them, but refuses an archive whose pickle names anything but tensor rebuilding: the file is not
what it claims. :func:`scan_tensor_pickle` reads every pickle in that zip (torch's reader finds
``data.pkl`` case-insensitively, so every member whose name ends in ``.pkl`` in any case) with
:func:`pickletools.genops`, which decodes and executes nothing.

The scan is bounded: the zip, each pickle and the number of opcodes have limits (real sample
inputs are a few kilobytes), and it keeps only what naming a global needs (the last two strings
pushed and the memo's strings), not an entry per opcode.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct

from bnkit.formats.limits import format_bytes
from bnkit.formats.zipfiles import SafeZip, ZipMemberError
from bnkit.text import one_line
from bnkit.torch.pt2_errors import UnsafeArchiveError

__all__ = ["scan_tensor_pickle", "MAX_PICKLE_BYTES", "MAX_OPCODES"]

MAX_PICKLE_BYTES = 16 * 2**20
MAX_OPCODES = 1_000_000  # torch.save of a few sample tensors: under a hundred
MAX_MEMO = 100_000

_TORCH_REBUILD = {
    f"torch._utils._rebuild_{kind}"
    for kind in ("tensor", "tensor_v2", "tensor_v3", "parameter", "device_tensor_from_cpu_tensor")
}
_TORCH_STORAGE = re.compile(r"torch\.(cuda\.)?[A-Z][A-Za-z0-9]*Storage")
_PLAIN_GLOBALS = {"collections.OrderedDict", "torch.serialization._get_layout", "torch.Size", "torch.device"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_NO_STACK_EFFECT = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}
_OBJECT_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}


def _tensor_global(name: str) -> bool:
    import torch

    if name in _PLAIN_GLOBALS or name in _TORCH_REBUILD or _TORCH_STORAGE.fullmatch(name):
        return True
    module, _, attr = name.rpartition(".")  # a dtype, which _rebuild_tensor_v3 names
    return module == "torch" and isinstance(vars(torch).get(attr), torch.dtype)  # vars: no lazy import


def scan_tensor_pickle(data: bytes, part: str) -> None:
    """Refuse ``data`` (a ``torch.save`` zip) unless its pickles name only tensor rebuilding.

    Every global a pickle would import must be one ``torch.save`` writes for tensors; a global
    whose name cannot be read statically is refused too.
    """
    try:
        inner = SafeZip(io.BytesIO(data), part)
    except ZipMemberError as e:
        raise UnsafeArchiveError(f"{part} is not in torch.save's zip format ({one_line(e)})") from e
    with inner:
        pickles = [n for n in inner.names() if n.lower().endswith(".pkl")]
        if not pickles:
            raise UnsafeArchiveError(f"{part} holds no pickle bnkit can check")
        for name in pickles:
            what = f"{part}: {one_line(name, 120)!r}"
            try:
                payload = inner.read(name, MAX_PICKLE_BYTES, what)
            except ZipMemberError as e:
                raise UnsafeArchiveError(f"{part} is not in torch.save's zip format ({one_line(e)})") from e
            except ValueError as e:  # over the limit (LimitExceeded)
                raise UnsafeArchiveError(str(e)) from e
            for global_name in pickle_globals(payload, what):
                if not _tensor_global(global_name):
                    raise UnsafeArchiveError(f"{part} would call {one_line(global_name, 120)} when unpickled")


def pickle_globals(data: bytes | bytearray, part: str):
    """The ``module.name`` of every global the pickle imports, found without unpickling it."""
    if len(data) > MAX_PICKLE_BYTES:
        raise UnsafeArchiveError(
            f"{part} is a pickle of {format_bytes(len(data))} (at most {format_bytes(MAX_PICKLE_BYTES)})"
        )
    last: list = [None, None]  # what the last two opcodes pushed: a str, or None for anything else
    memo: dict = {}  # what each memo entry holds: a str, or None for anything else
    count = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            count += 1
            if count > MAX_OPCODES:
                raise UnsafeArchiveError(f"{part} is a pickle of more than {MAX_OPCODES:,} opcodes")
            name = op.name
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else arg] = last[-1]  # MEMOIZE numbers entries in order
                if len(memo) > MAX_MEMO:
                    raise UnsafeArchiveError(f"{part} is a pickle of more than {MAX_MEMO:,} memo entries")
                continue
            if name in _NO_STACK_EFFECT:
                continue
            if name in _STRING_OPS:
                pushed = arg if isinstance(arg, str) else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            elif name == "GLOBAL":
                yield arg.replace(" ", ".", 1)
                pushed = None
            elif name == "STACK_GLOBAL":
                module, attr = last
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise UnsafeArchiveError(f"{part} is a pickle that imports a name bnkit cannot read statically")
                yield f"{module}.{attr}"
                pushed = None
            elif name in _OBJECT_OPS:
                raise UnsafeArchiveError(f"{part} is a pickle that creates objects ({name})")
            else:
                pushed = None
            last = [last[-1], pushed]
    except UnsafeArchiveError:
        raise
    except (ValueError, EOFError, OverflowError, struct.error) as e:  # genops on bytes that are not a pickle
        raise UnsafeArchiveError(f"{part} is not a readable pickle ({one_line(e)})") from e
