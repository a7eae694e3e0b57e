"""Keras 2 ``.h5`` files (tf-keras 2.21, ``keras2/make_files.py``) read as tf-keras computes them.

Each file holds what Keras 3 cannot read in a Keras 2 config (bnkit.formats.keras2_config); its
``.npz`` holds tf-keras' own outputs on a fixed input. Tolerance: TensorFlow's and PyTorch's
convolutions sum in different orders, so float32 results differ by a few units in the last place of
the largest intermediate values (outputs here are O(1); measured differences are below 2e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from _cli_batch import run_cli_batch
from bnkit.io import ModelFileError, load_model

FILES = Path(__file__).parent / "keras2"
ATOL = 2e-5


def _expected(name: str):
    data = np.load(FILES / f"{name}.npz")
    return data["x"], data["y"]


@pytest.mark.parametrize("name", ["mobile_blocks", "nested_and_scales", "sync_batch_norm"])
def test_a_keras2_file_computes_what_tf_keras_computed(name):
    model = load_model(FILES / f"{name}.h5")
    x, expected = _expected(name)
    got = np.asarray(model(x, training=False).detach().cpu())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_the_batch_norms_hold_the_files_statistics_under_names_keras3_takes():
    from bnkit.keras import keras

    model = load_model(FILES / "mobile_blocks.h5")
    norms = {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert sorted(norms) == ["block_dw_bn", "block_sep_bn", "conv1_bn"]  # "/" -> "_"
    with h5py.File(FILES / "mobile_blocks.h5") as f:
        for old, new in (("conv1/bn", "conv1_bn"), ("block/sep_bn", "block_sep_bn")):
            group = f["model_weights"][old][old]
            np.testing.assert_array_equal(np.asarray(norms[new].moving_variance), group["moving_variance:0"][()])
            np.testing.assert_array_equal(np.asarray(norms[new].moving_mean), group["moving_mean:0"][()])
    assert norms["block_sep_bn"].momentum == 0.9 and norms["block_sep_bn"].epsilon == 1e-5


def test_a_sync_batch_norm_reads_as_a_synchronised_one():
    from bnkit.keras import BatchNormalization

    model = load_model(FILES / "sync_batch_norm.h5")
    layer = model.get_layer("sync_bn")
    assert isinstance(layer, BatchNormalization) and layer.synchronized


@pytest.mark.parametrize(
    "name, fragments",
    [
        ("ghost_batch_norm", ("layer 'ghost_bn' (BatchNormalization)", "virtual_batch_size=2")),
        ("tf_function", ("(TFOpLambda), the TensorFlow function tf.math.reduce_max",)),
    ],
)
def test_what_cannot_be_translated_exactly_is_refused_by_layer(name, fragments):
    with pytest.raises(ModelFileError) as caught:
        load_model(FILES / f"{name}.h5")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_error_line_names_the_layer_and_keras_cause_not_a_config_dump(tmp_path):
    """Keras puts the layer's whole config before its cause: the one line used to end inside it."""
    path = tmp_path / "bogus.h5"
    path.write_bytes((FILES / "sync_batch_norm.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        conv = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
        conv["config"]["bogus_argument"] = 1
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "layer 'conv' (Conv2D): Unrecognized keyword arguments passed to Conv2D: {'bogus_argument': 1}" in message
    assert "kernel_initializer" not in message


def test_every_command_reads_or_refuses_them_in_one_line(tmp_path):
    names = ["mobile_blocks", "nested_and_scales", "ghost_batch_norm", "tf_function"]
    results = run_cli_batch([("summary", FILES / f"{name}.h5") for name in names], tmp_path)
    for name, proc in zip(names, results, strict=True):
        if name in ("ghost_batch_norm", "tf_function"):
            assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, (name, proc.stderr)
        else:
            assert proc.returncode == 0, (name, proc.stderr)
            assert "BatchNormalization" in proc.stdout
