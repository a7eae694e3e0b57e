"""What the frameworks say while a file is read, kept rather than printed.

torch, Keras and h5py warn (Python warnings) and log (the ``logging`` module, absl) while they read
a file, often about the very damage that then stops them; printed, their lines come before bnkit's
one-line error and bury it. :func:`captured` keeps them, in order, for the caller to show (the
command line does with ``--verbose``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from bnkit.text import one_line

__all__ = ["captured"]

_LOGGERS = ("torch", "keras", "absl", "h5py", "tensorflow", "jax")


class _Keep(logging.Handler):
    def __init__(self, kept: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            _keep_once(self.kept, f"{record.levelname.lower()} ({record.name}): {record.getMessage()}")


def _keep_once(kept: list[str], text: str) -> None:
    line = one_line(text, 500)
    if line not in kept:  # a warning repeated for every layer is shown once
        kept.append(line)


@contextlib.contextmanager
def captured():
    """Yield a list that receives, as one line each, every warning and log record of the block."""
    kept: list[str] = []
    handler = _Keep(kept)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers[:] = [handler]
        logger.propagate = False
    root = logging.getLogger()
    root_handlers = root.handlers[:]
    root.handlers[:] = [handler]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original_showwarning = warnings.showwarning

        def keep(message, category, filename, lineno, file=None, line=None):
            _keep_once(kept, f"{category.__name__}: {message}")

        warnings.showwarning = keep
        try:
            yield kept
        finally:
            warnings.showwarning = original_showwarning
            root.handlers[:] = root_handlers
            for logger, handlers, propagate in saved:
                logger.handlers[:] = handlers
                logger.propagate = propagate
