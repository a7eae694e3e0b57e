"""The rich progress bar shared by recalibration on either framework."""

from __future__ import annotations


def progress_bar(enabled: bool):
    """A transient ``rich`` progress bar on stderr, disabled off a terminal or when not ``enabled``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("recalibrating batch norm"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
    )


def batch_total(batches, num_batches: int | None) -> int | None:
    if hasattr(batches, "__len__"):
        return len(batches) if num_batches is None else min(num_batches, len(batches))
    return num_batches
