"""Batch normalization settings both ways, semantics, and frozen Keras batch norms.
"""

from __future__ import annotations

import re

import pytest
import torch
from layer_checks import check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
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


def test_frozen_keras_batchnorm_stays_frozen_in_train():
    """A Keras BN with trainable=False runs in inference mode even under training=True (fit): it becomes
    bnkit's FrozenBatchNorm1d, which does the same in train(); nothing to remember, no warning. Converted
    back, a Keras batch norm with trainable=False again."""
    import warnings

    import numpy as np

    from bnkit.torch import FrozenBatchNorm1d

    inputs = keras.Input((4,))
    bn = L.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(inputs))
    bn.moving_mean.assign(np.array([0.5, -0.5, 1.0, 0.0], "float32"))
    bn.moving_variance.assign(np.array([2.0, 0.5, 1.0, 3.0], "float32"))
    bn.trainable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch_model = keras_to_torch(model)
    assert isinstance(torch_model.bn, FrozenBatchNorm1d)
    x = random_array((8, 4))
    expected = to_numpy(model(x, training=True))  # frozen: the moving statistics, and they stay put
    got = to_numpy(torch_model.train()(torch.from_numpy(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(torch_model.bn.running_var.numpy(), to_numpy(bn.moving_variance))
    back = torch_to_keras(torch_model.eval(), (4,))
    (layer,) = [la for la in back.layers if isinstance(la, L.BatchNormalization)]
    assert not layer.trainable


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


def test_torchvision_frozen_batch_norms_are_batch_norms_to_summary_fold_and_compare():
    """Issue 19, part 3: summary counts torchvision FrozenBatchNorm2d's statistics as running statistics,
    fold_bn folds each into the convolution before it (the output within 1e-5 relative, float32 weights
    rescaled), and compare pairs each with the converted Keras batch norm and agrees, in inference and in
    a training forward (both sides keep their statistics fixed)."""

    import bnkit
    from conftest import import_torchvision

    torchvision = import_torchvision()
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=frozen).eval()
    channels = 0
    for m in model.modules():
        if isinstance(m, frozen):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
            channels += m.weight.numel()
    assert bnkit.summary(model, input_shape=(3, 32, 32)).running_stats == 2 * channels
    x = torch.randn(2, 3, 32, 32)
    folded = bnkit.fold_bn(model, example_inputs=(x,))
    assert not any(isinstance(m, frozen) for m in folded.modules())
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    converted = torch_to_keras(model, input_shape=(3, 32, 32))
    for training in (False, True):
        report = bnkit.compare(model, converted, x.numpy(), training=training)
        assert report.agree, report
        assert sum(row.kind == "bn" for row in report.rows) == 20


class _FunctionalBatchNorm(torch.nn.Module):
    """A batch norm written as ``F.batch_norm`` over its own tensors, as hand-written layers do."""

    def __init__(self, channels: int, *, training=None, statistics: bool = True, weight: bool = True) -> None:
        super().__init__()
        self.always_training = training
        self.weight = torch.nn.Parameter(torch.rand(channels) + 0.5) if weight else None
        self.bias = torch.nn.Parameter(torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels) * 0.5 if statistics else None)
        self.register_buffer("running_var", torch.rand(channels) + 0.5 if statistics else None)

    def forward(self, x):
        training = self.training if self.always_training is None else self.always_training
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training, 0.2, 1e-3
        )


@pytest.mark.parametrize("weight", [True, False])
def test_functional_batch_norm_converts_as_the_layer_its_tensors_make(weight):
    """Issue 19, part 3: ``F.batch_norm`` in a forward becomes a Keras batch norm with its statistics (torch
    convention, momentum 0.2, eps 1e-3): the same inference output (1e-5 relative), the same training
    output and running statistics after a training forward (1e-5), and summary-visible as a batch norm."""
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _FunctionalBatchNorm(8, weight=weight), torch.nn.ReLU())
    converted = torch_to_keras(model.eval(), (3, 12, 12))
    (bn,) = [la for la in converted.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bn.scale is weight and bn.center and bn.epsilon == 1e-3
    x = torch.randn(4, 3, 12, 12)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    for training in (False, True):
        with torch.no_grad():
            expected = model.train(training)(x).permute(0, 2, 3, 1).numpy()
        got = keras.ops.convert_to_numpy(converted(nhwc, training=training))
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    for ours, theirs in ((bn.moving_mean, model[1].running_mean), (bn.moving_variance, model[1].running_var)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (_FunctionalBatchNorm(8, training=True), "training=True in eval()"),
        (_FunctionalBatchNorm(8, training=True, statistics=False), "running_mean/running_var=None"),
    ],
)
def test_functional_batch_norm_with_batch_statistics_at_inference_is_refused(layer, message):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), layer)
    with pytest.raises(UnsupportedLayerError, match=re.escape(message)) as error:
        torch_to_keras(model.eval(), (3, 12, 12))
    assert "torch.nn.functional.batch_norm()" in str(error.value)
