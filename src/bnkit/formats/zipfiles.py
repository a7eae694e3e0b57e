"""Zip archives (``.pt2``, ``.keras``, the zips inside them) read as data, each read bounded.

:class:`SafeZip` opens an archive with :mod:`zipfile` and checks its directory before any member
is read: no encrypted member, no compression method Python cannot decompress, no name twice. A
member is read only up to a limit the caller derives from what it needs (a version string, a
JSON document, the bytes a tensor's description covers), never up to the size the member claims:
a few megabytes of deflated zeros cannot become gigabytes. Every failure is a
:class:`ZipMemberError` naming the member.
"""

from __future__ import annotations

import zipfile
import zlib

from bnkit.formats.limits import LimitExceeded, format_bytes
from bnkit.text import one_line

__all__ = ["SafeZip", "ZipMemberError", "is_zip"]

_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
# what a corrupt member raises while it is decompressed or checked
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError)
_CHUNK = 1 << 20


class ZipMemberError(ValueError):
    """An archive, or one of its members, that cannot be read as data; the message names it."""


def _quoted(name: str) -> str:
    """``name`` in quotes, control characters escaped (``repr`` does), cut when long."""
    text = repr(name)
    return text if len(text) <= 120 else text[:116] + "...'"


def _member(name: str) -> str:
    return f"member {_quoted(name)}"


def is_zip(path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


class SafeZip:
    """``zipfile.ZipFile(source)`` with its directory checked (see the module doc).

    ``what`` names the archive in messages (``"the archive"``, ``"the sample inputs"``).
    """

    def __init__(self, source, what: str = "the archive") -> None:
        self.what = what
        try:
            self.zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            # UnicodeDecodeError (a ValueError): a member name flagged UTF-8 that is not
            raise ZipMemberError(f"{what} is not a readable zip archive ({type(e).__name__}: {one_line(e)})") from e
        try:
            self._check_directory()
        except BaseException:
            self.zip.close()
            raise

    def _check_directory(self) -> None:
        seen = set()
        for info in self.zip.infolist():
            name = _quoted(info.filename)
            if info.filename in seen:
                raise ZipMemberError(f"{self.what} holds two members named {name}")
            seen.add(info.filename)
            if info.flag_bits & 0x1:
                raise ZipMemberError(f"{self.what}: member {name} is encrypted")
            if info.compress_type not in _METHODS:
                raise ZipMemberError(
                    f"{self.what}: member {name} uses compression method {info.compress_type}, which bnkit "
                    f"does not read ({', '.join(_METHODS.values())})"
                )

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()

    # ------------------------------------------------------------------------------ members

    def names(self) -> list[str]:
        return [info.filename for info in self.zip.infolist()]

    def size(self, name: str) -> int:
        """The size ``name`` claims (uncompressed): an upper bound of what reading it gives."""
        return self.zip.getinfo(name).file_size

    def read(self, name: str, limit: int, what: str | None = None) -> bytearray:
        """The member ``name``, refused if it holds more than ``limit`` bytes."""
        what = what or _member(name)
        info = self.zip.getinfo(name)
        if info.file_size > limit:
            raise LimitExceeded(
                f"{what} is {format_bytes(info.file_size)}, over the limit of {format_bytes(limit)} for it"
            )
        return self.read_prefix(name, info.file_size, what)

    def read_prefix(self, name: str, nbytes: int, what: str | None = None) -> bytearray:
        """The first ``nbytes`` of member ``name``, decompressing no more (the whole of it checks its CRC)."""
        what = what or _member(name)
        buffer = bytearray(nbytes)
        got = self.readinto(name, memoryview(buffer), what)
        if got < nbytes:
            raise ZipMemberError(f"{what} holds {got} bytes, {nbytes} expected (truncated?)")
        return buffer

    def readinto(self, name: str, buffer: memoryview, what: str | None = None) -> int:
        """Fill ``buffer`` from the start of member ``name``; returns the bytes read (fewer at its end)."""
        what = what or _member(name)
        total = 0
        try:
            with self.zip.open(name) as member:
                while total < len(buffer):
                    got = member.readinto(buffer[total : total + _CHUNK])
                    if not got:
                        break
                    total += got
        except _READ_ERRORS as e:  # a bad CRC, a truncated or corrupt stream
            raise ZipMemberError(f"{what} cannot be read ({type(e).__name__}: {one_line(e, 200)})") from e
        return total
