"""fold_bn(report=True) says, for every batch norm it does not fold, why: the cases the folder tells apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import bnkit


class _Net(nn.Module):
    """One conv, one batch norm, and a ``forward`` chosen per case."""

    def __init__(self, forward, layer=None, bn=None) -> None:
        super().__init__()
        self.conv = layer if layer is not None else nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.bn = bn if bn is not None else nn.BatchNorm2d(4)
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


def _reason(model, **kwargs) -> str:
    result = bnkit.fold_bn(model.eval(), report=True, **kwargs)
    (decision,) = [d for d in result.decisions if d.name == "bn"]
    assert not decision.folded and decision.outcome == "affine" and decision.into == ()
    return decision.reason


def _hooked():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    layer.register_forward_hook(lambda m, i, o: o)
    return layer


@pytest.mark.parametrize(
    ("forward", "kwargs", "reason"),
    [
        (lambda m, x: m.bn(m.act(m.conv(x))), {},
         "its input is the output of ReLU 'act', not of a Conv/ConvTranspose/Linear (ReLU sits between Conv2d "
         "'conv' and the batch norm"),
        (lambda m, x: m.bn(torch.relu(m.conv(x))), {}, "its input is computed by torch.relu(), not by a"),
        (lambda m, x: m.bn(m.conv(x).clamp(0)), {}, "its input is computed by the tensor method .clamp()"),
        (lambda m, x: m.bn(m.conv(x)) + m.conv(x), {},
         "Conv2d 'conv' is called 2 times (shared weights)"),
        (lambda m, x: (lambda y: y + m.bn(y))(m.conv(x)), {},
         "the output of Conv2d 'conv' is also used by"),
        (lambda m, x: m.bn(m.conv(x)) + m.conv.weight.sum(), {}, "forward reads the tensors of Conv2d 'conv' directly"),
        (lambda m, x: m.bn(x.repeat(1, 2, 1, 1)[:, :4]), {}, "not by a Conv/ConvTranspose/Linear module"),
        (lambda m, x: m.bn(m.conv(x)), {"layer": _hooked()}, "Conv2d 'conv' has forward hooks"),
        (lambda m, x: m.bn(m.conv(x)), {"layer": parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))},
         "Conv2d 'conv' has a parametrization (weight_norm"),
        (lambda m, x: m.bn(m.conv(x.flatten(2)).unflatten(2, (4, 4)).transpose(1, 3)),
         {"layer": nn.Linear(16, 4)}, "not by a Conv/ConvTranspose/Linear module"),
        (lambda m, x: m.bn(m.conv(x)), {"layer": nn.Linear(4, 4)},
         "Linear 'conv' maps the last axis of its input, BatchNorm2d normalises axis 1"),
    ],
    ids=["activation", "function", "method", "shared-layer", "residual", "weight-read", "no-layer", "hook",
         "parametrization", "linear-reshaped", "linear-bn2d"],
)  # fmt: skip
def test_torch_reasons(forward, kwargs, reason):
    assert reason in _reason(_Net(forward, **kwargs))


def test_torch_reasons_that_need_shapes_or_several_calls():
    model = _Net(lambda m, x: m.bn(m.conv(x)), layer=nn.Linear(4, 4), bn=nn.BatchNorm1d(4))
    reason = _reason(model, example_inputs=(torch.randn(2, 4, 4),))
    assert "the output of Linear 'conv' is 3-D: the Linear maps its last axis, the batch norm normalises" in reason
    twice = _Net(lambda m, x: m.bn(m.conv(x)) + m.bn(m.act(x[:, :1].expand(-1, 4, -1, -1))))
    assert _reason(twice).startswith("at one of its 2 calls, its input is the output of ReLU 'act'")
    on_input = _Net(lambda m, x: m.bn(x), bn=nn.BatchNorm2d(3))
    assert _reason(on_input) == "its input is the model's input: no layer comes before it"


def test_folded_batch_norms_name_the_layer_they_went_into():
    model = _Net(lambda m, x: m.act(m.bn(m.conv(x)))).eval()
    folded, decisions = bnkit.fold_bn(model, report=True)
    assert [d.to_dict() for d in decisions] == [
        {"name": "bn", "type": "BatchNorm2d", "outcome": "folded", "into": ["conv"], "reason": ""}
    ]
    assert isinstance(folded.bn, nn.Identity)
    assert isinstance(bnkit.fold_bn(model), _Net)  # without report: the model alone, as before


def test_the_seed_networks_say_why():
    from bnkit.examples import keras_seed_model, torch_seed_model

    (torch_decision,) = bnkit.fold_bn(torch_seed_model(), report=True).decisions
    assert torch_decision.reason.startswith("its input is the output of ReLU '1', not of a Conv")
    (keras_decision,) = bnkit.fold_bn(keras_seed_model(), report=True).decisions
    assert keras_decision.reason.startswith("Conv2D 'conv' applies activation='relu' before the batch norm")


def test_keras_reasons():
    from bnkit.keras import keras

    inputs = keras.Input((8, 8, 3), name="image")
    on_input = keras.layers.BatchNormalization(name="bn_input")(inputs)
    conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")(on_input)
    residual = keras.layers.Add(name="add")([conv, keras.layers.BatchNormalization(name="bn_residual")(conv)])
    pooled = keras.layers.BatchNormalization(name="bn_pool")(keras.layers.MaxPooling2D(name="pool")(residual))
    first = keras.layers.Conv2D(3, 1, name="first", data_format="channels_first")(pooled)
    axis = keras.layers.BatchNormalization(axis=-1, name="bn_axis")(first)
    model = keras.Model(inputs, axis)
    reasons = {d.name: d.reason for d in bnkit.fold_bn(model, report=True).decisions}
    assert reasons["bn_input"] == "its input is the model's input: no layer comes before it"
    assert reasons["bn_residual"].startswith("the output of Conv2D 'conv' is also used by Add 'add'")
    assert reasons["bn_pool"] == "its input is the output of MaxPooling2D 'pool', not of a Conv/ConvTranspose/Dense"
    assert reasons["bn_axis"] == "the batch norm normalises axis 3, Conv2D 'first' puts its channels on axis 1"
