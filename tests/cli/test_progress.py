"""The progress display of long commands: shown on a terminal, silent in pipes and with --json."""

from __future__ import annotations

import io

from rich.console import Console

from bnkit.cli.progress import Steps


def _run(console, enabled=True):
    with Steps(2, enabled=enabled, console=console) as steps:
        steps.step("loading model.keras")
        steps.step("verifying on a random batch")


def test_a_terminal_sees_the_steps():
    out = io.StringIO()
    _run(Console(file=out, force_terminal=True, width=100))
    assert "loading model.keras" in out.getvalue() or "verifying on a random batch" in out.getvalue()


def test_nothing_in_a_pipe_or_with_json():
    for console, enabled in ((Console(file=io.StringIO(), force_terminal=False), True),
                             (Console(file=io.StringIO(), force_terminal=True), False)):  # fmt: skip
        _run(console, enabled)
        assert console.file.getvalue() == ""
