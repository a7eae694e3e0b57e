"""The progress display of long commands: shown on a terminal, silent in pipes and with --json."""

from __future__ import annotations

import io
import time

from rich.console import Console

from bnkit.cli.progress import Steps


def _run(console, enabled=True, delay=0.0, pause=0.0):
    with Steps(2, enabled=enabled, console=console, delay=delay) as steps:
        steps.step("loading model.keras")
        time.sleep(pause)
        steps.step("verifying on a random batch")


def test_a_terminal_sees_the_steps():
    out = io.StringIO()
    _run(Console(file=out, force_terminal=True, width=100))
    assert "loading model.keras" in out.getvalue() or "verifying on a random batch" in out.getvalue()


def test_a_quick_command_shows_no_progress_and_a_slow_one_does():
    quick, slow = io.StringIO(), io.StringIO()
    _run(Console(file=quick, force_terminal=True, width=100), delay=5.0)
    assert quick.getvalue() == ""  # done before the delay: nothing but the result would be printed
    _run(Console(file=slow, force_terminal=True, width=100), delay=0.05, pause=0.5)
    assert "loading model.keras" in slow.getvalue() or "verifying on a random batch" in slow.getvalue()


def test_nothing_in_a_pipe_or_with_json():
    for console, enabled in ((Console(file=io.StringIO(), force_terminal=False), True),
                             (Console(file=io.StringIO(), force_terminal=True), False)):  # fmt: skip
        _run(console, enabled)
        assert console.file.getvalue() == ""
