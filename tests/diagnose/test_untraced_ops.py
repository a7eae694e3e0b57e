"""Operations compare does not trace (reshapes, permutations, arithmetic with numbers) that differ
between two models: named at the first traced layer that reads their result, as a rearrangement
(``layout``) when the layer receives the same values in another order, else ``unexplained`` with
what it observed — never as rounding to be solved with a larger tolerance."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.convert import torch_to_keras
from bnkit.diagnose.compare import compare


class _Net(nn.Module):
    """conv → (an untraced operation) → conv → BN → global pooling → linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.mode = "plain"

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.shape
        if self.mode == "shuffled":  # channels in groups of 2 read the wrong way round
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.mode == "plain-shuffle":
            y = y.view(n, c // 2, 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.mode == "halved":
            y = y * 0.5
        y = self.bn(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def _pair(mode: str, reference: str = "plain"):
    a = _Net().eval()
    a.mode = reference
    b = copy.deepcopy(a)
    b.mode = mode
    return a, b


X = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype("float32")


@pytest.mark.parametrize("reference", ["plain", "plain-shuffle"])
def test_values_rearranged_between_two_traced_layers_are_a_layout_cause(reference):
    a, b = _pair("shuffled", reference)
    report = compare(a, b, X)
    assert report.cause_codes == ["layout"], str(report)
    assert report.causes[0].layers == ["conv2"] and report.first_divergence.name == "conv2"
    assert "every value it received is one the layers feeding it produced" in report.causes[0].evidence


def test_a_different_untraced_computation_is_unexplained_with_what_was_observed():
    a, b = _pair("halved")
    report = compare(a, b, X)
    assert report.cause_codes == ["unexplained"], str(report)
    assert report.causes[0].layers == ["conv2"]
    assert "receives different inputs" in report.causes[0].explanation
    assert "larger atol" not in report.causes[0].explanation


def test_across_frameworks_the_rearrangement_is_found_in_either_layout():
    a, b = _pair("shuffled")
    keras_model = torch_to_keras(a, (3, 8, 8))
    report = compare(keras_model, b, np.moveaxis(X, 1, -1))
    assert report.cause_codes == ["layout"], str(report)
    assert report.first_divergence.name_b == "conv2"
    assert compare(keras_model, a, np.moveaxis(X, 1, -1)).agree  # the reference conversion is exact
