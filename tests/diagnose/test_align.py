"""Pairing by graph structure (bnkit.diagnose.align): parallel branches pair with their counterparts
whatever order they were defined in, concatenations pair branch by branch, names are hints only,
and layers without a counterpart are listed as such."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.convert import keras_to_torch
from bnkit.diagnose.compare import compare
from bnkit.io import save_model
from bnkit.keras import keras

L = keras.layers


def branch_order_block(seed: int = 0):
    """The issue's reproducer: a shortcut Conv2D(16, 1) → BN defined first, then the main branch
    Conv2D(4, 3) → BN → ReLU → Conv2D(16, 3) → BN, then Add."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    shortcut = L.BatchNormalization(name="short_bn")(L.Conv2D(16, 1, name="short_conv")(inputs))
    x = L.Conv2D(4, 3, padding="same", name="main_conv1")(inputs)
    x = L.ReLU(name="main_relu")(L.BatchNormalization(name="main_bn1")(x))
    x = L.BatchNormalization(name="main_bn2")(L.Conv2D(16, 3, padding="same", name="main_conv2")(x))
    outputs = L.Add(name="add")([shortcut, x])
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, c).astype("float32"))
    return model


def batch(shape=(2, 8, 8, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_branch_order_reproducer_agrees_and_pairs_each_branch():
    model = branch_order_block()
    report = compare(model, keras_to_torch(model), batch())
    assert report.agree and report.causes == [], str(report)
    assert [(r.name_a, r.name_b) for r in report.rows if r.kind in ("conv", "bn")] == [
        (name, name) for name in ("main_conv1", "main_bn1", "main_conv2", "short_conv", "short_bn", "main_bn2")
    ]
    assert report.unmatched_a == report.unmatched_b == []


def test_branch_order_reproducer_as_files_exits_0(run_cli, tmp_path):
    model = branch_order_block()
    save_model(model, tmp_path / "block.keras")
    save_model(keras_to_torch(model), tmp_path / "block.pt2", input_shape=(3, 8, 8))
    proc = run_cli("compare", "block.keras", "block.pt2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["causes"] == []


def test_names_are_hints_only():
    """The PyTorch port names its layers after the other branch: structure still decides."""
    model = branch_order_block()
    port = keras_to_torch(model)
    swapped = {"short_conv": "main_conv2", "main_conv2": "short_conv", "short_bn": "main_bn2", "main_bn2": "short_bn"}
    renamed = nn.Module()
    for name, child in port.named_children():
        renamed.add_module(swapped.get(name, name), child)
    graph = torch.fx.Graph()
    env = {}
    for node in port.graph.nodes:
        target = swapped.get(node.target, node.target) if node.op == "call_module" else node.target
        env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].target = target
    renamed_port = torch.fx.GraphModule(renamed, graph).eval()
    report = compare(model, renamed_port, batch())
    assert report.agree, str(report)
    pairs = {(r.name_a, r.name_b) for r in report.rows}
    assert ("short_conv", "main_conv2") in pairs and ("main_conv2", "short_conv") in pairs


class _Inception(nn.Module):
    """Four branches with the same output shape (8 channels each), one of them identical in every
    shape to another, concatenated in a fixed order."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU())  # same shapes as b1
        self.b3 = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def test_concatenated_branches_pair_by_their_position_in_the_concatenation():
    torch.manual_seed(0)
    a = _Inception().eval()
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    # B runs the same layers but defines (and runs) its branches in another order
    b = _Inception().eval()
    b.load_state_dict(a.state_dict())
    order = [b.b4, b.b3, b.b2, b.b1]

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(order)

        def forward(self, x):
            outs = [branch(x) for branch in self.branches]
            return torch.cat(outs[::-1], 1)

    x = batch((2, 4, 6, 6))
    report = compare(a, Reordered().eval(), x)
    assert report.agree, str(report)
    pairs = {(r.name_a, r.name_b) for r in report.rows}
    for i in range(4):  # branch b{i+1} of A is branches.{3-i} of B
        assert (f"b{i + 1}.0", f"branches.{3 - i}.0") in pairs
    # a fault in the second of the two identical branches is named there, not in its twin
    with torch.no_grad():
        b.b2[1].running_mean.add_(1.0)
    report = compare(a, Reordered().eval(), x)
    assert report.first_divergence.name == "b2.1 / branches.2.1"
    assert report.cause_codes == ["weights"] and report.causes[0].layers == ["b2.1 / branches.2.1"]


def test_layers_without_a_counterpart_are_listed_not_forced_into_a_pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    b = nn.Sequential(a[0], nn.Identity(), nn.Conv2d(4, 4, 3, padding=1), a[1], a[2], a[3]).eval()
    with torch.no_grad():
        b[2].weight.zero_()
        b[2].bias.zero_()
        b[2].weight[:, :, 1, 1] = torch.eye(4)  # an extra 3×3 convolution that passes its input through
    report = compare(a, b, batch((2, 3, 6, 6)))
    assert report.unmatched_a == [] and report.unmatched_b == ["2"]
    assert [(r.name_a, r.name_b) for r in report.rows] == [("0", "0"), ("1", "3"), ("2", "4"), ("3", "5")]
    assert report.agree, str(report)


@pytest.mark.parametrize("defined_first", ["main", "shortcut"])
def test_either_definition_order_pairs_the_same(defined_first):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            if defined_first == "shortcut":
                self.short = nn.Conv2d(3, 16, 1)
            self.main = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 16, 3, padding=1))
            if defined_first == "main":
                self.short = nn.Conv2d(3, 16, 1)

        def forward(self, x):
            return self.short(x) + self.main(x) if defined_first == "shortcut" else self.main(x) + self.short(x)

    a = Block().eval()
    b = Block().eval()
    b.load_state_dict(a.state_dict())
    report = compare(a, b, batch((2, 3, 8, 8)))
    assert all(r.name_a == r.name_b for r in report.rows) and report.agree
