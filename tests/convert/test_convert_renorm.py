"""Batch renormalization through conversion: a Keras model with renorm layers converts to PyTorch,
trains a few steps on both sides with the same results, and converts back with the same weights;
bnkit's PyTorch renorm layers convert to Keras; synchronised layers map to SyncBatchNorm and back.

Tolerances: float32. The two sides run the same arithmetic in different summation orders (PyTorch's
Welford statistics against Keras' E[x^2] - E[x]^2, convolution orders): losses and outputs agree to
1e-6 relative after 4 SGD steps, weights to 1e-6 absolute (values of order 1). Converting back
copies the PyTorch weights exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnkit.torch as bt
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import BatchNormalization, keras

L = keras.layers
CLIPPING = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}
STEPS, LR = 4, 0.1


def _np(v):
    return keras.ops.convert_to_numpy(v.value if isinstance(v, keras.Variable) else v)


def _keras_model(convention=None):
    """Conv -> renorm BN -> ReLU -> Flatten -> Dense -> renorm BN; Keras' layers or bnkit's in ``convention``."""
    keras.utils.set_random_seed(0)

    def bn(name, **kwargs):
        if convention is None:
            return L.BatchNormalization(name=name, **kwargs)
        return BatchNormalization(name=name, convention=convention, **kwargs)

    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = bn("bn", renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.8 if convention != "torch" else 0.2,
           momentum=0.7 if convention != "torch" else 0.3)(h)
    h = L.ReLU(name="relu")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(5, name="dense")(h)
    h = bn("bn2", renorm=True)(h)
    return keras.Model(inputs, h)


def _train_both(model, torch_model):
    """STEPS SGD steps on a squared error, Keras and PyTorch side by side; returns both losses per step."""
    torch_model.train()
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=LR)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(STEPS):
        x = rng.normal(0.5, 1.5, (8, 6, 6, 2)).astype("float32")
        target = torch.from_numpy(rng.normal(size=(8, 5)).astype("float32"))
        loss_keras = ((model(x, training=True) - target) ** 2).mean()
        grads = torch.autograd.grad(loss_keras, [w.value for w in model.trainable_weights])
        for weight, grad in zip(model.trainable_weights, grads, strict=True):
            weight.assign(weight.value - LR * grad)
        loss_torch = ((torch_model(torch.from_numpy(np.moveaxis(x, -1, 1).copy())) - target) ** 2).mean()
        optimizer.zero_grad()
        loss_torch.backward()
        optimizer.step()
        losses.append((float(loss_keras.detach()), float(loss_torch.detach())))
    return losses


@pytest.mark.parametrize("convention", [None, "torch"], ids=["keras-layers", "bnkit-torch-convention"])
def test_keras_renorm_model_trains_alike_and_converts_back(convention):
    model = _keras_model(convention)
    torch_model = keras_to_torch(model)
    for name in ("bn", "bn2"):
        bn, layer = getattr(torch_model, name), model.get_layer(name)
        assert isinstance(bn, bt.BatchNorm2d if name == "bn" else bt.BatchNorm1d) and bn.renorm
        assert bn.renorm_clipping == dict(layer.renorm_clipping) and bn.renorm_momentum == layer.renorm_momentum
        assert bn.convention.name == (convention or "keras")
    losses = _train_both(model, torch_model)
    for keras_loss, torch_loss in losses:
        assert torch_loss == pytest.approx(keras_loss, rel=1e-6)
    assert losses[-1][0] < losses[0][0]  # it trains
    for name in ("bn", "bn2"):
        assert int(getattr(torch_model, name).num_batches_tracked) == STEPS
    back = torch_to_keras(torch_model.eval(), (2, 6, 6))
    for a, b in zip(model.weights, back.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_allclose(_np(b), _np(a), rtol=1e-6, atol=1e-6, err_msg=a.path)  # trained alike
    torch_state = torch_model.state_dict()
    for name in ("bn", "bn2"):  # and the way back copies PyTorch's state exactly
        layer = back.get_layer(name)
        assert layer.renorm and layer.renorm_clipping == model.get_layer(name).renorm_clipping
        for buffer, weight in (("running_stddev", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                               ("renorm_stddev", "renorm_stddev"), ("running_var", "moving_variance")):
            np.testing.assert_array_equal(_np(getattr(layer, weight)), torch_state[f"{name}.{buffer}"].numpy())
    x = np.random.default_rng(2).normal(size=(3, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(_np(back(x)), _np(model(x)), rtol=1e-5, atol=1e-5)


def test_target_semantics_translates_both_momenta_into_the_torch_convention():
    model = _keras_model()
    torch_model = keras_to_torch(model, semantics="target")
    bn = torch_model.bn
    assert isinstance(bn, bt.BatchNorm2d) and bn.renorm and bn.convention.name == "torch"
    assert bn.momentum == pytest.approx(0.3) and bn.renorm_momentum == pytest.approx(0.2)
    back = torch_to_keras(torch_model.eval(), (2, 6, 6), semantics="target")
    layer = back.get_layer("bn")
    assert type(layer) is L.BatchNormalization and layer.renorm
    assert layer.momentum == pytest.approx(0.7) and layer.renorm_momentum == pytest.approx(0.8)


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("semantics", ["source", "target"])
def test_bnkit_torch_renorm_layer_converts_to_keras(convention, semantics):
    layer = bt.BatchNorm1d(4, convention=convention, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.25)
    for step in range(3):
        layer(torch.randn(6, 4) * 2 + step)
    model = torch_to_keras(nn.Sequential(layer.eval()), (4,), semantics=semantics)
    (bn,) = [la for la in model.layers if isinstance(la, L.BatchNormalization)]
    assert bn.renorm and bn.renorm_clipping == CLIPPING
    native = semantics == "target" or convention == "keras"
    assert (type(bn) is L.BatchNormalization) == native
    expected_momentum = 1 - 0.25 if convention == "torch" and native else 0.25
    assert bn.renorm_momentum == pytest.approx(expected_momentum)
    weights = {w.name: _np(w) for w in bn.weights}
    for buffer, weight in (("running_stddev", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                           ("renorm_stddev", "renorm_stddev")):
        np.testing.assert_array_equal(weights[weight], getattr(layer, buffer).numpy())
    x = torch.randn(5, 4)
    np.testing.assert_allclose(_np(model(x.numpy())), layer(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_cumulative_renorm_momentum_has_no_keras_equivalent_in_target_semantics():
    from bnkit.convert import UnsupportedLayerError

    layer = bt.BatchNorm1d(4, momentum=0.1, renorm=True, renorm_momentum=None)
    with pytest.raises(UnsupportedLayerError, match="momentum=None"):
        torch_to_keras(nn.Sequential(layer.eval()), (4,), semantics="target")
    model = torch_to_keras(nn.Sequential(layer.eval()), (4,))  # the torch convention on the Keras side
    (bn,) = [la for la in model.layers if isinstance(la, L.BatchNormalization)]
    assert isinstance(bn, BatchNormalization) and bn.renorm_momentum is None


@pytest.mark.parametrize("module", [nn.SyncBatchNorm(3), bt.SyncBatchNorm(3, convention="keras", renorm=True)])
def test_sync_batchnorm_converts_to_synchronized_and_back(module):
    module.eval()
    model = torch_to_keras(nn.Sequential(nn.Conv2d(2, 3, 1), module), (2, 4, 4))
    (bn,) = [la for la in model.layers if isinstance(la, L.BatchNormalization)]
    assert isinstance(bn, BatchNormalization) and bn.synchronized
    assert bn.renorm == getattr(module, "renorm", False)
    torch_model = keras_to_torch(model)
    (back,) = [m for m in torch_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert type(back) is bt.SyncBatchNorm and back.renorm == bn.renorm
