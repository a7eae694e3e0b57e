"""Keras 2 files train one step as tf-keras 2 trains them (bnkit.formats.keras2_fused).

tf-keras 2 runs a ``BatchNormalization`` on a 4-D or 5-D input (channels first or last, float32) with its
fused kernel, which updates the moving variance with the *unbiased* batch variance; unfused (``fused=False``,
a 2-D input, another axis, float64) with the biased one, as Keras 3. The files and tf-keras' own numbers
after one training step (``model(x, training=True)``, which updates the moving statistics in tf-keras 2)
come from ``keras2/make_files.py`` (``TRAINING``) run with tf-keras 2.21 on the file it saved: the expected
numbers are tf-keras', never bnkit's, and no TensorFlow runs here.

Tolerance: float32 throughout, the batch statistics summed in other orders (TensorFlow's fused CPU kernel
and Eigen reductions; bnkit's two-pass mean and variance on PyTorch): outputs and moving statistics agree
within a few units in the last place of the largest value (measured: at most 2.3e-7 of it). What this
guards against is far larger: reading the fused batch norms as Keras 3's left their moving variance off by
5.9e-5 (momentum 0.99, 32 values per channel) to 1.1e-2 (momentum 0.5) of the largest.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from bnkit.conventions import KERAS, TF_KERAS_FUSED
from bnkit.io import load_model

FILES = Path(__file__).parent / "keras2"
TRAINING = ["fused_batch_norm", "unfused_batch_norm", "dense_batch_norm", "fused_axes"]
RELATIVE = 2e-6


def _relative(got, expected) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _outputs(data, key: str) -> list:
    """tf-keras' output ``key``, or its outputs ``key/0``, ``key/1``... (a model with several)."""
    if key in data:
        return [data[key]]
    found = []
    while f"{key}/{len(found)}" in data:
        found.append(data[f"{key}/{len(found)}"])
    return found


def _numpy(outputs) -> list:
    return [np.asarray(t.detach().cpu()) for t in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _batch_norms(model) -> dict:
    from bnkit.keras import keras

    return {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    }


@pytest.mark.parametrize("name", TRAINING)
def test_one_training_step_updates_the_moving_statistics_as_tf_keras_2_does(name):
    data = np.load(FILES / f"{name}.npz")
    model = load_model(FILES / f"{name}.h5")
    norms = _batch_norms(model)
    assert sorted(norms) == sorted(k.split("/")[0] for k in data if k.endswith("/fused"))
    for layer_name, layer in norms.items():  # fused where tf-keras' own layer was
        expected = TF_KERAS_FUSED if bool(data[f"{layer_name}/fused"]) else KERAS
        assert getattr(layer, "convention", KERAS) == expected, layer_name
    x = data["x"]
    for got, expected in zip(_numpy(model(x, training=False)), _outputs(data, "y"), strict=True):
        assert _relative(got, expected) <= RELATIVE
    for got, expected in zip(_numpy(model(x, training=True)), _outputs(data, "y_train"), strict=True):
        assert _relative(got, expected) <= RELATIVE
    for layer_name, layer in norms.items():
        for statistic in ("moving_mean", "moving_variance"):
            got = np.asarray(getattr(layer, statistic))
            assert _relative(got, data[f"{layer_name}/{statistic}"]) <= RELATIVE, (layer_name, statistic)


def test_a_fused_batch_norm_is_bnkits_layer_with_the_files_settings_and_serialises_by_name():
    from bnkit.keras import BatchNormalization, keras

    model = load_model(FILES / "fused_batch_norm.h5")
    bn, bn_2 = model.get_layer("bn"), model.get_layer("bn_2")
    assert type(bn) is BatchNormalization and bn.convention == TF_KERAS_FUSED
    assert (bn.momentum, bn.epsilon, bn_2.momentum, bn_2.epsilon) == (0.9, 1e-3, 0.99, 1e-5)
    assert [w.name for w in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    config = bn.get_config()
    assert config["convention"] == "tf_keras_fused"
    again = keras.layers.deserialize(keras.layers.serialize(bn))
    assert type(again) is BatchNormalization and again.convention == TF_KERAS_FUSED
    # unfused: fused=False written in the file (bnkit's layer in Keras' convention), a 2-D input (Keras' own)
    assert load_model(FILES / "unfused_batch_norm.h5").get_layer("bn").convention == KERAS
    assert type(load_model(FILES / "dense_batch_norm.h5").get_layer("bn")) is keras.layers.BatchNormalization


def test_a_keras_3_h5_file_keeps_keras_3s_batch_norm(tmp_path):
    """Keras 3 writes legacy .h5 files too (keras_version 3.x): its batch norms are never fused."""
    from bnkit.keras import keras

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization(name="bn")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "HDF5 ... is considered legacy"
        model.save(tmp_path / "keras3.h5")
    assert type(load_model(tmp_path / "keras3.h5").get_layer("bn")) is keras.layers.BatchNormalization


def test_the_other_keras_2_readers_fuse_the_same_batch_norms_nested_ones_included():
    """tf-keras' .keras archive and the .h5 of the same model (a batch norm in a nested Functional, a frozen
    one); the SavedModel reader and live tf-keras models build through the same function."""
    for name in ("nested_functional", "mobile_blocks"):
        conventions = [
            {n: getattr(layer, "convention", KERAS).name for n, layer in _batch_norms(load_model(path)).items()}
            for path in (FILES / f"{name}.h5", FILES / f"{name}.keras")
        ]
        assert conventions[0] == conventions[1] and set(conventions[0].values()) == {"tf_keras_fused"}, conventions
    assert len(conventions[0]) == 3


def test_keras_2s_leaky_relu_alpha_is_keras_3s_negative_slope():
    from bnkit.formats.keras2_config import translate

    config = {"class_name": "Sequential", "config": {"layers": [{"class_name": "LeakyReLU", "config": {"alpha": 0.2}}]}}
    assert translate(config)["config"]["layers"][0]["config"] == {"negative_slope": 0.2}


def _main(capsys, *argv) -> subprocess.CompletedProcess:
    from bnkit.cli import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["bnkit", *argv], status, out, err)


def test_bnkit_convert_gives_a_pt2_that_trains_one_step_as_tf_keras_2_and_compare_agrees(tmp_path, capsys):
    import torch

    h5, pt2 = FILES / "fused_batch_norm.h5", tmp_path / "fused_batch_norm.pt2"
    converted = _main(capsys, "convert", h5, pt2)
    assert converted.returncode == 0, converted
    assert converted.stdout.count("(tf_keras_fused)") == 4, converted.stdout  # source and target, 2 layers
    compared = _main(capsys, "compare", h5, pt2, "--training")
    assert compared.returncode == 0 and "The models agree." in compared.stdout, compared
    module = load_model(pt2)
    norms = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert sorted(norms) == ["bn", "bn_2"] and all(m.convention == TF_KERAS_FUSED for m in norms.values())
    data = np.load(FILES / "fused_batch_norm.npz")
    module.train()
    with torch.no_grad():
        y = module(torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous())
    assert _relative(y.permute(0, 2, 3, 1).numpy(), data["y_train"]) <= RELATIVE
    for name, m in norms.items():
        assert _relative(m.running_mean.numpy(), data[f"{name}/moving_mean"]) <= RELATIVE
        assert _relative(m.running_var.numpy(), data[f"{name}/moving_variance"]) <= RELATIVE
