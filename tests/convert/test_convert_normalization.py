"""Batch normalization settings both ways, semantics, and frozen Keras batch norms.
"""

from __future__ import annotations

import pytest
import torch
from layer_checks import check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import BatchNormalization, keras

L = keras.layers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"center": False},
        {"scale": False},
        {"center": False, "scale": False},
        {"momentum": 0.5, "epsilon": 1e-2},
        {"momentum": 1.25},  # Keras takes it (bnkit lint flags it)
    ],
)
@pytest.mark.parametrize("semantics", ["source", "target"])
def test_keras_batchnorm_settings(kwargs, semantics):
    inputs = keras.Input((3, 3, 4))
    bn = L.BatchNormalization(**kwargs, name="bn")
    model = keras.Model(inputs, bn(inputs))
    for w in bn.weights:
        w.assign(random_array(w.shape, len(w.name)) ** 2 + 0.5)
    torch_model = check_keras(model, random_array((2, 3, 3, 4)), semantics)
    assert torch_model.bn.eps == pytest.approx(bn.epsilon)
    assert torch_model.bn.momentum == pytest.approx(bn.momentum if semantics == "source" else 1 - bn.momentum)


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm1d(4, affine=False),
        nn.BatchNorm1d(4, bias=False, eps=1e-2),
        nn.BatchNorm1d(4, momentum=None),
        nn.BatchNorm1d(4, momentum=1.5),  # both frameworks take it (bnkit lint flags it)
        nn.BatchNorm1d(4, momentum=torch.tensor(0.25)),
    ],
)
def test_torch_batchnorm1d_settings(module):
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.num_batches_tracked.fill_(7)
    model = check_torch(nn.Sequential(module, nn.Linear(4, 2)), (4,))
    (bn,) = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    assert isinstance(bn, BatchNormalization)
    assert bn.momentum == (None if module.momentum is None else float(module.momentum))
    assert int(to_numpy(bn.num_batches_tracked.value)) == 7
    assert (bn.scale, bn.center) == (module.affine, module.bias is not None)


def test_frozen_keras_batchnorm_is_converted_in_eval():
    inputs = keras.Input((4,))
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(inputs))
    bn.trainable = False
    with pytest.warns(UserWarning, match="frozen") as record:
        torch_model = keras_to_torch(model)
    (frozen,) = [w for w in record if "frozen" in str(w.message)]
    assert frozen.filename == __file__  # the warning points at the user's call, not bnkit's code
    assert not torch_model.bn.training and not torch_model.bn.weight.requires_grad


def test_cumulative_momentum_refusal_speaks_pytorch_and_keras():
    """momentum=None with semantics="target" was refused with "its default is 0.99": Keras' default,
    which in PyTorch's meaning is the opposite (issue 19)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).eval()
    with pytest.raises(Exception, match=r"its default, 0\.99, is momentum=0\.01 in the torch convention\); "
                       r"use semantics='source'"):
        torch_to_keras(model, input_shape=(3, 8, 8), semantics="target")


def test_torchvision_frozen_batchnorm_converts_to_frozen_keras_batch_norms():
    """torchvision's FrozenBatchNorm2d (detection backbones) becomes a Keras BatchNormalization with
    trainable=False (inference mode always, as the frozen layer), not four elementwise constants
    (issue 19). ResNet-18 built with it, random statistics: outputs within 1e-5 relative (float32, the
    same function rounded in another order), in inference and in Keras' training mode alike."""
    import numpy as np

    from conftest import import_torchvision

    torchvision = import_torchvision()
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=frozen).eval()
    for m in model.modules():
        if isinstance(m, frozen):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    converted = torch_to_keras(model, input_shape=(3, 32, 32))
    batch_norms = [la for la in converted.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert len(batch_norms) == sum(isinstance(m, frozen) for m in model.modules()) == 20
    assert not any(la.trainable for la in batch_norms)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    nhwc = x.permute(0, 2, 3, 1).numpy()
    for training in (False, True):
        got = keras.ops.convert_to_numpy(converted(nhwc, training=training))
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
