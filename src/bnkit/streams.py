"""bnkit's own standard error, apart from what the frameworks write there while a command runs.

torch.fx prints a traceback to ``sys.stderr`` whenever a traced module's code raises (before the
exception reaches bnkit), Keras and absl print notices, and warnings land there too: on the command
line they would bury bnkit's one error line. :func:`keep_framework_output` sends whatever is
written to ``sys.stderr`` inside it to a buffer, for the command line to show with ``--verbose``;
bnkit's own lines (errors, the progress bar) go to :func:`own_stderr`, the stream that was
``sys.stderr`` when the block began.
"""

from __future__ import annotations

import contextlib
import io
import sys

__all__ = ["keep_framework_output", "own_stderr"]

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
