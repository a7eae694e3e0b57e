"""Every command that reads a model refuses a crafted file with one line and exit status 2,
and the file's payload never runs (it would write a marker file)."""

from __future__ import annotations

import pytest

from _cli_batch import run_cli_batch
from _crafted_pt2 import INPUT_SHAPE, Payload, small_pt2, with_pickled_sample_inputs, with_pickled_weight


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_pt2(tmp_path_factory.mktemp("trusted"))


def _commands(crafted, good, out):
    shape = ",".join(map(str, INPUT_SHAPE))
    return {
        "summary": ("summary", crafted),
        "lint": ("lint", crafted),
        "convert": ("convert", crafted, out / "converted.keras"),
        "compare": ("compare", good, crafted, "--input-shape", shape),
        "compare-a": ("compare", crafted, good, "--input-shape", shape),
        "fold": ("fold", crafted, out / "folded.pt2"),
    }


def _assert_refused(proc, command: str, marker, part: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"bnkit {command}: error: ") and "refused, bnkit runs nothing" in lines[0]
    assert part in lines[0]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize(
    ("craft", "part"),
    [
        (with_pickled_sample_inputs, "sample inputs (data/sample_inputs/model.pt)"),
        (with_pickled_weight, "is stored as a pickle (use_pickle: true)"),
    ],
    ids=["sample-inputs", "use-pickle-weight"],
)
def test_every_command_refuses_a_crafted_pt2(run_cli, small, tmp_path, craft, part):
    marker = tmp_path / "marker"
    crafted = craft(small, tmp_path / "crafted.pt2", marker)
    commands = _commands(crafted, small, tmp_path)
    # the console script itself once, then every command through bnkit.cli.main in one subprocess
    _assert_refused(run_cli("summary", crafted), "summary", marker, part)
    for proc, args in zip(run_cli_batch(list(commands.values()), tmp_path), commands.values(), strict=True):
        _assert_refused(proc, args[0], marker, part)
    assert not (tmp_path / "converted.keras").exists() and not (tmp_path / "folded.pt2").exists()


def test_a_keras_lambda_is_refused_by_safe_mode(run_cli, tmp_path):
    from bnkit.keras import keras

    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('the payload ran')"
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x + len(str(exec(code))) * 0)(inputs)  # noqa: S102 - the attack
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    marker.unlink(missing_ok=True)  # building the model traced the lambda once
    proc = run_cli("summary", path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "not a readable Keras model" in proc.stderr and "safe_mode" in proc.stderr
    assert not marker.exists()


def test_a_pickled_pt_weights_file_is_refused(run_cli, tmp_path):
    import torch

    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pt"
    torch.save({"0.weight": Payload(marker)}, weights)
    proc = run_cli("summary", "bnkit.examples:torch_seed_model", "--weights", weights, "--input-shape", "1,64,64")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "refused by torch.load(weights_only=True)" in proc.stderr
    assert not marker.exists()
