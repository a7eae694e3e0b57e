"""bnkit's own standard error, apart from what the frameworks write there while a command runs.

torch.fx prints a traceback to ``sys.stderr`` whenever a traced module's code raises (before the
exception reaches bnkit), Keras and absl print notices, and warnings land there too: on the command
line they would bury bnkit's one error line. :func:`keep_framework_output` sends whatever is
written to ``sys.stderr`` inside it to a buffer, for the command line to show with ``--verbose``;
bnkit's own lines (errors, the progress bar) go to :func:`own_stderr`, the stream that was
``sys.stderr`` when the block began. :func:`keep_fd_output` keeps what C and C++ code writes straight to
file descriptor 2, past ``sys.stderr`` (TensorFlow's logs as it is imported).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile

__all__ = ["fd_output_logged", "keep_fd_output", "keep_framework_output", "own_stderr"]

_KEPT_FD_BYTES = 64 * 2**10  # of what was written to descriptor 2, the first bytes kept

_own: list = []  # the streams bnkit writes its own lines to, innermost last


def own_stderr():
    """Where bnkit's own messages go: the real stderr, even inside :func:`keep_framework_output`."""
    return _own[-1] if _own else sys.stderr


@contextlib.contextmanager
def keep_framework_output():
    """Yield a buffer that receives everything written to ``sys.stderr`` in the block."""
    kept = io.StringIO()
    _own.append(sys.stderr)
    try:
        with contextlib.redirect_stderr(kept):
            yield kept
    finally:
        _own.pop()


@contextlib.contextmanager
def keep_fd_output():
    """Yield a list that receives, once the block ends, the lines written to file descriptor 2 in it
    (the first 64 KiB of them). TensorFlow's C++ code logs there when it is imported, whatever
    ``sys.stderr`` is; the lines are kept for the caller to show (as a framework's warnings). Where
    descriptor 2 cannot be redirected (closed), nothing is kept."""
    kept: list[str] = []
    try:
        saved = os.dup(2)
        buffer = tempfile.TemporaryFile()
    except OSError:
        yield kept
        return
    with buffer:
        for stream in (sys.stderr, sys.__stderr__):  # what Python still buffers goes where it was meant to
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(buffer.fileno(), 2)
        try:
            yield kept
        finally:
            for stream in (sys.stderr, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            text = buffer.read(_KEPT_FD_BYTES).decode("utf-8", "replace")
            kept.extend(line for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def fd_output_logged(logger_name: str):
    """:func:`keep_fd_output`, its lines then logged as warnings on ``logger_name`` (a line each):
    :func:`bnkit.formats.quiet.captured` keeps them for ``--verbose``, the logger's own handlers show
    them elsewhere. For what C++ code prints as it loads (TensorFlow's CUDA and CPU notices)."""
    import logging

    output: list[str] = []
    try:
        with keep_fd_output() as output:
            yield
    finally:
        logger = logging.getLogger(logger_name)
        for line in output:
            logger.warning("%s", line)
