"""bnkit.freeze_bn against real PyTorch and Keras behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _lifecycle_models import randomize_batchnorms
from torch import nn

import bnkit
import bnkit.torch as bt
from bnkit.keras import keras


def _model():
    torch.manual_seed(0)
    return randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
        bt.BatchNorm2d(2, convention="keras"), nn.Flatten(), nn.Linear(2 * 4 * 4, 3), nn.BatchNorm1d(3),
    ))


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_keras_convention_freezes_like_keras_trainable_false():
    model = _model()
    original = copy.deepcopy(model).eval()
    frozen = bnkit.freeze_bn(model, convention="keras").train()
    assert [type(m).__name__ for m in frozen if "BatchNorm" in type(m).__name__] == [
        "FrozenBatchNorm2d", "FrozenBatchNorm2d", "FrozenBatchNorm1d"]
    assert frozen[4].convention.name == "keras" and frozen[4].eps == 1e-3  # the layer's own convention kept
    assert list(frozen.state_dict()) == list(original.state_dict())  # same layout, same order
    before = _buffers(frozen)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    y = frozen(x)  # train(): running statistics normalise, as in Keras' fit() with trainable=False
    with torch.no_grad():
        torch.testing.assert_close(y, original(x))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the input
    for key, value in _buffers(frozen).items():
        assert torch.equal(value, before[key]), key
    bn_params = {id(t) for m in frozen if isinstance(m, bt.FrozenBatchNorm) for t in (m.weight, m.bias)}
    assert not bn_params & {id(p) for p in frozen.parameters()}  # no optimizer can reach them
    frozen.load_state_dict(original.state_dict())  # checkpoints load both ways
    frozen.requires_grad_(True)
    assert not frozen[1].weight.requires_grad


def test_keras_convention_matches_a_real_keras_layer_with_trainable_false():
    bn = randomize_batchnorms(bt.BatchNorm2d(3, convention="keras"))
    frozen = bnkit.freeze_bn(bn, convention="keras").train()
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=bn.eps)
    layer.build((None, 4, 4, 3))
    layer.set_weights([t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)])
    layer.trainable = False
    x = torch.randn(6, 3, 4, 4)
    expected = keras.ops.convert_to_numpy(layer(x.permute(0, 2, 3, 1).numpy(), training=True))
    np.testing.assert_allclose(frozen(x).permute(0, 2, 3, 1).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_torch_convention_normalises_with_batch_stats_but_freezes_everything():
    model = _model()
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    frozen = bnkit.freeze_bn(model).train()
    assert isinstance(frozen[1], bt.FrozenBatchNorm2d) and frozen[1].batch_stats_in_train
    before = _buffers(frozen)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = frozen(x), reference(x_ref)  # PyTorch requires_grad=False: batch statistics
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for key, value in _buffers(frozen).items():  # ... but, unlike PyTorch, nothing moved
        assert torch.equal(value, before[key]), key
    assert not torch.equal(_buffers(reference)["1.running_mean"], before["1.running_mean"])
    frozen.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), _model().eval()(x))  # eval(): the untouched statistics


def test_torch_convention_without_freezing_stats_is_requires_grad_false():
    model = _model()
    reference = copy.deepcopy(model).train()
    same = bnkit.freeze_bn(model, "torch", freeze_stats=False)
    assert same is model and type(model[1]) is nn.BatchNorm2d
    assert not model[1].weight.requires_grad and model[0].weight.requires_grad
    x = torch.randn(5, 3, 6, 6)
    model.train()(x)
    reference(x)
    for key, value in _buffers(model).items():  # statistics kept updating, exactly as PyTorch's
        torch.testing.assert_close(value, _buffers(reference)[key], rtol=0, atol=0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="convention='keras' freezes the statistics by definition"):
        bnkit.freeze_bn(_model(), "keras", freeze_stats=False)
    with pytest.raises(ValueError, match="convention must be one of 'torch', 'keras'"):
        bnkit.freeze_bn(_model(), "jax")
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' has track_running_stats=False"):
        bnkit.freeze_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))


def _keras_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, outputs)


def test_keras_model_keras_convention_sets_trainable_false():
    model = bnkit.freeze_bn(_keras_model(), convention="keras")
    bn = model.layers[-1]
    assert bn.trainable is False and model.layers[1].trainable
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32") * 3 + 1
    stats = [w.copy() for w in bn.get_weights()]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=True)),
                               keras.ops.convert_to_numpy(model(x, training=False)), rtol=1e-6)
    for old, new in zip(stats, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_keras_model_torch_convention_freezes_gamma_beta_only():
    model = bnkit.freeze_bn(_keras_model(), convention="torch", freeze_stats=False)
    bn = model.layers[-1]
    assert bn.trainable and not bn.gamma.trainable and not bn.beta.trainable
    assert {v.path for v in model.trainable_weights}.isdisjoint({bn.gamma.path, bn.beta.path})
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32") * 3 + 1
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    model(x, training=True)
    assert not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean), before)  # statistics move
    with pytest.raises(ValueError, match="has no Keras equivalent"):
        bnkit.freeze_bn(_keras_model(), convention="torch")
