"""``bnkit summary`` and ``bnkit lint`` through the real console script, on real model files."""

from __future__ import annotations

import json
import math

import pytest

from bnkit.examples import keras_seed_model
from bnkit.io import save_model


@pytest.fixture(scope="module")
def seed_keras(tmp_path_factory):
    """The Keras seed network saved as .keras, with Keras' own counts of it."""
    model = keras_seed_model()
    path = save_model(model, tmp_path_factory.mktemp("models") / "seed.keras")
    counts = {
        "total": model.count_params(),
        "trainable": sum(math.prod(v.shape) for v in model.trainable_weights),
        "non_trainable": sum(math.prod(v.shape) for v in model.non_trainable_weights),
    }
    return path, counts


def test_summary_of_a_keras_file_shows_keras_and_torch_counts(run_cli, seed_keras):
    path, counts = seed_keras
    proc = run_cli("summary", path, check=True)
    assert counts == {"total": 13_108_758, "trainable": 13_108_694, "non_trainable": 64}
    for label, key in (("Total params", "total"), ("Trainable params", "trainable")):
        assert f"{label}" in proc.stdout and f"{counts[key]:,}" in proc.stdout
    assert "Non-trainable params" in proc.stdout and "Buffers (running statistics)" in proc.stdout
    assert "PyTorch tools" in proc.stdout and "print 13,108,694" in proc.stdout


def test_summary_json(run_cli, seed_keras):
    path, counts = seed_keras
    data = json.loads(run_cli("summary", path, "--json", check=True).stdout)
    assert data["keras"] == counts
    assert data["torch"]["params"] == counts["total"] - 64 and data["torch"]["buffers"] == 64
    assert [r["name"] for r in data["rows"]] == ["image", "conv", "bn", "flatten", "dense", "head"]


def test_summary_of_a_torch_factory_with_input_shape(run_cli):
    data = json.loads(
        run_cli("summary", "bnkit.examples:torch_seed_model", "--input-shape", "1,64,64", "--json", check=True).stdout
    )
    assert data["torch"]["params"] == 13_108_694 and data["keras"]["total"] == 13_108_758
    assert data["rows"][2]["type"] == "BatchNorm2d" and data["rows"][2]["output_shape"] == [1, 32, 64, 64]


def test_bad_files_give_one_line_errors(run_cli, tmp_path, seed_keras):
    truncated = tmp_path / "broken.keras"
    truncated.write_bytes(seed_keras[0].read_bytes()[:2000])
    for args in (("summary", truncated), ("lint", tmp_path / "missing.pt2"), ("summary", tmp_path / "notes.txt")):
        if args[1].name == "notes.txt":
            args[1].write_text("hello")
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"bnkit {args[0]}: error: ") and str(args[1]) in lines[0]
        assert "Traceback" not in proc.stderr


def test_lint_exit_status_follows_errors(run_cli, seed_keras):
    # the Keras seed: a warning only (momentum 0.15 gives each new batch 85%) -> exit 0
    proc = run_cli("lint", seed_keras[0], "--json")
    assert proc.returncode == 0, proc.stderr
    assert [f["code"] for f in json.loads(proc.stdout)["findings"]] == ["momentum-literal-port"]
    # a freshly built PyTorch model is in train() mode: an error for inference -> exit 1
    proc = run_cli("lint", "bnkit.examples:torch_seed_model", "--for-inference")
    assert proc.returncode == 1, proc.stderr
    assert "error bn-training-mode" in proc.stdout and "1 error" in proc.stdout


def test_lint_prints_a_repeated_finding_once_per_layer_up_to_three_then_one_line(run_cli, tmp_path):
    import torch
    from torch import nn

    layers = []
    for i in range(6):  # six convolutions with a bias, each feeding a batch norm
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    torch.manual_seed(0)
    save_model(nn.Sequential(*layers).eval(), tmp_path / "net.pt2", input_shape=(3, 8, 8))
    proc = run_cli("lint", "net.pt2")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "conv-bias-before-bn" in line]
    assert len(lines) == 4 and "the same at 3 more layers" in lines[3] and "9, 12, 15" in lines[3]
    assert "6 warnings" in proc.stdout
    data = json.loads(run_cli("lint", "net.pt2", "--json").stdout)
    assert [f["code"] for f in data["findings"]] == ["conv-bias-before-bn"] * 6
