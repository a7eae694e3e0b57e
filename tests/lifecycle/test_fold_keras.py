"""bnkit.fold_bn on Keras 3 models (torch backend): folded models equal the originals in inference.

Tolerance 1e-5 relative and absolute (float32): folding reassociates the per-channel affine
into the kernel, a few roundings per output on values of order 1-10.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnkit
from bnkit.keras import keras

L = keras.layers


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            values = {"gamma": rng.uniform(0.5, 2.0), "beta": rng.normal, "moving_mean": rng.normal,
                      "moving_variance": rng.uniform(0.1, 2.0)}
            for variable in layer.weights:
                name = variable.path.rsplit("/", 1)[-1]
                make = values[name]
                shape = tuple(variable.shape)
                data = make(size=shape) if callable(make) else rng.uniform(0.5, 2.0, size=shape)
                variable.assign(data.astype("float32"))
    return model


def _layers(model, cls):
    return [m for m in model._flatten_layers(include_self=False, recursive=True) if isinstance(m, cls)]


def _assert_same(model, folded, x):
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    actual = keras.ops.convert_to_numpy(folded(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _functional_resnet_like():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(6, 1)(x)
    y = L.BatchNormalization(center=False, epsilon=1e-5)(y)
    x = L.Add()([x, y])
    x = L.BatchNormalization(name="after_add")(x)  # not after a conv: a ChannelAffine
    x = L.Conv1D(4, 2)(L.Reshape((64, 6))(x))
    x = L.BatchNormalization(scale=False)(x)
    x = L.Dense(5)(L.Flatten()(x))
    outputs = L.BatchNormalization(momentum=0.5)(x)
    return keras.Model(inputs, outputs)


def test_functional_model_folds_into_conv_and_dense():
    model = _randomize(_functional_resnet_like())
    before = [w.copy() for w in model.get_weights()]
    folded = bnkit.fold_bn(model)
    assert folded is not model
    assert not _layers(folded, L.BatchNormalization)
    assert len(_layers(folded, L.Identity)) == 4
    assert [m.name for m in _layers(folded, bnkit.lifecycle.keras_layers.ChannelAffine)] == ["after_add"]
    _assert_same(model, folded, np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype("float32"))
    for old, new in zip(before, model.get_weights(), strict=True):  # the original is untouched
        np.testing.assert_array_equal(old, new)


def test_seed_model_batchnorm_after_relu_becomes_affine_and_saves(tmp_path):
    from bnkit.examples.seed import keras_seed_model

    model = _randomize(keras_seed_model())
    folded = bnkit.fold_bn(model)
    assert len(_layers(folded, bnkit.lifecycle.keras_layers.ChannelAffine)) == 1  # conv has relu
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 1)).astype("float32")
    _assert_same(model, folded, x)
    folded.save(tmp_path / "folded.keras")
    _assert_same(model, keras.models.load_model(tmp_path / "folded.keras"), x)


def test_sequential_model():
    keras.utils.set_random_seed(3)
    model = _randomize(keras.Sequential([keras.Input((10,)), L.Dense(8, use_bias=False), L.BatchNormalization(),
                                         L.ReLU(), L.Dense(4), L.BatchNormalization()]))
    folded = bnkit.fold_bn(model)
    assert not _layers(folded, L.BatchNormalization)
    assert len(_layers(folded, L.Identity)) == 2  # both follow a linear Dense: folded, not affine
    assert not _layers(folded, bnkit.lifecycle.keras_layers.ChannelAffine)
    _assert_same(model, folded, np.random.default_rng(3).normal(size=(5, 10)).astype("float32"))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv_transpose_folds(data_format):
    keras.utils.set_random_seed(4)
    shape, axis = ((5, 5, 3), -1) if data_format == "channels_last" else ((3, 5, 5), 1)
    model = _randomize(keras.Sequential([
        keras.Input(shape), L.Conv2DTranspose(4, 3, strides=2, data_format=data_format),
        L.BatchNormalization(axis=axis), L.ReLU(),
    ]))
    folded = bnkit.fold_bn(model)
    assert len(_layers(folded, L.Identity)) == 1 and not _layers(folded, bnkit.lifecycle.keras_layers.ChannelAffine)
    _assert_same(model, folded, np.random.default_rng(4).normal(size=(2, *shape)).astype("float32"))


def test_conv1d_transpose_without_bias_folds_in_a_functional_model():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((7, 3))
    outputs = L.BatchNormalization(center=False)(L.Conv1DTranspose(6, 2, use_bias=False)(inputs))
    model = _randomize(keras.Model(inputs, outputs))
    folded = bnkit.fold_bn(model)
    assert len(_layers(folded, L.Identity)) == 1
    _assert_same(model, folded, np.random.default_rng(5).normal(size=(3, 7, 3)).astype("float32"))


def test_loaded_sequential_folds(tmp_path):
    # loading rebuilds a Sequential's graph: its layers keep stale inbound nodes of earlier builds
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((5, 5, 3)), L.Conv2DTranspose(4, 3), L.BatchNormalization(),
                              L.Conv2D(2, 1, use_bias=False), L.BatchNormalization(center=False)])
    _randomize(model).save(tmp_path / "seq.keras")
    loaded = keras.models.load_model(tmp_path / "seq.keras")
    folded = bnkit.fold_bn(loaded)
    assert len(_layers(folded, L.Identity)) == 2
    _assert_same(model, folded, np.random.default_rng(6).normal(size=(2, 5, 5, 3)).astype("float32"))


@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16"])
def test_half_precision_affine_rounds_once_like_batchnorm(policy):
    # BatchNormalization computes half inputs in float32 with weights never autocast to half
    half = "bfloat16" if "bfloat16" in policy else "float16"
    inputs = keras.Input((5, 5, 8))
    model = _randomize(keras.Model(inputs, L.BatchNormalization(dtype=policy)(L.ReLU(dtype=policy)(inputs))))
    x = np.random.default_rng(7).normal(size=(4, 5, 5, 8)).astype("float32") * 3
    folded = bnkit.fold_bn(model)
    assert len(_layers(folded, bnkit.lifecycle.keras_layers.ChannelAffine)) == 1

    def as_float(tensor):
        return keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32")).astype(np.float64)

    bn = model.layers[-1]
    mean, var, gamma, beta = (as_float(v) for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta))
    exact = (as_float(keras.ops.relu(keras.ops.cast(x, half))) - mean) / np.sqrt(var + bn.epsilon) * gamma + beta
    bound = np.abs(exact) * float(np.finfo(np.float16).eps if half == "float16" else 2.0**-7) / 2 * 1.001 + 1e-6
    for outputs in (model(x), folded(x)):  # the real layer meets the bound, and so must the fold
        assert keras.backend.standardize_dtype(outputs.dtype) == half
        assert np.all(np.abs(as_float(outputs) - exact) <= bound)


def test_unbuilt_model_is_an_error():
    with pytest.raises(ValueError, match="is not built"):
        bnkit.fold_bn(keras.Sequential([L.Dense(3), L.BatchNormalization()]))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense, self.bn = L.Dense(3), L.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_subclassed_model_is_a_clear_error():
    model = _Subclassed()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="folds Keras functional and Sequential models; 'subclassed' is a subclassed"):
        bnkit.fold_bn(model)


def test_operations_on_keras_tensors_are_cloned_too():
    """``x + y`` and ``x * 0.5`` in a functional model are Keras operations, not layers (no build config,
    no weights): fold_bn crashed on them (keras.applications ConvNeXt, MobileNetV3: 'Add' object has no
    attribute 'get_build_config'). Also a real network: MobileNetV3Small, whose hard-swish is such an
    operation."""
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(inputs))
    y = L.BatchNormalization()(L.Conv2D(6, 1)(x))
    outputs = (x + y) * 0.5
    model = _randomize(keras.Model(inputs, outputs))
    folded = bnkit.fold_bn(model)
    assert not _layers(folded, L.BatchNormalization)
    _assert_same(model, folded, np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32"))

    network = _randomize(keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, alpha=0.75))
    folded, decisions = bnkit.fold_bn(network, report=True)
    assert {d.outcome for d in decisions} <= {"folded", "affine"}
    assert sum(d.outcome == "folded" for d in decisions) > 0
    _assert_same(network, folded, np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32"))
