"""The two errors of reading a ``.pt2`` archive, shared by the modules that check its parts."""

from __future__ import annotations

__all__ = ["ArchiveError", "UnsafeArchiveError"]


class ArchiveError(ValueError):
    """An archive that is not a readable ``torch.export`` program."""


class UnsafeArchiveError(ArchiveError):
    """An archive with a part that would run code (a pickle, a callable, a Python expression)."""
