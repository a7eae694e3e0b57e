"""The progress display of the commands that may run long (``convert``, ``compare``).

A transient ``rich`` progress bar on stderr that names the step under way. It is off when
the command prints ``--json`` or when stderr is not a terminal (pipes, CI logs, tests), so
it never mixes with machine-readable output.
"""

from __future__ import annotations

__all__ = ["Steps"]


class Steps:
    """``with Steps(3, enabled=not args.json) as steps: steps.step("loading…"); ...``"""

    def __init__(self, total: int, *, enabled: bool = True, console=None) -> None:
        from rich.progress import SpinnerColumn, TextColumn

        from bnkit.progress import progress_bar

        self._progress = progress_bar(
            SpinnerColumn(), TextColumn("{task.description}"), enabled=enabled, console=console
        )
        self._total = total
        self._done = 0
        self._task = None

    def __enter__(self) -> Steps:
        self._progress.start()
        self._task = self._progress.add_task("", total=self._total)
        return self

    def step(self, description: str) -> None:
        """Start the next step: the steps before it count as done."""
        self._progress.update(self._task, description=description, completed=self._done)
        self._done += 1

    def __exit__(self, *exc) -> None:
        self._progress.update(self._task, completed=self._total)
        self._progress.stop()
