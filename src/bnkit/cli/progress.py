"""The progress display of the commands that may run long (convert, compare, summary, lint, fold,
explain).

A transient ``rich`` progress bar on stderr that names the step under way. It appears only once
a command has run for :data:`DELAY` seconds (a quick command prints its result and nothing else),
and it is off when the command prints ``--json`` or when stderr is not a terminal (pipes, CI
logs, tests), so it never mixes with machine-readable output.
"""

from __future__ import annotations

import threading

__all__ = ["Steps", "DELAY"]

#: Seconds a command runs before its progress display appears.
DELAY = 1.0


class Steps:
    """``with Steps(3, enabled=not args.json) as steps: steps.step("loading…"); ...``"""

    def __init__(self, total: int, *, enabled: bool = True, console=None, delay: float = DELAY) -> None:
        from rich.progress import SpinnerColumn, TextColumn

        from bnkit.progress import progress_bar

        self._progress = progress_bar(
            SpinnerColumn(), TextColumn("{task.description}"), enabled=enabled, console=console
        )
        self._total = total
        self._done = 0
        self._task = None
        self._delay = delay
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._started = False
        self._finished = False

    def _start(self) -> None:
        with self._lock:
            if not self._finished and not self._started:
                self._progress.start()
                self._started = True

    def __enter__(self) -> Steps:
        self._task = self._progress.add_task("", total=self._total)
        if self._delay <= 0:
            self._start()
        else:
            self._timer = threading.Timer(self._delay, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def step(self, description: str) -> None:
        """Start the next step: the steps before it count as done."""
        self._progress.update(self._task, description=description, completed=self._done)
        self._done += 1

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._finished = True
            if self._started:
                self._progress.update(self._task, completed=self._total)
                self._progress.stop()
