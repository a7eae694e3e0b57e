"""The networks real_networks_beyond adds to those of the family test files: torchvision resnet50 with
``FrozenBatchNorm2d`` (a detection backbone), torchvision ``vit_b_16`` at 32x32, and a Keras channels_first
CNN, each converted there and back by ``check_network`` (inference 1e-5, training forward and statistics 1e-4,
every weight back); compare agrees on the channels_first CNN; ``lost_weights`` takes a transposed weight as
held and a changed one as lost; BEYOND holds every network the family test files check."""

from __future__ import annotations

import pytest
import torch
from real_networks import INFERENCE_TOL, TRAINING_TOL, check_network, format_error, lost_weights
from real_networks_beyond import (
    BENCHMARK_ONLY,
    BEYOND,
    EXPECTED_REFUSALS,
    SEGMENTATION_NETWORKS,
    SEQUENCE_NETWORKS,
    TRANSFORMER_BLOCK,
    VIDEO_NETWORKS,
)
from torch import nn

import bnkit
from bnkit.convert import keras_to_torch


@pytest.mark.parametrize(
    "name, batch_norms",
    [
        ("keras_channels_first_cnn", 3),
        # its 53 FrozenBatchNorm2d become Keras batch norms with trainable=False: statistics stay put on both sides
        pytest.param("resnet50_frozen_bn", 53, marks=pytest.mark.slow),
        pytest.param("vit_b_16", 0, marks=pytest.mark.slow),  # 86M weights, 15 s here
    ],
)
def test_network_converts_there_and_back(name, batch_norms):
    report = check_network(BEYOND[name], round_trip=True)
    figures = (
        f"{name}: inference {format_error(report.inference_error)}, training {format_error(report.training_error)}, "
        f"statistics {format_error(report.statistics_error)}, back {format_error(report.round_trip_error)}, "
        f"{report.convert_seconds:.2f} s, lost {report.weights_lost}"
    )
    assert report.batch_norms == batch_norms, figures
    assert report.inference_error < INFERENCE_TOL and report.round_trip_error < INFERENCE_TOL, figures
    assert report.training_error < TRAINING_TOL and report.statistics_error < TRAINING_TOL, figures
    # ViT's position embedding comes back transposed, which lost_weights counts as held
    assert report.weights_lost == (), figures


def test_compare_agrees_on_the_channels_first_cnn():
    net = BEYOND["keras_channels_first_cnn"]
    source = net.build()
    converted = keras_to_torch(source)
    for training in (False, True):
        report = bnkit.compare(source, converted, net.example_input(), training=training)
        assert report.agree and sum(row.kind == "bn" for row in report.rows) == 3, report.render()


def test_lost_weights_takes_a_transpose_as_held_and_other_values_as_lost():
    torch.manual_seed(0)
    source = nn.Linear(3, 4)
    transposed, changed = nn.Linear(4, 3), nn.Linear(3, 4)
    with torch.no_grad():
        transposed.weight.copy_(source.weight.T)
        transposed.bias.zero_().add_(1.0)
        changed.load_state_dict(source.state_dict())
        changed.weight[0, 0] += 1e-3
    assert lost_weights(source, transposed) == ("bias",)  # its weight is held, transposed
    assert lost_weights(source, changed) == ("weight",)


def test_beyond_holds_every_network_of_the_family_tests():
    family = [*VIDEO_NETWORKS, *SEGMENTATION_NETWORKS, *(n.name for n in SEQUENCE_NETWORKS), TRANSFORMER_BLOCK.name]
    assert set(family) | {"vit_small"} | BENCHMARK_ONLY | EXPECTED_REFUSALS <= set(BEYOND)


class _TwoHeads(nn.Module):
    """Segmentation-style dict outputs, "out" before "aux" as torchvision's (Keras orders them by key)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.out, self.aux = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        features = self.body(x)
        return {"out": self.out(features), "aux": self.aux(features)}


def test_compare_agrees_on_dict_outputs_in_another_key_order():
    """compare takes the same output of both models: Keras sorts a model's dict outputs by key ({"aux", "out"}),
    so the PyTorch side's dict is read in key order too (it compared "out" with Keras' "aux", a false alarm on
    torchvision's fcn_resnet50 and deeplabv3_mobilenet_v3_large with aux_loss)."""
    from bnkit.convert import torch_to_keras

    torch.manual_seed(0)
    module = _TwoHeads().eval()
    converted = torch_to_keras(module, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8).numpy()
    for training in (False, True):
        report = bnkit.compare(module, converted, x, training=training)
        assert report.agree and report.output_max_abs_diff < 1e-5, report.render()
        module.eval()
