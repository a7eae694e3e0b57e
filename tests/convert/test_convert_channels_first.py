"""Keras models in ``channels_first``, and Keras batch norms over any axis (issue 19, part 3).

A ``channels_first`` layer converts as its ``channels_last`` twin with the tensors' layouts relabelled, so a
channels_first model becomes a PyTorch graph without a single permute, taking and returning Keras' own
(N, C, *spatial) tensors. Checked against the real Keras model (1e-5 relative, float32 in another order of
summation), in inference and in a training forward with its updated running statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import random_array, to_numpy

import bnkit
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers
TOL = 1e-5


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            shape = tuple(layer.moving_mean.shape)
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            layer.beta.assign(rng.uniform(-0.5, 0.5, shape).astype("float32"))
    return model


def _channels_first_net(rank: int = 2):
    """A channels_first CNN with every layer family that has a data_format: strided 'same' conv (explicit
    padding), BN(axis=1), zero padding, depthwise, max pooling, separable conv, upsampling, concat on the
    channels, conv with activation, average and global pooling, Flatten (channels_last: C·H·W order)."""
    keras.utils.set_random_seed(0)
    cf = {"data_format": "channels_first"}
    if rank == 1:
        inp = keras.Input((3, 20))
        x = L.Conv1D(8, 3, padding="same", strides=2, **cf)(inp)
        x = L.BatchNormalization(axis=1)(x)
        x = L.ReLU()(x)
        y = L.MaxPooling1D(2, **cf)(x)
        y = L.UpSampling1D(2)(L.Permute((2, 1))(y))  # UpSampling1D has no data_format: a real permute
        y = L.Permute((2, 1))(y)
        z = L.Concatenate(axis=1)([x, y])
        z = L.Conv1D(4, 1, activation="relu", **cf)(z)
        out = L.Dense(5)(L.Flatten()(L.AveragePooling1D(2, **cf)(z)))
        return _randomize(keras.Model(inp, out))
    inp = keras.Input((3, 20, 20))
    x = L.Conv2D(8, 3, padding="same", strides=2, **cf)(inp)
    x = L.BatchNormalization(axis=1)(x)
    x = L.ReLU()(x)
    x = L.ZeroPadding2D(1, **cf)(x)
    x = L.DepthwiseConv2D(3, **cf)(x)
    x = L.BatchNormalization(axis=1, momentum=0.9)(x)
    y = L.MaxPooling2D(2, **cf)(x)
    y = L.SeparableConv2D(6, 3, padding="same", **cf)(y)
    y = L.UpSampling2D(2, **cf)(y)
    z = L.Concatenate(axis=1)([x, y])
    z = L.Conv2D(4, 1, activation="relu", **cf)(z)
    pooled = L.GlobalAveragePooling2D(**cf)(z)
    flat = L.Flatten()(L.AveragePooling2D(2, **cf)(z))
    out = L.Concatenate()([L.Dense(5)(flat), L.Dense(3)(pooled)])
    return _randomize(keras.Model(inp, out))


def _batch_norms(model):
    return [la for la in model.layers if isinstance(la, L.BatchNormalization)]


def _torch_batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("rank", [1, 2])
def test_channels_first_model_converts_without_a_permute_both_modes(rank):
    model = _channels_first_net(rank)
    converted = keras_to_torch(model)
    permutes = [n for n in converted.graph.nodes if n.target == "permute"]
    assert permutes == []  # rank 1: the model's own Permutes around UpSampling1D only relabel too
    x = random_array((4, *model.inputs[0].shape[1:]))
    for training in (False, True):
        expected = to_numpy(model(x, training=training))
        with torch.no_grad():
            got = converted.train(training)(torch.from_numpy(x)).numpy()
        assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()
    for ours, theirs in zip(_torch_batch_norms(converted), _batch_norms(model), strict=True):
        np.testing.assert_allclose(ours.running_mean.numpy(), to_numpy(theirs.moving_mean), rtol=TOL, atol=1e-7)
        np.testing.assert_allclose(ours.running_var.numpy(), to_numpy(theirs.moving_variance), rtol=TOL, atol=1e-7)


def test_channels_first_model_converts_back_to_a_channels_last_keras_model():
    """Back to Keras, the model is channels-last (bnkit's Keras side is): the same function on NHWC data."""
    model = _channels_first_net()
    converted = keras_to_torch(model)
    back = torch_to_keras(converted, (3, 20, 20))
    x = random_array((2, 3, 20, 20))
    expected = to_numpy(model(x))
    got = to_numpy(back(np.moveaxis(x, 1, -1)))
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()


def test_compare_agrees_on_a_channels_first_model_and_its_conversion():
    model = _channels_first_net()
    converted = keras_to_torch(model)
    x = random_array((2, 3, 20, 20))
    for training in (False, True):
        report = bnkit.compare(model, converted, x, training=training)
        assert report.agree, report
        assert sum(row.kind == "bn" for row in report.rows) == 2


def test_global_channels_first_setting_flatten_included():
    """``keras.config.set_image_data_format("channels_first")``: every layer, Flatten too, is channels_first;
    Flatten(channels_first) flattens H·W·C, which the converted PyTorch model reproduces."""
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        keras.utils.set_random_seed(0)
        inp = keras.Input((3, 8, 8))
        x = L.BatchNormalization(axis=1)(L.Conv2D(4, 3)(inp))
        x = L.MaxPooling2D(2)(L.ReLU()(x))
        model = _randomize(keras.Model(inp, L.Dense(6)(L.Flatten()(x))))
        assert model.layers[-2].data_format == "channels_first"
    finally:
        keras.config.set_image_data_format(previous)
    converted = keras_to_torch(model)
    x = random_array((2, 3, 8, 8))
    expected = to_numpy(model(x))
    with torch.no_grad():
        got = converted(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((6, 5), 1), ((6, 5), -2), ((6, 5), 2), ((4, 5, 3), 1), ((4, 5, 3), 2), ((4, 5, 3), -1), ((2, 3, 4, 5), 2)],
)
def test_keras_batch_norm_over_any_axis(shape, axis):
    """BatchNormalization(axis=1) on (N, L, C) normalises L per position; on (N, H, W, C), H: the axis
    becomes PyTorch's dim 1 (one permute in front, none behind); inference, a training forward and the
    updated statistics agree; converted back, the source's outputs."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape)
    model = _randomize(keras.Model(inp, L.BatchNormalization(axis=axis, momentum=0.8)(inp)))
    converted = keras_to_torch(model)
    x = random_array((8, *shape))
    x_torch = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    (bn,) = _torch_batch_norms(converted)
    assert bn.num_features == shape[axis % (len(shape) + 1) - 1]
    for training in (False, True):
        expected = to_numpy(model(x, training=training))
        with torch.no_grad():
            got = np.moveaxis(converted.train(training)(x_torch).numpy(), 1, -1)
        assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()
    (layer,) = _batch_norms(model)
    np.testing.assert_allclose(bn.running_var.numpy(), to_numpy(layer.moving_variance), rtol=TOL)
    back = torch_to_keras(converted.eval(), tuple(x_torch.shape[1:]))
    np.testing.assert_allclose(to_numpy(back(x)), to_numpy(model(x)), rtol=TOL, atol=TOL)


def test_convert_command_checks_a_channels_first_model_in_its_own_layout(run_cli, tmp_path):
    model = _channels_first_net()
    source = tmp_path / "cf.keras"
    model.save(source)
    result = run_cli("convert", str(source), str(tmp_path / "cf.pt2"))
    assert result.returncode == 0, result.stderr
    assert "verified on a random batch" in result.stdout
    from bnkit.io import load_model

    program = load_model(tmp_path / "cf.pt2")
    x = random_array((3, 3, 20, 20))  # the Keras model's own layout, (N, C, H, W), on a batch of 3
    with torch.no_grad():
        got = program(torch.from_numpy(x)).numpy()
    expected = to_numpy(model(x))
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda cf: L.Conv2D(2, 3, strides=2, padding="same", **cf), (3, 7, 7)),
        (lambda cf: L.DepthwiseConv2D(3, depth_multiplier=2, **cf), (2, 5, 5)),
        (lambda cf: L.Conv2DTranspose(3, 3, strides=2, padding="same", **cf), (4, 6, 6)),
        (lambda cf: L.Conv3D(4, 3, padding="same", **cf), (3, 4, 6, 6)),
        (lambda cf: L.MaxPooling3D(2, **cf), (3, 4, 6, 6)),
        (lambda cf: L.ZeroPadding2D(((1, 0), (2, 1)), **cf), (3, 4, 4)),
        (lambda cf: L.Cropping2D(((1, 0), (0, 1)), **cf), (3, 4, 4)),
        (lambda cf: L.SpatialDropout2D(0.5, **cf), (3, 4, 5)),
        (lambda cf: L.GlobalMaxPooling2D(keepdims=True, **cf), (3, 4, 5)),
        (lambda cf: L.UpSampling2D(2, interpolation="bilinear", **cf), (3, 4, 5)),
    ],
)
def test_each_channels_first_layer_converts_as_its_channels_last_twin(make, shape):
    """What used to be refused by data_format: each layer alone, on (N, C, *spatial), against Keras."""
    inputs = keras.Input(shape)
    model = keras.Model(inputs, make({"data_format": "channels_first"})(inputs))
    converted = keras_to_torch(model)
    x = random_array((2, *shape))
    expected = to_numpy(model(x))
    with torch.no_grad():
        got = converted(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
