"""Writing a file so that nothing is lost: never over an existing file without ``force``, always
through a temporary file beside it, renamed into place once complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from bnkit.formats import ModelFileError

__all__ = ["atomic_path", "check_writable"]


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to replace an existing file unless ``force``; the folder must exist and take a new file.

    Writing is tried (a temporary file, removed at once), so a read-only folder, a full disk or a
    read-only mount is found before any slow work, whoever runs it.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give a file name inside it")
    if path.exists() and not force:
        raise ModelFileError(f"{path}: already exists; pass --force to replace it")
    folder = path.parent
    if not folder.exists():
        raise ModelFileError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise ModelFileError(f"{folder}: cannot write in this folder ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False):
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it into place.

    The writer creates the temporary file itself, so it gets the usual permissions (not
    ``mkstemp``'s private 0600).
    """
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # some writers refuse an existing file
    try:
        yield Path(tmp)
        if path.exists() and not force:  # appeared meanwhile
            raise ModelFileError(f"{path}: already exists; pass --force to replace it")
        with open(tmp, "rb") as written:  # a crash after the rename must not leave an empty file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
