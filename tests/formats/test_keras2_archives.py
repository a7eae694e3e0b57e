"""``.keras`` archives written by tf-keras 2.21 (``keras2/make_files.py``: ``model.save("NAME.keras")``)
read as tf-keras computes them.

Each archive is the same model object as ``NAME.h5``, and ``NAME.npz`` holds tf-keras' own outputs on
a fixed input. Tolerance as for the ``.h5`` files (test_keras2_files.py): TensorFlow's and PyTorch's
convolutions sum in different orders; outputs are O(1), measured differences below 2e-7.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from bnkit.io import ModelFileError, load_model

FILES = Path(__file__).parent / "keras2"
ATOL = 2e-5


def _expected(name: str):
    data = np.load(FILES / f"{name}.npz")
    return data["x"], data["y"]


def _weights(path: Path) -> h5py.File:
    with zipfile.ZipFile(path) as archive:
        return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")


def _rewritten(path: Path, out: Path, change) -> Path:
    """A copy of the archive ``path`` whose ``model.weights.h5`` went through ``change(h5file)``."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as weights:
        change(weights)
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out


@pytest.mark.parametrize("name", ["mobile_blocks", "nested_and_scales", "nested_functional"])
def test_a_tf_keras_archive_computes_what_tf_keras_computed(name):
    model = load_model(FILES / f"{name}.keras")
    x, expected = _expected(name)
    got = np.asarray(model(x, training=False).detach().cpu())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def _without_shared_ids(value):
    if isinstance(value, dict):
        return {k: _without_shared_ids(v) for k, v in value.items() if k != "shared_object_id"}
    return [_without_shared_ids(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("name", ["mobile_blocks", "nested_and_scales", "nested_functional", "tf_function"])
def test_the_archive_config_in_legacy_form_is_what_tf_keras_writes_in_an_h5(name):
    """The same model saved both ways by tf-keras: the .keras config, in legacy form, is the .h5's
    model_config (but for the ids the .keras serializer gives objects shared between layers)."""
    from bnkit.formats.keras2_archive import legacy_form

    with zipfile.ZipFile(FILES / f"{name}.keras") as archive:
        config = json.loads(archive.read("config.json"))
    with h5py.File(FILES / f"{name}.h5") as f:
        expected = json.loads(f.attrs["model_config"])
    assert _without_shared_ids(legacy_form(config)) == expected


def test_the_weights_are_the_files_under_the_layers_keras3_names():
    """tf-keras files a layer's weights under its class (layers/batch_normalization_2/vars/3), not its name."""
    from bnkit.keras import keras

    model = load_model(FILES / "mobile_blocks.keras")
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.name for layer in norms] == ["conv1_bn", "block_dw_bn", "block_sep_bn"]  # "/" -> "_"
    with _weights(FILES / "mobile_blocks.keras") as weights:
        groups = ["batch_normalization", "batch_normalization_1", "batch_normalization_2"]
        for group, layer in zip(groups, norms, strict=True):
            values = weights[f"layers/{group}/vars"]
            for i, variable in enumerate([layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance]):
                np.testing.assert_array_equal(np.asarray(variable), values[str(i)][()])
    assert norms[2].momentum == 0.9 and norms[2].epsilon == 1e-5


def test_a_frozen_batch_norm_in_a_nested_functional_block_stays_frozen():
    model = load_model(FILES / "nested_functional.keras")
    frozen = model.get_layer("block").get_layer("bn_frozen")
    assert not frozen.trainable and frozen.epsilon == 1e-5


def test_what_cannot_be_translated_is_refused_by_layer_not_with_keras_registration_advice():
    with pytest.raises(ModelFileError) as caught:
        load_model(FILES / "tf_function.keras")
    message = str(caught.value)
    assert "layer 'tf.math.reduce_max' (TFOpLambda), the TensorFlow function tf.math.reduce_max" in message
    assert "register_keras_serializable" not in message and "\n" not in message


def test_the_training_state_tf_keras_saves_is_not_read(tmp_path):
    """A compiled model's archive holds optimizer/ and metrics/ values: loaded without compiling, as Keras does."""

    def add_training_state(weights):
        weights["optimizer/vars/0"] = np.int64(3)
        weights["metrics/mean/vars/0"] = np.float32(1.5)

    path = _rewritten(FILES / "mobile_blocks.keras", tmp_path / "compiled.keras", add_training_state)
    x, expected = _expected("mobile_blocks")
    got = np.asarray(load_model(path)(x, training=False).detach().cpu())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def _replace(name, value):
    def change(weights):
        del weights[name]
        weights[name] = value

    return change


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            _replace("layers/conv2d/vars/0", np.zeros((3, 3, 3, 4), "float32")),
            ("layer 'conv1_conv' (Conv2D): variable 'kernel' has shape (3, 3, 3, 8)", "(3, 3, 3, 4)"),
        ),
        (lambda w: w.__delitem__("layers/dense/vars/1"), ("layer 'head_fc' (Dense): has 2 variable(s)", "1 value")),
        (
            lambda w: w.create_dataset("layers/re_lu/vars/0", data=np.zeros(8, "float32")),
            ("layer 're_lu' (ReLU): has 0 variable(s), the weights hold 1 value(s) for it (layers/re_lu)",),
        ),
        (
            lambda w: w.create_dataset("layers/dense_7/vars/0", data=np.zeros(8, "float32")),
            ("'layers/dense_7/vars/0'", "which no layer of the config takes"),
        ),
        (
            lambda w: w.__setitem__("layers/dense/vars/2", np.zeros(4, "float32")),
            ("layer 'head_fc' (Dense): has 2 variable(s), the weights hold 3 value(s)",),
        ),
        (
            _replace("layers/dense/vars/1", np.array([b"text"] * 4)),
            ("the value of 'bias' is |S4, not numbers",),
        ),
    ],
    ids=["shape", "missing", "extra", "orphan", "one-too-many", "not-numbers"],
)
def test_weights_that_do_not_fit_are_refused_in_one_line_naming_the_layer(tmp_path, change, fragments):
    path = _rewritten(FILES / "mobile_blocks.keras", tmp_path / "bad.keras", change)
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_the_weights_file_is_checked_as_data_as_for_any_keras_archive(tmp_path):
    """The archive's checks still apply: a link to another file is refused before anything reads it."""

    def link_elsewhere(weights):
        weights["layers/extra"] = h5py.ExternalLink("/etc/passwd", "/data")

    path = _rewritten(FILES / "mobile_blocks.keras", tmp_path / "linked.keras", link_elsewhere)
    with pytest.raises(ModelFileError, match="external link to '/etc/passwd'"):
        load_model(path)


def test_the_variables_its_config_declares_are_charged_before_keras_creates_them(tmp_path):
    with zipfile.ZipFile(FILES / "mobile_blocks.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
    dense["config"]["units"] = 10**9  # a 32 GB kernel in a 10 KB config
    members["config.json"] = json.dumps(config).encode()
    path = tmp_path / "huge.keras"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelFileError, match=r"refused: .*variables .*as its config declares them"):
        load_model(path)


def _main(capsys, *argv) -> subprocess.CompletedProcess:
    from bnkit.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["bnkit", *argv], status, out, err)


def test_every_command_reads_them(tmp_path, capsys):
    archive = FILES / "mobile_blocks.keras"
    summary = _main(capsys, "summary", archive)
    assert summary.returncode == 0 and "572" in summary.stdout and "block_sep_bn" in summary.stdout, summary
    lint = _main(capsys, "lint", archive)
    assert lint.returncode in (0, 1) and not lint.stderr.strip(), lint
    converted = _main(capsys, "convert", archive, tmp_path / "converted.pt2")
    assert converted.returncode == 0, converted
    compare = _main(capsys, "compare", archive, FILES / "mobile_blocks.h5")  # the same model, read two ways
    assert compare.returncode == 0, compare
    folded = _main(capsys, "fold", archive, tmp_path / "folded.keras")
    assert folded.returncode == 0, folded
    x, expected = _expected("mobile_blocks")
    got = np.asarray(load_model(tmp_path / "folded.keras")(x, training=False).detach().cpu())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
