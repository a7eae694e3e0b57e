"""The one progress bar bnkit shows: ``rich``, on stderr, transient, and off when stderr is
not a terminal (pipes, CI logs, tests) or the caller turns it off (``--json``, ``progress=False``)."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(*leading_columns, enabled: bool = True, console=None):
    """A ``rich.progress.Progress`` with ``leading_columns`` before the bar, count and time."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from bnkit.streams import own_stderr

    console = console or Console(file=own_stderr())
    return Progress(
        *leading_columns,
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
    )
