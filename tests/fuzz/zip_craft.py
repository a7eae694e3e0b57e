"""Zip archives as an attacker writes them, for the crafted ``.keras`` and ``.pt`` files.

:func:`copy_zip` rewrites an archive member by member with the real zip module; :func:`repeated`
writes a member of gigabytes of one repeated chunk as a few megabytes of deflate, fast (each
chunk's deflate block is computed once: the zip module still computes the CRC over every byte,
0.5 s a GiB); :func:`patch_member` then changes what the zip module will not write (an encrypted
flag, an unknown compression method, a name that is not UTF-8) in both of the member's headers.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

MiB = 2**20
GiB = 2**30
_CHUNK = 16 * MiB
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # a final, empty block of fixed Huffman codes: the end of a deflate stream


def copy_zip(source: Path, target: Path, replace: dict | None = None, add: dict | None = None) -> Path:
    """Copy the archive; ``replace``/``add`` map a member name to bytes, or to ``writer(zout, name)``
    for a member written specially (``replace`` to None drops it). Members keep their compression."""
    replace, add = dict(replace or {}), dict(add or {})
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            content = replace.pop(info.filename, zin.read(info.filename))
            if content is None:
                continue
            if callable(content):
                content(zout, info.filename)
            else:
                zout.writestr(info, content)
        for name, content in add.items():
            if callable(content):
                content(zout, name)
            else:
                zout.writestr(name, content)
    return target


class _Blocks:
    """A stand-in for the zip module's compressor: each write becomes independent deflate blocks (a full
    flush ends each), and the blocks of the repeated chunk are computed once."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.chunk_blocks = self._deflate(chunk)

    @staticmethod
    def _deflate(data: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    def compress(self, data: bytes) -> bytes:
        return self.chunk_blocks if data is self.chunk else self._deflate(data)

    def flush(self) -> bytes:
        return _FINAL_EMPTY_BLOCK


def repeated(nbytes: int, prefix: bytes = b"", byte: bytes = b"\0"):
    """A writer of a deflated member: ``prefix`` then ``byte`` repeated up to ``nbytes`` in all."""

    def write(zout: zipfile.ZipFile, name: str) -> None:
        info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = byte * _CHUNK
        with zout.open(info, "w", force_zip64=nbytes >= zipfile.ZIP64_LIMIT) as member:
            member._compressor = _Blocks(chunk)  # the zip module's writer, with blocks computed once
            member.write(prefix)
            left = nbytes - len(prefix)
            while left >= _CHUNK:
                member.write(chunk)
                left -= _CHUNK
            if left:
                member.write(chunk[:left])

    return write


def patch_member(path: Path, name: str, *, flag_bits: int = 0, method: int | None = None, raw_name: bytes = b""):
    """Set ``flag_bits`` and/or the compression ``method`` of member ``name`` in its local and central
    headers; ``raw_name`` (as long as the name) replaces the name's bytes (flagged UTF-8 when not ASCII)."""
    data = bytearray(path.read_bytes())
    encoded = name.encode("utf-8")
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        start_dir = archive.start_dir
    if raw_name:
        assert len(raw_name) == len(encoded), "the name's length is in the headers"
        flag_bits |= 0x800
    local = info.header_offset
    _patch(data, local, 6, 8, 30, 26, encoded, flag_bits, method, raw_name)
    at = start_dir
    while data[at : at + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack("<HHH", data[at + 28 : at + 34])
        if bytes(data[at + 46 : at + 46 + name_length]) == encoded:
            _patch(data, at, 8, 10, 46, 28, encoded, flag_bits, method, raw_name)
        at += 46 + name_length + extra_length + comment_length
    path.write_bytes(data)
    return path


def _patch(data, at, flag_at, method_at, name_at, length_at, encoded, flag_bits, method, raw_name) -> None:
    assert struct.unpack("<H", data[at + length_at : at + length_at + 2])[0] == len(encoded)
    flags = struct.unpack("<H", data[at + flag_at : at + flag_at + 2])[0] | flag_bits
    data[at + flag_at : at + flag_at + 2] = struct.pack("<H", flags)
    if method is not None:
        data[at + method_at : at + method_at + 2] = struct.pack("<H", method)
    if raw_name:
        data[at + name_at : at + name_at + len(raw_name)] = raw_name
