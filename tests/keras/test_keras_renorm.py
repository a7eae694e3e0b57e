"""bnkit.keras.BatchNormalization with batch renormalization and synchronized=True.

* convention="keras": Keras' own renorm, bit for bit.
* convention="torch": trains as bnkit.torch's renorm layer (the PyTorch side of the same model).
* synchronized=True, which Keras refuses off TensorFlow: taken on the torch backend; without a
  process group it is Keras' plain layer bit for bit (2 processes: tests/convert/test_convert_sync.py).

Tolerances: float32. Outputs and gradients 1e-5 (the frameworks reduce in different orders: a few
ulps per reduction, amplified by 1/std), statistics 1e-6 relative (1e-7 absolute for means near 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _autodiff import training_call

import bnkit
import bnkit.torch as bt
from bnkit.keras import BatchNormalization, keras

CLIPPING = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}
NAMES = {  # bnkit.torch buffer -> Keras weight
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
    "running_stddev": "moving_stddev",
    "renorm_mean": "renorm_mean",
    "renorm_stddev": "renorm_stddev",
    "num_batches_tracked": "num_batches_tracked",
}


def _np(v):
    if isinstance(v, keras.Variable):
        v = v.value
    return keras.ops.convert_to_numpy(v)


def _batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.5 * step + (1 + step % 3) * rng.standard_normal(shape)).astype("float32") for step in range(steps)]


def test_weights_are_keras_renorm_weights_in_keras_order():
    ours = BatchNormalization(convention="torch", renorm=True)
    ours.build((None, 4, 3))
    theirs = keras.layers.BatchNormalization(renorm=True)
    theirs.build((None, 4, 3))
    names = [w.name for w in theirs.weights]
    assert names == ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    assert [w.name for w in ours.weights] == [*names, "num_batches_tracked"]
    assert [w.name for w in ours.non_trainable_weights][:5] == names[2:]
    assert ours.renorm_momentum == 0.01 and BatchNormalization(renorm=True).renorm_momentum == 0.99


@pytest.mark.parametrize("clipping", [None, CLIPPING])
def test_keras_convention_is_keras_renorm_bit_for_bit(clipping):
    ours = BatchNormalization(momentum=0.8, renorm=True, renorm_clipping=clipping, renorm_momentum=0.6)
    theirs = keras.layers.BatchNormalization(momentum=0.8, renorm=True, renorm_clipping=clipping, renorm_momentum=0.6)
    for x in _batches((6, 3, 4), 4):
        np.testing.assert_array_equal(_np(ours(x, training=True)), _np(theirs(x, training=True)))
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("momenta", [(0.1, 0.3), (None, None), (1.0, 0.01)], ids=str)
@pytest.mark.parametrize("clipping", [None, CLIPPING], ids=["unclipped", "clipped"])
def test_torch_convention_trains_as_bnkit_torch(momenta, clipping):
    momentum, renorm_momentum = momenta
    kwargs = dict(momentum=momentum, renorm=True, renorm_clipping=clipping, renorm_momentum=renorm_momentum)
    ours = BatchNormalization(axis=1, convention="torch", **kwargs)
    torch_layer = bt.BatchNorm2d(3, convention="torch", **kwargs)
    ours.build((5, 3, 4, 4))
    g = torch.Generator().manual_seed(0)
    for step, x in enumerate(_batches((5, 3, 4, 4), 4)):
        dy = torch.randn(x.shape, generator=g)
        y1, *g1 = training_call(ours, x, dy.numpy())
        x2 = torch.from_numpy(x).requires_grad_(True)
        y2 = torch_layer(x2)
        np.testing.assert_allclose(y1, y2.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
        g2 = torch.autograd.grad(y2, [x2, torch_layer.weight, torch_layer.bias], dy)
        for a, b in zip(g1, g2, strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"grads, step {step}")
        for buffer, weight in NAMES.items():
            np.testing.assert_allclose(
                _np(getattr(ours, weight)), getattr(torch_layer, buffer).numpy(), rtol=1e-6, atol=1e-7,
                err_msg=f"{weight}, step {step}",
            )
    x = _batches((5, 3, 4, 4), 1, seed=1)[0]
    np.testing.assert_allclose(
        _np(ours(x, training=False)), torch_layer.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_config_and_saved_model_round_trip(tmp_path):
    inputs = keras.Input((4, 3))
    synchronized = keras.backend.backend() != "jax"  # refused on JAX: test_synchronized_is_refused_on_jax
    layer = BatchNormalization(convention="torch", renorm=True, renorm_clipping={"rmax": 2}, renorm_momentum=None,
                               momentum=None, synchronized=synchronized, name="bn")
    model = keras.Model(inputs, layer(inputs))
    for x in _batches((6, 4, 3), 2):
        model(x, training=True)
    config = layer.get_config()
    assert config["renorm_clipping"] == {"rmax": 2.0} and config["renorm_momentum"] is None
    assert config["synchronized"] is synchronized
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    bn = loaded.get_layer("bn")
    assert isinstance(bn, BatchNormalization) and bn.synchronized is synchronized
    assert bn.renorm and bn.renorm_momentum is None
    for a, b in zip(layer.weights, bn.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    x = _batches((6, 4, 3), 1, seed=3)[0]
    np.testing.assert_array_equal(_np(model(x, training=True)), _np(loaded(x, training=True)))


def test_synchronized_is_refused_on_jax():
    if keras.backend.backend() != "jax":
        pytest.skip("synchronized=True is taken on torch (bnkit's) and TensorFlow (Keras' own)")
    with pytest.raises(ValueError, match="synchronized=True needs the tensorflow backend"):
        BatchNormalization(synchronized=True)


@pytest.mark.parametrize("renorm", [False, True])
def test_synchronized_without_process_group_is_keras_plain_layer(renorm):
    if keras.backend.backend() == "jax":
        pytest.skip("refused on JAX: test_synchronized_is_refused_on_jax")
    if keras.backend.backend() == "torch":  # Keras' own layer takes it only on TensorFlow
        with pytest.raises(ValueError, match="synchronized=True"):
            keras.layers.BatchNormalization(synchronized=True)
    ours = BatchNormalization(synchronized=True, renorm=renorm, momentum=0.7)
    # on TensorFlow, bnkit's layer is Keras' own synchronised one (which sums where the plain one
    # takes moments: 2e-7 apart), off it, Keras' plain layer
    on_tensorflow = keras.backend.backend() == "tensorflow"
    theirs = keras.layers.BatchNormalization(renorm=renorm, momentum=0.7, synchronized=on_tensorflow)
    for x in _batches((6, 5), 3):
        np.testing.assert_array_equal(_np(ours(x, training=True)), _np(theirs(x, training=True)))
    for a, b in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    torch_convention = BatchNormalization(synchronized=True, convention="torch")
    plain = BatchNormalization(convention="torch")
    x = _batches((6, 5), 1)[0]
    np.testing.assert_array_equal(_np(torch_convention(x, training=True)), _np(plain(x, training=True)))


@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_recalibrate_sets_moving_stddev_with_the_variance_and_keeps_renorm_weights(convention):
    inputs = keras.Input((4, 3))
    layer = BatchNormalization(convention=convention, renorm=True, name="bn")
    model = keras.Model(inputs, layer(inputs))
    for x in _batches((6, 4, 3), 2):
        model(x, training=True)
    renorm = [_np(layer.renorm_mean).copy(), _np(layer.renorm_stddev).copy()]
    batches = _batches((5, 4, 3), 3, seed=4)
    bnkit.recalibrate(model, batches, progress=False)
    values = np.concatenate(batches).reshape(-1, 3).astype(np.float64)
    var = values.var(0, ddof=1 if convention == "torch" else 0)
    np.testing.assert_allclose(_np(layer.moving_variance), var, rtol=1e-6)
    np.testing.assert_allclose(_np(layer.moving_stddev), np.sqrt(var + layer.epsilon), rtol=1e-6)
    np.testing.assert_array_equal(_np(layer.renorm_mean), renorm[0])
    np.testing.assert_array_equal(_np(layer.renorm_stddev), renorm[1])


def test_fold_keeps_the_inference_output():
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization(renorm=True, renorm_clipping=CLIPPING, name="bn")(h)
    model = keras.Model(inputs, h)
    for x in _batches((4, 5, 5, 2), 3):
        model(x, training=True)
    x = _batches((2, 5, 5, 2), 1, seed=9)[0]
    expected = _np(model(x))
    folded = bnkit.fold_bn(model)
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in folded.layers)
    np.testing.assert_allclose(_np(folded(x)), expected, rtol=1e-5, atol=1e-5)


def test_bad_clippings_are_refused_in_keras_words():
    """Keras' own test_renorm_invalid_clipping_keys matches these phrases (bnkit's layer failed it
    with words of its own: 32 of 33 of Keras' batch_normalization_test.py)."""
    from bnkit.keras import BatchNormalization

    for clipping, phrase in (
        ({"random_key": 1.0}, "Received invalid keys"),
        ({"rmax": 0.0, "rmin": 1.0}, "rmax should be"),
        ({"rmax": 1.0, "dmax": -1.0}, "dmax should be non-negative"),
    ):
        with pytest.raises(ValueError, match=phrase):
            BatchNormalization(renorm=True, renorm_clipping=clipping)
