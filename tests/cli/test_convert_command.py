"""``bnkit convert`` run as the real console script on real model files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnkit.io import load_model
from bnkit.keras import keras

L = keras.layers


@pytest.fixture
def keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv")(inputs)
    x = L.BatchNormalization(momentum=0.9, name="bn")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name="small")
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-1, 1, 4).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2, 4).astype("float32"))
    path = tmp_path / "small.keras"
    model.save(path)
    return model, path


def test_keras_to_pt2_and_back(run_cli, tmp_path, keras_file):
    model, path = keras_file
    proc = run_cli("convert", path, "small.pt2", "--json", check=True)
    report = json.loads(proc.stdout)
    assert (report["from"], report["to"], report["input_shape_torch"]) == ("keras", "torch", [3, 8, 8])
    assert report["keras_backend"] == "torch"  # the run_cli fixture's KERAS_BACKEND
    assert report["max_abs_difference"] <= 1e-5
    assert report["relative_difference"] == report["max_abs_difference"] / report["max_abs_output"] <= 1e-5
    (bn,) = report["batch_norms"]
    assert bn["target"] == {"name": "bn", "type": "BatchNorm2d", "convention": "keras", "momentum": 0.9, "eps": 1e-3}

    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    program = load_model(tmp_path / "small.pt2")
    with torch.no_grad():
        got = program(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    (tmp_path / "back.keras").write_bytes(b"old")  # replaced only because of --force
    proc = run_cli("convert", "small.pt2", "back.keras", "--semantics", "target", "--force", check=True)
    assert "verified" in proc.stdout and "BatchNorm2d" in proc.stdout
    back = load_model(tmp_path / "back.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back(x)), expected, rtol=1e-5, atol=1e-5)
    assert type(back.get_layer("bn")) is keras.layers.BatchNormalization
    assert back.get_layer("bn").momentum == pytest.approx(0.9)  # keras convention -> Keras' own layer


def test_existing_output_needs_force(run_cli, tmp_path, keras_file):
    _, path = keras_file
    out = tmp_path / "taken.pt2"
    out.write_bytes(b"precious")
    proc = run_cli("convert", path, out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bnkit convert: error: {out}: already exists; pass --force to replace it"
    ]
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.keras", "taken.pt2"]  # no temporary files


def test_unsupported_layer_and_bad_output_suffix(run_cli, tmp_path):
    inputs = keras.Input((5, 4, 2))
    keras.Model(inputs, L.ConvLSTM1D(3, 3, name="rnn")(inputs)).save(tmp_path / "rnn.keras")
    proc = run_cli("convert", "rnn.keras", "rnn.pt2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "bnkit convert: error: cannot convert layer 'rnn' (ConvLSTM1D): " + (
        "this layer type is not supported by bnkit.convert"
    )
    assert not (tmp_path / "rnn.pt2").exists()
    proc = run_cli("convert", "rnn.keras", "rnn.tflite")
    assert proc.returncode == 2 and "unknown output format '.tflite'" in proc.stderr


def test_a_frozen_keras_batch_norm_converts_without_a_warning(run_cli, tmp_path):
    """It used to warn (one line) that model.train() would unfreeze the converted nn.BatchNorm; it becomes
    bnkit's FrozenBatchNorm1d now, frozen in train() as Keras' is in fit()."""
    inputs = keras.Input((4,))
    bn = L.BatchNormalization(name="frozen_bn")
    model = keras.Model(inputs, L.Dense(2)(bn(inputs)))
    bn.trainable = False
    model.save(tmp_path / "frozen.keras")
    proc = run_cli("convert", "frozen.keras", "frozen.pt", "--json", check=True)
    assert "warning" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["to"] == "torch"
    assert [row["target"]["type"] for row in report["batch_norms"]] == ["FrozenBatchNorm1d"], report["batch_norms"]


def test_the_verification_is_relative_to_the_outputs(keras_file):
    """A network whose outputs are ~1e-12 (torchvision's efficientnet_b1 at its initialisation gives
    3e-13) passed any absolute bar: a conversion off by 10% of every output must still fail."""
    from bnkit.cli.commands.convert import _PARITY_TOLERANCE, _max_difference, _relative
    from bnkit.convert import keras_to_torch

    model, _ = keras_file
    head = model.get_layer("head")
    head.kernel.assign(head.kernel * 1e-12)
    head.bias.assign(head.bias * 1e-12)
    converted = keras_to_torch(model)
    difference, largest = _max_difference(model, converted, "keras", (3, 8, 8))
    assert 0 < largest < 1e-10 and _relative(difference, largest) <= 1e-5
    with torch.no_grad():
        converted.head.weight.mul_(1.1)
        converted.head.bias.mul_(1.1)
    difference, largest = _max_difference(model, converted, "keras", (3, 8, 8))
    assert difference < 1e-11  # nothing an absolute tolerance would see
    assert _relative(difference, largest) > 100 * _PARITY_TOLERANCE
