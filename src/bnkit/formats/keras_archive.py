"""``.keras``: a Keras 3 archive (a zip of ``config.json``, ``metadata.json`` and the weights),
loaded by Keras in safe mode (no ``Lambda`` or other code from the file runs).

Keras trusts the archive's directory and the sizes its members claim; before Keras opens it, bnkit
checks it as data (:class:`~bnkit.formats.zipfiles.SafeZip`: no encrypted member, no unknown
compression method, no name twice) and charges to the budget what Keras will take:

* ``config.json`` and ``metadata.json``: read bounded and parsed with a size and depth limit (a
  3 GiB run of spaces deflates to 3 MB; 100,000 nested lists break Python's parser);
* ``model.weights.h5``: its size (Keras reads it into memory), then its datasets' declared sizes,
  with the checks of :mod:`bnkit.formats.h5_checks` (no global heap HDF5 would loop on, no link
  or storage outside the file, no filter plugin); the variables the config declares are charged
  before Keras creates them, and must be what the weights hold (:mod:`bnkit.formats.keras_variables`);
* every member, when the archive holds more than the three: Keras then extracts all of them to a
  temporary folder (its assets).

An archive written by tf-keras 2 (``metadata.json``: ``keras_version`` 2.x) is read the same way
but for its config, translated, and its weights, set as data (:mod:`bnkit.formats.keras2_archive`).
An archive whose weights are ``model.weights.npz`` is refused: Keras 3 writes them as pickled NumPy
objects and cannot load them without ``allow_pickle``.
"""

from __future__ import annotations

import io
import mmap
import struct
from pathlib import Path

from bnkit.formats import ModelFileError, keras2_archive
from bnkit.formats._keras_loading import load_with_keras
from bnkit.formats.atomic import atomic_path
from bnkit.formats.h5_checks import H5FileError, check_global_heaps, check_h5, no_filter_plugins
from bnkit.formats.keras_variables import charge_variables, check_weights_cover
from bnkit.formats.limits import JSON_EXPANSION, Budget, format_bytes, parse_json
from bnkit.formats.zipfiles import SafeZip, ZipMemberError, is_zip
from bnkit.text import one_line, printable

__all__ = ["read", "write"]

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS_H5 = "model.weights.h5"
WEIGHTS_NPZ = "model.weights.npz"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_KERAS_MEMBERS = 3  # config, metadata, weights: with more, Keras extracts the whole archive (its assets)


def read(path: Path, budget: Budget):
    # Keras answers "File not found" for a .keras file that is not a zip archive: say what is wrong
    if not is_zip(path):
        raise ModelFileError(f"{path}: not a Keras .keras archive (not a zip file: truncated, or another format?)")
    with no_filter_plugins():
        config, keras2_slots = _check(path, budget)
        if keras2_slots is None:
            return load_with_keras(path, config)
        shown = printable(str(path))
        try:
            with SafeZip(path, "the archive") as archive, _member_file(archive, WEIGHTS_H5) as member:
                import h5py

                with h5py.File(member, "r") as weights:
                    return keras2_archive.load(shown, config, keras2_slots, weights)
        except (ZipMemberError, OSError) as e:
            raise ModelFileError(f"{shown}: {WEIGHTS_H5}: {one_line(e, 200)}") from e


def check_archive(path: Path, budget: Budget) -> dict:
    """Check the archive as data and charge what Keras will take (see the module doc); return its config
    (for an archive of tf-keras 2, translated for Keras 3: :mod:`bnkit.formats.keras2_archive`)."""
    return _check(path, budget)[0]


def _check(path: Path, budget: Budget):
    """``check_archive``'s work; also, for an archive of tf-keras 2, where each layer's weights are."""
    shown = printable(str(path))
    keras2_slots = None
    try:
        with SafeZip(path, "the archive") as archive:
            names = archive.names()
            if CONFIG not in names:
                raise ModelFileError(f"{shown}: the archive holds no {CONFIG}: not a Keras 3 model archive")
            config = _read_json(archive, CONFIG, budget)
            if not isinstance(config, dict):
                raise ModelFileError(f"{shown}: {CONFIG} is not a JSON object but a {type(config).__name__}")
            if METADATA in names and keras2_archive.is_keras2(_read_json(archive, METADATA, budget)):
                config, keras2_slots = keras2_archive.prepare(config, shown)
            if WEIGHTS_NPZ in names and WEIGHTS_H5 not in names:
                raise ModelFileError(
                    f"{shown}: the weights are {WEIGHTS_NPZ} (pickled NumPy objects, which Keras loads only "
                    f"with allow_pickle); bnkit reads archives whose weights are {WEIGHTS_H5}"
                )
            if WEIGHTS_H5 not in names:
                raise ModelFileError(f"{shown}: the archive holds no weights ({WEIGHTS_H5})")
            variables = charge_variables(config, budget, shown, legacy=keras2_slots is not None)
            check_weights_cover(variables, _check_weights(archive, budget, variables), shown)
            if len(names) > _KERAS_MEMBERS:
                for name in names:
                    budget.charge(
                        archive.size(name), f"member {one_line(name, 120)!r} (Keras extracts the archive to disk)"
                    )
    except (ZipMemberError, H5FileError) as e:
        raise ModelFileError(f"{shown}: {e}") from e
    except ValueError as e:  # parse_json: not JSON (LimitExceeded, also a ValueError, goes on to the caller)
        if type(e) is not ValueError:
            raise
        raise ModelFileError(f"{shown}: {e}") from e
    return config, keras2_slots


def _read_json(archive: SafeZip, name: str, budget: Budget):
    """Member ``name`` parsed as JSON: charged from the size it declares before a byte is decompressed."""
    size = archive.size(name)
    budget.charge(size * JSON_EXPANSION, f"{name} ({format_bytes(size)} of JSON)")
    return parse_json(archive.read(name, size, name), name)


def _check_weights(archive: SafeZip, budget: Budget, variables: int) -> int:
    """Check and charge ``model.weights.h5``; return the bytes its datasets declare."""
    import h5py

    size = archive.size(WEIGHTS_H5)
    budget.charge(size, f"{WEIGHTS_H5} ({format_bytes(size)}, read into memory by Keras)")
    with _member_file(archive, WEIGHTS_H5) as member:
        # Keras writes the superblock first; elsewhere, HDF5 would look for it at every power of two
        # up to the member's end, decompressing all that way
        if member.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            raise H5FileError(f"{WEIGHTS_H5} is not an HDF5 file (no HDF5 signature at its start)")
        member.seek(0)
        check_global_heaps(*member.contents(), WEIGHTS_H5)
        try:
            weights = h5py.File(member, "r")
        except OSError as e:
            raise H5FileError(f"{WEIGHTS_H5} is not a readable HDF5 file ({one_line(e, 200)})") from e
        with weights:
            return check_h5(weights, budget, WEIGHTS_H5, variables)


class _Seekable(io.RawIOBase):
    """A read-only file of ``size`` bytes at ``position``; subclasses read."""

    size: int
    position: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position


class _Window(_Seekable):
    """Bytes ``[start, start + size)`` of a file: a member stored uncompressed, read in place.

    ``zipfile`` (Python 3.11) rewinds to the member's start on every backward seek, and h5py
    seeks back and forth.
    """

    def __init__(self, file, start: int, size: int) -> None:
        super().__init__()
        self.file, self.start, self.size, self.position = file, start, size, 0
        self.map = None

    def contents(self):
        """``(bytes-like, start, end)``: the member's bytes, mapped, not read."""
        if self.map is None:
            self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        return self.map, self.start, min(self.start + self.size, len(self.map))

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        super().close()

    def readinto(self, buffer) -> int:
        wanted = max(0, min(len(buffer), self.size - self.position))
        self.file.seek(self.start + self.position)
        got = self.file.readinto(memoryview(buffer)[:wanted])
        self.position += got
        return got


class _Decompressed(_Seekable):
    """A compressed member, decompressed only as far as it is read, and kept: random access at the
    price of the prefix read so far (at most the member's size, charged already). A member of
    zeros that is no HDF5 file stops after a few kilobytes."""

    def __init__(self, member, size: int) -> None:
        super().__init__()
        self.member, self.size, self.data, self.position = member, size, bytearray(), 0

    def contents(self):
        """``(bytes-like, start, end)``: the whole member, decompressed (its size is charged)."""
        self._fill(self.size)
        return self.data, 0, len(self.data)

    def close(self) -> None:
        self.member.close()
        super().close()

    def _fill(self, end: int) -> None:
        while len(self.data) < end:
            chunk = self.member.read(1 << 20)
            if not chunk:
                return
            self.data += chunk

    def readinto(self, buffer) -> int:
        self._fill(self.position + len(buffer))
        got = self.data[self.position : self.position + len(buffer)]
        memoryview(buffer)[: len(got)] = got
        self.position += len(got)
        return len(got)


def _member_file(archive: SafeZip, name: str):
    """A seekable file of member ``name``: in place when stored, else decompressed as it is read."""
    import zipfile

    info = archive.zip.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return _Decompressed(archive.zip.open(info), info.file_size)
    file = archive.zip.fp
    file.seek(info.header_offset)
    header = file.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ZipMemberError(f"member {one_line(name, 120)!r}: its local header is damaged")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return _Window(file, info.header_offset + 30 + name_length + extra_length, info.file_size)


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    with atomic_path(path, force) as tmp:
        model.save(tmp)
