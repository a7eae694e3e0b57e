"""bnkit.torch.eager_ops: the ATen calls of a loaded ``.pt2`` program as eager PyTorch calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from bnkit.convert import UnsupportedLayerError, torch_to_keras
from bnkit.io import load_model, save_model
from bnkit.keras import keras
from bnkit.torch.eager_ops import eager_graph

aten = torch.ops.aten


def _graph(*calls):
    """x -> each (target, extra args, kwargs) applied to the previous value in turn."""
    graph = fx.Graph()
    x = value = graph.placeholder("x")
    nodes = []
    for target, args, kwargs in calls:
        value = graph.call_function(target, (value, *args), kwargs)
        nodes.append(value)
    return graph, x, nodes


def test_in_place_operators_become_out_of_place_only_when_their_input_is_not_read_after():
    graph, x, (relu,) = _graph((aten.relu_.default, (), {}))
    graph.output(relu)
    eager_graph(graph, unsafe_inputs=frozenset())  # the caller does not read x again
    assert relu.target is torch.relu

    graph, x, (relu,) = _graph((aten.relu_.default, (), {}))
    graph.output(relu)
    eager_graph(graph)  # by default, the caller may read x again
    assert relu.target is aten.relu_.default

    graph, x, (relu,) = _graph((aten.relu_.default, (), {}))
    graph.output(graph.call_function(aten.add.Tensor, (relu, x)))  # reads x, which relu_ wrote
    eager_graph(graph, unsafe_inputs=frozenset())
    assert relu.target is aten.relu_.default


def test_calls_whose_eager_twin_reads_arguments_differently_stay():
    graph, x, (add, view, norm) = _graph(
        (aten.add.Tensor, (1.0,), {"alpha": 2}),  # operator.add takes no alpha
        (aten.view.default, ([2, -1],), {}),
        (aten.layer_norm.default, ([4], None, None, 1e-5, True), {}),
    )
    graph.output(norm)
    eager_graph(graph)
    assert add.target is aten.add.Tensor
    assert (view.op, view.target) == ("call_method", "view")
    assert norm.target is F.layer_norm and norm.args[1:] == ([4], None, None, 1e-5)


class _Block(nn.Module):
    """Channel shuffle with the batch read from the input, in-place hardswish, chunk, functional
    layer norm over the channels, squeeze-and-excitation scaling and a residual ``+=``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.Hardswish(inplace=True)
        self.norm_weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.act(self.conv(x))
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        a, b = y.chunk(2, dim=1)
        y = torch.cat([b, a], dim=1)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (c,), self.norm_weight, None, 1e-6).permute(0, 3, 1, 2)
        y = y * F.hardsigmoid(y.mean((2, 3), keepdim=True))
        y += x
        return F.silu(y)


def test_a_loaded_program_runs_as_exported_on_any_batch_and_converts_exactly(tmp_path):
    torch.manual_seed(0)
    module = _Block().eval()
    save_model(module, tmp_path / "block.pt2", input_shape=(4, 5, 7))
    program = load_model(tmp_path / "block.pt2")
    x = torch.randn(3, 4, 5, 7)  # exported with a batch of 2
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(program(x), expected)
    converted = torch_to_keras(program, (4, 5, 7))
    assert converted.name == "_Block"  # the user's class, not the loaded program's GraphModule
    got = keras.ops.convert_to_numpy(converted(x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected.numpy(), rtol=1e-5, atol=1e-5 * expected.abs().max())


class _Slices(nn.Module):
    """Slices (aten.slice) and an integer index (aten.select) on several axes, negative bounds, ``...``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        y = self.conv(x)
        picked = torch.cat([y[:, 1:4], y[:, -2:]], 1) * x[:, 0:1] + y[:, 2, 1:2].unsqueeze(1)
        return picked + y[..., 1:3, :4].mean((2, 3), keepdim=True)[:, :1]


def test_slices_and_indices_of_a_loaded_program_convert_exactly(tmp_path):
    torch.manual_seed(0)
    module = _Slices().eval()
    save_model(module, tmp_path / "slices.pt2", input_shape=(3, 4, 5))
    program = load_model(tmp_path / "slices.pt2")
    x = torch.randn(3, 3, 4, 5)
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(program(x), expected)
    got = keras.ops.convert_to_numpy(torch_to_keras(program, (3, 4, 5))(x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected.numpy(), rtol=1e-5, atol=1e-5 * expected.abs().max())


class _Cumulative(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_an_operator_without_a_converter_is_refused_by_its_name_and_its_layer(tmp_path):
    save_model(nn.Sequential(nn.ReLU(), _Cumulative()), tmp_path / "cumsum.pt2", input_shape=(3, 4))
    with pytest.raises(
        UnsupportedLayerError, match=r"aten\.cumsum\.default\(\) in the forward of '1' \(_Cumulative\)"
    ) as e:
        torch_to_keras(load_model(tmp_path / "cumsum.pt2"), (3, 4))
    assert "\n" not in str(e.value)


class _WritesViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y[:, :2].relu_()  # writes y through a slice
        y.view(y.size(0), -1).mul_(2)  # and through a view
        return y + 1


class _Sigmoid(nn.Module):
    def forward(self, x):
        return x.sigmoid_()


class _CallerReadsAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.act = _WritesViews(), _Sigmoid()

    def forward(self, x):
        y = self.block(x)
        z = self.act(y[:, 1:])  # a sub-program writes a view of y, which is read below
        return y * 2 + z.sum()


def test_writes_through_views_and_by_a_called_layer_stay_in_place(tmp_path):
    torch.manual_seed(0)
    module = _CallerReadsAgain().eval()
    save_model(module, tmp_path / "views.pt2", input_shape=(3, 2, 2))
    program = load_model(tmp_path / "views.pt2")
    x = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(program(x), module(x))
    targets = {n.target for sub in (program.block, program.act) for n in sub.graph.nodes}
    assert {aten.relu_.default, aten.mul_.Tensor, aten.sigmoid_.default} <= targets
    with pytest.raises(UnsupportedLayerError, match=r"aten\.\w+\.\w+\(\) in the forward of 'block' \(_WritesViews\)"):
        torch_to_keras(program, (3, 2, 2))
