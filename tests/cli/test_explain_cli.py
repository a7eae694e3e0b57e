"""``bnkit explain`` through the real console script."""

from __future__ import annotations

import json

import pytest


def test_default_is_the_seed_example(run_cli):
    proc = run_cli("explain", check=True)
    out = proc.stdout
    assert "BatchNormalization(axis=-1, momentum=0.15)" in out
    assert "momentum=0.85)" in out  # the translated PyTorch momentum
    for text in ("128", "non-trainable", "buffers", "512/511", "bit-equal", "training output",
                 "inference output", "why"):
        assert text in out, text
    assert proc.stderr == ""


def test_json_is_the_data(run_cli):
    proc = run_cli("explain", "--from", "torch", "--channels", "4", "--momentum", "0.2", "--json", check=True)
    data = json.loads(proc.stdout)
    assert data["source"] == "torch"
    given, equivalent, literal = data["settings"]
    assert (given["momentum"], equivalent["framework"], equivalent["momentum"]) == (0.2, "keras", 0.8)
    assert (literal["momentum"], literal["eps"]) == (0.2, 1e-3)
    keras_count, torch_count = data["counts"]
    assert (keras_count["total"], keras_count["non_trainable"], torch_count["total"]) == (16, 8, 8)
    assert {d["quantity"] for d in data["differences"]} == {
        "training output", "running mean", "running variance", "inference output"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--channels", "0"], "--channels must be a positive integer, got 0"),
        (["--momentum", "2"], "--momentum must be in [0, 1], got 2"),
        (["--eps", "-1"], "--eps must be positive"),
        (["--eps", "inf"], "--eps must be positive and finite, got inf"),  # JSON has no Infinity
        (["--no-affine"], "--no-affine is a torch option"),
        (["--from", "torch", "--no-center"], "--no-center is a keras option"),
    ],
)
def test_bad_arguments_give_one_line(run_cli, args, message):
    proc = run_cli("explain", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_tables_keep_every_figure_at_80_columns():
    """Piped output and CI logs are 80 columns wide: no column dropped, no cell cut short with '…'."""
    import io

    from rich.console import Console

    from bnkit.cli.commands.explain import render
    from bnkit.explain import explain

    out = io.StringIO()
    render(explain(source="keras", channels=32, momentum=0.15), Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "…" not in text
    for figure in ("128", "moving_variance: 32", "num_batches_tracked: 1", "65 (buffers)", "torchinfo"):
        assert figure in text, figure
