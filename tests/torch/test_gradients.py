"""Gradients of bnkit.torch's layers in both conventions, train and eval.

* ``torch.autograd.gradcheck`` in float64: autograd's analytic Jacobian equals finite
  differences (its default tolerances, atol=1e-5 and rtol=1e-3, are sized for float64 central
  differences).
* Autograd's gradients equal ``bnkit.reference.backward_train/backward_eval`` (NumPy float64,
  closed form): rtol=1e-10 / atol=1e-12, i.e. float64 rounding of two different summation orders.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

import bnkit.torch as bt
from bnkit import reference as ref

SHAPES = {"N,C": (5, 3), "N,C,L": (3, 2, 4), "N,C,H,W": (2, 2, 3, 3), "N,C,D,H,W": (2, 2, 2, 2, 3)}
LAYERS = {2: bt.BatchNorm1d, 3: bt.BatchNorm1d, 4: bt.BatchNorm2d, 5: bt.BatchNorm3d}
CONVENTIONS = ["torch", "keras"]


def _layer(shape, convention, seed=0):
    layer = LAYERS[len(shape)](shape[1], eps=1e-3, convention=convention, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
    return layer


def _warm_up(layer, shape, steps=3):
    """A few training batches so eval() uses non-trivial running statistics."""
    g = torch.Generator().manual_seed(42)
    layer.train()
    for step in range(steps):
        layer(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + step)


def _x(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_gradcheck(shape_name, convention, mode):
    shape = SHAPES[shape_name]
    layer = _layer(shape, convention)
    if mode == "eval":
        _warm_up(layer, shape)
        layer.eval()
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (_x(shape), weight, bias))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gradgradcheck_training(convention):
    """Second derivatives too (double backward through the batch statistics)."""
    shape = SHAPES["N,C,L"]
    layer = _layer(shape, convention)

    def fn(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(fn, (_x(shape), weight, bias))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_autograd_matches_reference_backward(shape_name, convention, mode):
    shape = SHAPES[shape_name]
    layer = _layer(shape, convention, seed=3)
    if mode == "eval":
        _warm_up(layer, shape)
        layer.eval()
    x = _x(shape, seed=4)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    running = (layer.running_mean.numpy().copy(), layer.running_var.numpy().copy())
    y = layer(x)
    dx, dgamma, dbeta = (t.numpy() for t in torch.autograd.grad(y, (x, layer.weight, layer.bias), dy))

    gamma, x_np, dy_np = layer.weight.detach().numpy(), x.detach().numpy(), dy.numpy()
    if mode == "train":
        expected = ref.backward_train(dy_np, x_np, gamma, eps=layer.eps, axis=1)
    else:
        expected = ref.backward_eval(dy_np, x_np, *running, gamma, eps=layer.eps, axis=1)
    np.testing.assert_allclose(dx, expected.dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, expected.dgamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, expected.dbeta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_backward_over_consecutive_steps_and_running_stats_get_no_grad(convention):
    """Several forward/backward steps (an optimizer loop) work, and running statistics are
    buffers outside the graph."""
    shape = SHAPES["N,C,H,W"]
    layer = _layer(shape, convention)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        x = _x(shape, seed=10 + step)
        y = layer(x)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        expected = ref.backward_train(
            np.arange(y.numel(), dtype=np.float64).reshape(shape),
            x.detach().numpy(),
            layer.weight.detach().numpy(),
            eps=layer.eps,
        )
        np.testing.assert_allclose(x.grad.numpy(), expected.dx, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.weight.grad.numpy(), expected.dgamma, rtol=1e-10, atol=1e-10)
        opt.step()
        assert not layer.running_mean.requires_grad and layer.running_mean.grad_fn is None
        assert not layer.running_var.requires_grad and layer.running_var.grad_fn is None
