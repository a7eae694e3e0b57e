"""bnkit.keras.BatchNormalization against the real Keras and PyTorch layers.

Tolerances: float32 throughout. Outputs and gradients agree within 1e-5 (the frameworks sum in
different orders: a few ulp per reduction, amplified by 1/std); running statistics within
1e-6 relative (a handful of ulp).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import torch
from _autodiff import training_call

from bnkit.conventions import TORCH, with_overrides
from bnkit.keras import BatchNormalization, keras

RTOL_STATS = 1e-6
TOL_OUT = 1e-5


def _batches(shape, steps, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return [(loc + scale * rng.standard_normal(shape)).astype("float32") for _ in range(steps)]


def _np(v):
    if isinstance(v, keras.Variable):
        v = v.value
    return keras.ops.convert_to_numpy(v)


def test_weights_have_keras_names_and_order():
    ours = BatchNormalization(convention="torch")
    ours.build((None, 4, 4, 3))
    theirs = keras.layers.BatchNormalization()
    theirs.build((None, 4, 4, 3))
    assert [w.name for w in theirs.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.name for w in ours.weights][:4] == [w.name for w in theirs.weights]
    assert [w.name for w in ours.weights][4:] == ["num_batches_tracked"]
    assert isinstance(ours, keras.layers.BatchNormalization)
    keras_conv = BatchNormalization()
    keras_conv.build((None, 3))
    assert [w.name for w in keras_conv.weights] == [w.name for w in theirs.weights]
    assert keras_conv.epsilon == 1e-3 and keras_conv.momentum == 0.99
    assert ours.epsilon == 1e-5 and ours.momentum == 0.1


@pytest.mark.parametrize("momentum", [0.99, 0.5])
def test_keras_convention_matches_keras(momentum):
    ours = BatchNormalization(momentum=momentum, epsilon=1e-3)
    theirs = keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-3)
    for x in _batches((6, 3, 3, 4), 4):
        np.testing.assert_allclose(_np(ours(x, training=True)), _np(theirs(x, training=True)), rtol=0, atol=0)
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=RTOL_STATS)
    x = _batches((5, 3, 3, 4), 1, seed=1)[0]
    np.testing.assert_array_equal(_np(ours(x)), _np(theirs(x)))
    # trainable=False runs in inference mode, in both
    ours.trainable = theirs.trainable = False
    before = _np(ours.moving_mean)
    np.testing.assert_array_equal(_np(ours(x, training=True)), _np(theirs(x, training=True)))
    np.testing.assert_array_equal(_np(ours.moving_mean), before)


def _torch_step(layer, x_nchw):
    x = torch.tensor(x_nchw, requires_grad=True)
    y = layer(x)
    weight = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    (y * weight).sum().backward()
    return y.detach().numpy(), x.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy()


def _keras_step(layer, x_nhwc, weight_nchw_shape):
    weight = np.linspace(-1.0, 1.0, int(np.prod(weight_nchw_shape)), dtype="float32").reshape(weight_nchw_shape)
    weight = np.transpose(weight, (0, *range(2, weight.ndim), 1))  # the same weight per element, NHWC
    return training_call(layer, x_nhwc, weight)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("rank", [2, 4])
def test_torch_convention_matches_torch(momentum, rank):
    torch.manual_seed(0)
    nchw = (8, 3) if rank == 2 else (4, 3, 5, 5)
    to_nhwc = (0, *range(2, rank), 1)
    reference = (torch.nn.BatchNorm1d if rank == 2 else torch.nn.BatchNorm2d)(3, momentum=momentum)
    ours = BatchNormalization(momentum=momentum, convention="torch")
    ours.build((None, *(nchw[i] for i in to_nhwc[1:])))
    gamma0, beta0 = [1.5, 0.5, -1.0], [0.1, -0.2, 0.3]
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(gamma0))
        reference.bias.copy_(torch.tensor(beta0))
    ours.gamma.assign(np.array(gamma0, "float32"))
    ours.beta.assign(np.array(beta0, "float32"))
    for step, x in enumerate(_batches(nchw, 4, seed=rank)):
        expected = _torch_step(reference, x)
        got = _keras_step(ours, np.transpose(x, to_nhwc), nchw)
        np.testing.assert_allclose(got[0], np.transpose(expected[0], to_nhwc), rtol=TOL_OUT, atol=TOL_OUT)
        np.testing.assert_allclose(got[1], np.transpose(expected[1], to_nhwc), rtol=TOL_OUT, atol=TOL_OUT)
        np.testing.assert_allclose(got[2], expected[2], rtol=TOL_OUT, atol=TOL_OUT)
        np.testing.assert_allclose(got[3], expected[3], rtol=TOL_OUT, atol=TOL_OUT)
        np.testing.assert_allclose(_np(ours.moving_mean), reference.running_mean, rtol=RTOL_STATS, atol=1e-7)
        np.testing.assert_allclose(_np(ours.moving_variance), reference.running_var, rtol=RTOL_STATS)
        assert int(_np(ours.num_batches_tracked)) == int(reference.num_batches_tracked) == step + 1
        # a plain SGD step on both sides, so later steps start from trained affine parameters
        with torch.no_grad():
            reference.weight -= 0.1 * reference.weight.grad
            reference.bias -= 0.1 * reference.bias.grad
            reference.weight.grad = reference.bias.grad = None
        ours.gamma.assign(reference.weight.detach().numpy())
        ours.beta.assign(reference.bias.detach().numpy())
    reference.eval()
    x = _batches(nchw, 1, seed=9)[0]
    with torch.no_grad():
        expected = reference(torch.tensor(x)).numpy()
    got = _np(ours(np.transpose(x, to_nhwc)))
    np.testing.assert_allclose(got, np.transpose(expected, to_nhwc), rtol=TOL_OUT, atol=TOL_OUT)


def test_torch_convention_half_input_two_pass_statistics():
    # a large mean with a small spread: E[x^2] - E[x]^2 loses it in float32, two passes keep it
    rng = np.random.default_rng(0)
    x = (300.0 + rng.standard_normal((16, 2, 2, 2))).astype("float16")
    layer = BatchNormalization(momentum=1.0, convention="torch", dtype="mixed_float16")
    y = layer(keras.ops.convert_to_tensor(x), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert keras.backend.standardize_dtype(layer.moving_variance.dtype) == "float32"
    exact = x.astype("float64").reshape(-1, 2).var(axis=0, ddof=1)
    np.testing.assert_allclose(_np(layer.moving_variance), exact, rtol=1e-5)


def test_custom_convention_and_get_config_round_trip():
    custom = with_overrides(TORCH, name="custom", running_var_estimator="biased")
    for layer in (
        BatchNormalization(convention="torch", momentum=None, center=False, name="a"),
        BatchNormalization(convention=custom, epsilon=1e-4, axis=1),
        BatchNormalization(momentum=0.9, scale=False),
    ):
        config = layer.get_config()
        json.dumps(config)
        clone = BatchNormalization.from_config(config)
        assert clone.get_config() == config
        assert clone.convention == layer.convention
    x = _batches((8, 2), 1)[0]
    layer = BatchNormalization(convention=custom, momentum=0.5)
    layer(x, training=True)
    expected = 0.5 + 0.5 * x.astype("float64").var(axis=0)  # biased, weighs the new value 0.5
    np.testing.assert_allclose(_np(layer.moving_variance), expected, rtol=RTOL_STATS)


def test_save_and_load_keras_file(tmp_path):
    inputs = keras.Input((4, 4, 3))
    outputs = BatchNormalization(convention="torch", momentum=None, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    for x in _batches((2, 4, 4, 3), 2):
        model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bn = loaded.get_layer("bn")
    assert type(bn) is BatchNormalization and bn.momentum is None and bn.convention == TORCH
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    x = _batches((2, 4, 4, 3), 1, seed=5)[0]
    np.testing.assert_array_equal(_np(model(x)), _np(loaded(x)))
    np.testing.assert_array_equal(_np(model(x, training=True)), _np(loaded(x, training=True)))
    np.testing.assert_array_equal(_np(model.weights[4]), _np(loaded.weights[4]))


@pytest.mark.parametrize(
    ("kwargs", "error", "quoted"),
    [
        ({"convention": "tf"}, ValueError, "'tf'"),
        ({"momentum": None}, ValueError, "momentum=None"),
        ({"momentum": "fast"}, ValueError, "'fast'"),
        ({"momentum": [0.9]}, TypeError, "[0.9]"),
        ({"epsilon": "tiny"}, ValueError, "'tiny'"),
        ({"axis": "channels"}, ValueError, "'channels'"),
        ({"renorm": True, "renorm_clipping": {"rmaxx": 2}}, ValueError, "'rmaxx'"),
        ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2}}, ValueError, "rmax=0.5"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError, "dmax=-1"),
        # Keras builds it and fails in the first training step; bnkit says so at once
        ({"renorm": True, "renorm_momentum": None, "convention": "keras"}, ValueError, "renorm_momentum=None"),
        ({"renorm": True, "renorm_momentum": "slow", "convention": "torch"}, TypeError, "'slow'"),
    ],
)
def test_constructor_errors_quote_the_bad_value(kwargs, error, quoted):
    with pytest.raises(error, match=quoted.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        BatchNormalization(**kwargs)
    if "convention" not in kwargs and kwargs.get("momentum", 0) is not None:
        with pytest.raises(error):  # Keras refuses them with the same type
            keras.layers.BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1e-4},
        {"momentum": 1.5},
        {"momentum": -0.1},
        {"momentum": 1},
        {"momentum": "0.9", "epsilon": "1e-3"},
        {"momentum": np.float32(0.9)},
        {"center": "yes", "scale": 0},
        {"axis": np.int64(1)},
        {"axis": True},
    ],
    ids=repr,
)
def test_keras_convention_takes_what_keras_takes_with_keras_result(kwargs):
    """Keras reads momentum and epsilon with float(), axis with int(), and checks nothing else."""
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    for x in [*_batches((4, 3, 3), 2, seed=3), np.full((1, 3, 3), 2.0, "float32")]:  # the last: constant
        for training in (True, False):
            np.testing.assert_array_equal(_np(ours(x, training=training)), _np(theirs(x, training=training)))
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert ours.get_config()["momentum"] == theirs.get_config()["momentum"]


def test_one_value_per_channel_in_training_keras_convention_gives_beta():
    ours = BatchNormalization(beta_initializer="ones")
    x = np.array([[3.0, -7.0, 1e4]], "float32")
    np.testing.assert_array_equal(_np(ours(x, training=True)), np.ones((1, 3), "float32"))


def test_torch_convention_takes_what_torch_takes_and_fails_where_torch_fails():
    """eps=0 and a momentum outside [0, 1] build; eps=0 is refused in training, after counting."""
    layer = BatchNormalization(epsilon=0.0, momentum=1.5, convention="torch", name="bn0")
    x = _batches((4, 3), 1, seed=4)[0]
    layer(x)  # inference: fine, as torch.nn in eval()
    with pytest.raises(ValueError, match="bn0: epsilon must be positive when training"):
        layer(x, training=True)
    assert int(_np(layer.num_batches_tracked)) == 1
    with pytest.raises(ValueError, match="epsilon must be non-negative"):
        BatchNormalization(epsilon=-1.0, convention="torch")(x)


def test_call_errors():
    layer = BatchNormalization(convention="torch", name="bn1")
    with pytest.raises(ValueError, match="bn1: expected more than 1 value per channel"):
        layer(np.ones((1, 3), "float32"), training=True)
    layer(np.ones((1, 3), "float32"))  # inference on one sample is fine
    with pytest.raises(ValueError, match="masks are not supported"):
        layer.call(np.ones((2, 5, 3), "float32"), mask=np.ones((2, 5), bool))


def test_backend_choice(monkeypatch, tmp_path):
    from bnkit.keras import _choose_backend

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    _choose_backend()  # no keras.json: torch
    assert os.environ["KERAS_BACKEND"] == "torch"

    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "numpy"}))
    _choose_backend()  # keras.json chose an installed backend: left to Keras
    assert "KERAS_BACKEND" not in os.environ

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "no_such_backend_pkg"}))
    with pytest.warns(RuntimeWarning, match="no_such_backend_pkg"):
        _choose_backend()
    assert os.environ["KERAS_BACKEND"] == "torch"

    # the file Keras writes into a fresh home (it names "tensorflow") is no choice: torch, silently
    from bnkit.keras import KERAS_WRITTEN_CONFIG

    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text(json.dumps(KERAS_WRITTEN_CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _choose_backend()
    assert os.environ["KERAS_BACKEND"] == "torch"

    # one the user edited (floatx) names tensorflow by choice: left to Keras where TensorFlow is
    # installed; where it is not, torch, silently (Keras' own default, no real choice)
    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "tensorflow", "floatx": "float64"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _choose_backend()
    if importlib.util.find_spec("tensorflow") is None:
        assert os.environ["KERAS_BACKEND"] == "torch"
    else:
        assert "KERAS_BACKEND" not in os.environ
    monkeypatch.delenv("KERAS_BACKEND", raising=False)

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    _choose_backend()  # an explicit choice always wins
    assert os.environ["KERAS_BACKEND"] == "jax"


def test_adopt_makes_a_built_keras_layer_bnkits_in_place_training_as_pytorch_with_one_minus_momentum():
    """bnkit.keras.batchnorm.adopt (how a tf-keras 2 fused batch norm is read: bnkit.formats.keras2_fused):
    the same object and variables, then the convention's update: tf_keras_fused is torch.nn's with 1 - m."""
    from bnkit.keras.batchnorm import adopt

    layer = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-4)
    model = keras.Sequential([keras.Input((3, 3, 2)), layer])
    variables = [id(v) for v in layer.weights]
    assert adopt(layer, "tf_keras_fused") is layer and type(layer) is BatchNormalization
    assert [id(v) for v in layer.weights] == variables and layer.get_config()["convention"] == "tf_keras_fused"
    x = _batches((4, 3, 3, 2), 1)[0]
    model(x, training=True)
    reference = torch.nn.BatchNorm2d(2, eps=1e-4, momentum=0.2)
    reference(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(_np(layer.moving_mean), reference.running_mean.numpy(), rtol=RTOL_STATS, atol=1e-7)
    np.testing.assert_allclose(_np(layer.moving_variance), reference.running_var.numpy(), rtol=RTOL_STATS)
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, 2))
    with pytest.raises(ValueError, match="not adopted in place"):
        adopt(renorm, "tf_keras_fused")
    with pytest.raises(ValueError, match="built keras.layers.BatchNormalization"):
        adopt(BatchNormalization(), "tf_keras_fused")
