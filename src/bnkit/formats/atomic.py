"""Writing a file so that nothing is lost and nothing is left behind.

Never over an existing file without ``force``. A writer writes into a private folder beside the
target, ``.<stem>.bnkit-<host>-<pid>-<random><suffix>``, in a file with the target's own name (Keras
insists on ``.keras``); once complete, the file gets the permissions a new file gets here, is
flushed to disk and is renamed into place. The frameworks' own temporary files land in that folder
too (safetensors writes a ``.tmpXXXXXX`` beside its target and renames it; Keras a ``tmpXXXXXX``
for weights that do not fit in memory), so they go with it.

A failure of the writer — a full disk (``ENOSPC``), a file-size limit (``EFBIG``), whatever a
framework raises — becomes one :class:`ModelFileError`, ``<target>: cannot write the file
(<reason>)``, the reason in the OS's words when the error or one it came from carries an errno,
and removes the partial file. A stop signal (see :mod:`bnkit.interrupts`) received during the
write, even one the framework's code swallowed, stops the rename; the clean-up itself is not cut
short by a signal.

A run killed outright (SIGKILL, a power cut) leaves its folder behind. Its name says whose it is:
the next write to the same target removes those of this host whose process is gone (same host name
and PID namespace, no process with that PID). Others — another machine, a live process, names
bnkit did not make — are left alone, and named in the error when a write fails (they may be
what fills the disk).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.interrupts import deferred, raise_if_stop_requested
from bnkit.text import one_line, printable

__all__ = ["atomic_folder", "atomic_path", "check_folder_writable", "check_writable", "write_error"]

_MARK = "bnkit"
_NAME_MAX = 255  # bytes in a file name, on every common file system
_PID_DIGITS = 7  # Linux's pid_max is at most 2**22


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
    return _check_parent_takes_new_files(path)


def _check_parent_takes_new_files(path: Path) -> Path:
    """The folder ``path`` will be written in exists and takes a new file: tried (a probe, removed at
    once), so a read-only folder, a full disk or a read-only mount is found before any slow work."""
    folder = path.parent
    if not folder.exists():
        raise ModelFileError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: is not a folder")
    with deferred():  # a signal must not leave the probe behind
        try:
            probe = _unique(folder, _prefix(path), ".probe", lambda p: os.close(os.open(p, _NEW_FILE, 0o600)))
        except OSError as e:
            raise ModelFileError(f"{folder}: cannot write in this folder ({e.strerror or e})") from e
        os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False):
    """Yield a path for the writer to create; on success give the file the usual permissions,
    flush it to disk and rename it to ``path``. See the module doc for failures, signals and leftovers.
    """
    path = check_writable(path, force)
    _remove_stale(path)
    work = None
    try:
        with deferred():
            work = _unique(path.parent, _prefix(path), path.suffix, lambda p: os.mkdir(p, 0o700))
            mode = _usual_mode(work)
        written = work / (path.stem + path.suffix.lower())  # Keras insists on ".keras"
        yield written
        with deferred():
            _finish(written, path, force, mode)
    except ModelFileError:
        raise
    except Exception as e:
        raise_if_stop_requested()  # a signal a framework turned into an error of its own
        raise _naming_leftovers(write_error(path, e), path, work) from e
    finally:
        if work is not None:
            with deferred():
                shutil.rmtree(work, ignore_errors=True)


def write_error(path: str | os.PathLike, error: BaseException) -> ModelFileError:
    """``<path>: cannot write the file (<reason>)``: the OS's words (``No space left on device``) when
    ``error`` or one it came from carries an errno — torch's zip writer raises ``RuntimeError``
    with the ``OSError`` as its context, safetensors says ``(os error 28)`` — else the error itself."""
    return ModelFileError(f"{printable(str(path))}: cannot write the file ({_reason(error)})")


# ---------------------------------------------------------------------------- the steps

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def _finish(written: Path, path: Path, force: bool, mode: int) -> None:
    if not written.is_file():
        raise ModelFileError(f"{path}: cannot write the file (the writer left no file)")
    if stat.S_IMODE(written.stat().st_mode) != mode:  # safetensors makes its file 0600
        os.chmod(written, mode)
    with open(written, "rb") as f:  # a crash after the rename must not leave an empty file
        os.fsync(f.fileno())
    raise_if_stop_requested()  # a signal swallowed by the writer's code (Keras' bare except:)
    _place(written, path, force)
    _sync_folder(path.parent)


def _place(written: Path, path: Path, force: bool) -> None:
    if force:
        os.replace(written, path)
        return
    try:
        os.link(written, path)  # fails on an existing name: no window between a check and the rename
    except FileExistsError:
        raise ModelFileError(f"{path}: already exists; pass --force to replace it") from None
    except OSError:  # no hard links on this file system (FAT, some network mounts)
        if path.exists():
            raise ModelFileError(f"{path}: already exists; pass --force to replace it") from None
        os.replace(written, path)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (not possible everywhere: then the file system's word stands)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _usual_mode(folder: Path) -> int:
    """The permissions a new file gets here (umask, default ACLs), from a file made as writers do."""
    probe = folder / ".mode"
    os.close(os.open(probe, _NEW_FILE, 0o666))
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        os.unlink(probe)


def _reason(error: BaseException) -> str:
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.strerror or os.strerror(e.errno)
        found = re.search(r"\(os error (\d+)\)", str(e))  # Rust's io::Error
        if found:
            return os.strerror(int(found[1]))
        e = e.__cause__ or e.__context__
    return f"{type(error).__name__}: {one_line(error)}"


# ---------------------------------------------------------------------------- whose leftovers


def _machine() -> str:
    """This host, and its PID namespace where there is one: a PID says something only within it."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "localhost"
    try:
        return f"{host}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def _prefix(path: Path) -> str:
    """``.<stem>.bnkit-``, the stem shortened if need be so that a whole temporary name fits."""
    suffix = max(path.suffix, ".probe", key=len)
    longest = f".{_MARK}-{_machine()}-{'9' * _PID_DIGITS}-{'f' * 8}{suffix}"
    room = _NAME_MAX - len(longest.encode()) - 2
    stem = path.stem
    while stem and len(stem.encode()) > room:
        stem = stem[:-1]
    return f".{stem}.{_MARK}-"


def _unique(folder: Path, prefix: str, suffix: str, make) -> Path:
    """``make(name)`` for a new ``<prefix><host>-<pid>-<random><suffix>`` in ``folder``; its path."""
    for _ in range(100):
        candidate = folder / f"{prefix}{_machine()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{folder}: no free temporary name")


def _remove_stale(path: Path) -> None:
    """Remove what killed runs of bnkit on this host left while writing ``path`` (see the module doc)."""
    pattern = re.compile(
        re.escape(_prefix(path)) + r"(?P<machine>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{8}"
        f"(?:{re.escape(path.suffix)}|\\.probe)"
    )
    here = _machine()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found or found["machine"] != here or _alive(int(found["pid"])):
            continue
        with deferred(), contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _naming_leftovers(error: ModelFileError, path, work) -> ModelFileError:
    """``error``, naming the hidden files earlier writes left beside ``path`` (they may be what fills the disk)."""
    leftovers = _leftovers(path, work)
    return ModelFileError(f"{error}; beside it, hidden files of earlier writes: {leftovers}") if leftovers else error


def _leftovers(path: Path, own: Path | None, shown: int = 3) -> str:
    """The hidden temporary names of earlier writes of ``path`` still beside it, bnkit's or an older
    version's (``.<stem>.<random><suffix>``), named so that the user can remove them."""
    starts = (f".{path.stem}.", _prefix(path))
    ends = (path.suffix, path.suffix.lower(), ".probe")
    try:
        names = sorted(n for n in os.listdir(path.parent) if n.startswith(starts) and n.endswith(ends))
    except OSError:
        return ""
    names = [n for n in names if own is None or n != own.name]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(printable(n) for n in names[:shown]) + more


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` may exist here (when in doubt, yes: then nothing is removed)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------------- folders


def check_folder_writable(path: str | os.PathLike, marker: str, what: str, force: bool = False) -> Path:
    """:func:`check_writable` for a folder format (``what``, marked by the file ``marker``): an existing
    path is replaced only with ``force`` and only when it is such a folder (not a file, not a link,
    not another folder)."""
    path = Path(path)
    if path.is_symlink():
        raise ModelFileError(f"{printable(str(path))}: is a link: not replaced; give the name of a new folder")
    if path.exists():
        if not path.is_dir():
            raise ModelFileError(
                f"{printable(str(path))}: is a file, not a {what}: not replaced; give the name of a new folder"
            )
        if not (path / marker).is_file():
            raise ModelFileError(
                f"{printable(str(path))}: is a folder and not a {what} (no {marker}): not replaced; "
                "give the name of a new folder"
            )
        if not force:
            raise ModelFileError(f"{printable(str(path))}: already exists; pass --force to replace it")
    return _check_parent_takes_new_files(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, marker: str, what: str, force: bool = False):
    """:func:`atomic_path` for a folder format: yield ``(folder, work)``, the path of the folder for
    the writer to create (it does not exist yet) and a private folder beside it for the writer's own
    files; on success every file of the folder is flushed to disk and the folder renamed to ``path``.

    Both lie in the private folder ``.<name>.bnkit-<host>-<pid>-<random>`` beside ``path`` (so in
    the same file system: a rename), removed at the end whatever happens. An existing ``path`` is
    replaced only with ``force`` and only when it is a folder of this format (``marker`` in it):
    the old folder is renamed aside into the private folder, the new one renamed in (on failure the
    old one is renamed back), and the old one removed with the private folder. Without ``force``
    the rename never replaces a path that appeared meanwhile (``renameat2(RENAME_NOREPLACE)`` where
    the system has it, else a check just before the rename).
    """
    path = check_folder_writable(path, marker, what, force)
    _remove_stale(path)
    work = None
    try:
        with deferred():
            work = _unique(path.parent, _prefix(path), path.suffix, lambda p: os.mkdir(p, 0o700))
        written = work / (path.name or "folder")
        yield written, work
        with deferred():
            if not (written / marker).is_file():
                raise ModelFileError(f"{printable(str(path))}: cannot write the folder (the writer left no {marker})")
            _sync_tree(written)
            raise_if_stop_requested()
            _place_folder(written, work, path, marker, what, force)
            _sync_folder(path.parent)
    except ModelFileError:
        raise
    except Exception as e:
        raise_if_stop_requested()
        error = ModelFileError(f"{printable(str(path))}: cannot write the folder ({_reason(e)})")
        raise _naming_leftovers(error, path, work) from e
    finally:
        if work is not None:
            with deferred():
                shutil.rmtree(work, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (a crash after the rename must not leave
    empty files in it)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _sync_folder(Path(root))


def _place_folder(written: Path, work: Path, path: Path, marker: str, what: str, force: bool) -> None:
    shown = printable(str(path))
    if os.path.lexists(path):
        if not force:
            raise ModelFileError(f"{shown}: already exists; pass --force to replace it")
        if path.is_symlink() or not path.is_dir() or not (path / marker).is_file():
            raise ModelFileError(f"{shown}: is not a {what} (it changed during the write): not replaced")
        aside = work / ".replaced"
        os.rename(path, aside)
        try:
            _rename_no_replace(written, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(aside, path)  # the old folder back where it was
            raise
        return  # the old folder goes with the private one
    _rename_no_replace(written, path)


def _rename_no_replace(source: Path, target: Path) -> None:
    """``os.rename``, failing (``already exists``) rather than replacing an existing ``target``: an
    empty folder would otherwise be replaced silently."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise ModelFileError(f"{printable(str(target))}: already exists; pass --force to replace it")
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # EINVAL: a file system without the flag
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise ModelFileError(f"{printable(str(target))}: already exists; pass --force to replace it")
    os.rename(source, target)
