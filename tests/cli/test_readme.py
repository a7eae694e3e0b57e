"""The README's command-line and Python examples run as written, on the files the walkthrough writes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from _cli_batch import run_cli_batch

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(language: str) -> list[str]:
    section = README.read_text().split("## Whole models", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_whole_models_examples_run_as_written(tmp_path):
    (commands,) = _blocks("bash")
    lines = [shlex.split(line, comments=True) for line in commands.splitlines() if line.strip()]
    assert lines[0][:2] == ["bnkit", "walkthrough"], "the examples start from the walkthrough's files"
    assert all(words[0] == "bnkit" for words in lines)
    # in order, in one subprocess (each through bnkit.cli.main): the imports are most of their time
    for words, proc in zip(lines, run_cli_batch([words[1:] for words in lines], tmp_path), strict=True):
        assert proc.returncode == 0, f"{' '.join(words)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr}"
    assert {"seed.keras", "seed.pt2", "converted.pt2", "report.html", "folded.pt2"} <= {
        p.name for p in tmp_path.iterdir()
    }
    (python,) = _blocks("python")
    proc = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
