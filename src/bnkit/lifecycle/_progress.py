"""The rich progress bar shared by recalibration on either framework."""

from __future__ import annotations


def progress_bar(enabled: bool):
    """A transient ``rich`` progress bar on stderr, disabled off a terminal or when not ``enabled``."""
    from rich.progress import TextColumn

    from bnkit.progress import progress_bar as bar

    return bar(TextColumn("recalibrating batch norm"), enabled=enabled)


def batch_total(batches, num_batches: int | None) -> int | None:
    if hasattr(batches, "__len__"):
        return len(batches) if num_batches is None else min(num_batches, len(batches))
    return num_batches
