"""The README's main command, run as a user runs it (on every Keras backend: test_walkthrough_backends.py)."""

from __future__ import annotations

import json


def test_walkthrough_finds_the_causes_and_the_fix_agrees(run_cli, tmp_path):
    out = tmp_path / "files"
    proc = run_cli("walkthrough", "--out", out, "--batch", "4")
    text = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # both summaries, both accountings
    assert text.count("13,108,758") >= 2 and "13,108,694" in text
    # the hand port's causes, each explained, then the fix
    for code in ("training-mode", "eps", "momentum-convention", "running-variance-estimator"):
        assert code in text
    fix = text.split("6. The fix")[-1]
    assert "The models agree." in fix and "disagree" not in fix
    assert (out / "seed.keras").is_file() and (out / "seed.pt2").is_file()
    # files it wrote are never replaced without --force
    again = run_cli("walkthrough", "--out", out, "--batch", "4")
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    # the walkthrough's own conversion is correct: lint finds no literal momentum in it
    lint = run_cli("lint", out / "seed.pt2", "--json")
    assert lint.returncode == 0 and json.loads(lint.stdout)["findings"] == []
