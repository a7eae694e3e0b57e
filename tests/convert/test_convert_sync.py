"""A Keras model with ``synchronized=True`` batch norms converts to ``bnkit.torch.SyncBatchNorm`` and back,
and synchronises across 2 real gloo processes with uneven batches exactly as one process over the whole batch.

Keras 3 refuses ``synchronized=True`` on every backend but TensorFlow, so the saved model here is
written as TensorFlow writes one: a ``.keras`` archive whose batch-norm configs say
``synchronized=True``. ``bnkit.io.load_model`` loads them as ``bnkit.keras.BatchNormalization``.

Tolerances: the converted model runs in float64 on both sides (rtol=atol=1e-9: the ranks' exact
merge of float64 moments against one process's Welford statistics). The Keras model runs in float32;
its single-process batch statistics are Keras' ``E[x^2] - E[x]^2`` while the synchronised ones
are merged two-pass moments, so they agree to float32 rounding of values of order 1 (1e-5).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from _sync_keras_worker import STEPS, keras_steps, make_data, run, torch_steps

from _gloo import spawn_world
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.io import load_model
from bnkit.keras import BatchNormalization, keras

L = keras.layers
SIZES = [5, 3]
TIMEOUT_S = 180
TOL64 = dict(rtol=1e-9, atol=1e-9)
TOL32 = dict(rtol=1e-5, atol=1e-5)


def _save_as_tensorflow_would(model, path):
    """``model.save(path)``, then every BatchNormalization's config says synchronized=True."""
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {item.filename: archive.read(item.filename) for item in archive.infolist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["synchronized"] = True
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _keras_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = L.BatchNormalization(momentum=0.8, name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = L.Conv2D(3, 1, name="conv2")(h)
    h = L.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.2}, renorm_momentum=0.5, name="bn2"
    )(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, L.Dense(2, name="dense")(h))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "synchronized.keras"
    _save_as_tensorflow_would(_keras_model(), path)
    return path


@pytest.fixture(scope="module")
def world(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return spawn_world(run, len(SIZES), out, SIZES, str(saved), timeout_s=TIMEOUT_S)


def test_keras_refuses_the_file_and_bnkit_loads_it(saved):
    with pytest.raises(Exception, match="synchronized=True"):
        keras.models.load_model(saved)
    model = load_model(saved)
    for name in ("bn", "bn2"):
        layer = model.get_layer(name)
        assert isinstance(layer, BatchNormalization) and layer.synchronized and layer.convention.name == "keras"
    assert model.get_layer("bn2").renorm and len(model.get_layer("bn2").weights) == 7


@pytest.mark.parametrize("semantics", ["source", "target"])
def test_synchronized_converts_to_sync_batchnorm_and_back(saved, semantics):
    from bnkit.torch import SyncBatchNorm

    model = load_model(saved)
    torch_model = keras_to_torch(model, semantics=semantics)
    bn, bn2 = torch_model.bn, torch_model.bn2
    assert type(bn) is SyncBatchNorm and type(bn2) is SyncBatchNorm and bn2.renorm
    assert bn.convention.name == ("keras" if semantics == "source" else "torch")
    assert bn.momentum == pytest.approx(0.8 if semantics == "source" else 0.2)
    back = torch_to_keras(torch_model.eval(), (3, 4, 4), semantics=semantics)
    for name in ("bn", "bn2"):
        layer = back.get_layer(name)
        assert layer.synchronized and layer.renorm == (name == "bn2")
        for a, b in zip(model.get_layer(name).weights, layer.weights, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    x = make_data(SIZES)[0]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(back(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5
    )


def test_converted_sync_batchnorm_on_two_ranks_equals_one_process(saved, world):
    x_all, target_all = make_data(SIZES)
    single = torch_steps(keras_to_torch(load_model(saved)).double().train(), x_all, target_all)
    assert world[0]["types"].count("SyncBatchNorm") == 2
    ranks = [r["torch"] for r in world]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in ranks]), single["outputs"][step], **TOL64)
        torch.testing.assert_close(
            torch.cat([r["input_grads"][step] for r in ranks]), single["input_grads"][step], **TOL64
        )
        for name, grad in single["param_grads"][step].items():  # each rank's share; DDP sums them
            torch.testing.assert_close(sum(r["param_grads"][step][name] for r in ranks), grad, **TOL64)
    for key, value in single["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, **TOL64)
    assert int(single["state"]["bn2.num_batches_tracked"]) == STEPS


def test_synchronized_keras_layers_on_two_ranks_equal_one_process(saved, world):
    x_all, target_all = make_data(SIZES)
    single = keras_steps(load_model(saved), x_all, target_all)
    ranks = [r["keras"] for r in world]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in ranks]), single["outputs"][step], **TOL32)
        torch.testing.assert_close(
            torch.cat([r["input_grads"][step] for r in ranks]), single["input_grads"][step], **TOL32
        )
        for i, grad in enumerate(single["weight_grads"][step]):
            torch.testing.assert_close(sum(r["weight_grads"][step][i] for r in ranks), grad, **TOL32)
    for key, value in single["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, **TOL32)


def test_legacy_h5_file_with_synchronized_loads_as_bnkit_layer(tmp_path):
    """A legacy .h5 model (Keras 2 / TensorFlow format: class names only) with synchronized=True."""
    import h5py

    path = tmp_path / "synchronized.h5"
    model = _keras_model()
    model.save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "BatchNormalization":
                layer["config"]["synchronized"] = True
        f.attrs["model_config"] = json.dumps(config)
    before = path.read_bytes()
    loaded = load_model(path)
    assert path.read_bytes() == before  # the user's file is left as it is
    for name in ("bn", "bn2"):
        layer = loaded.get_layer(name)
        assert isinstance(layer, BatchNormalization) and layer.synchronized
        for a, b in zip(model.get_layer(name).weights, layer.weights, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
