"""BatchNormAct2d / BatchNormAddAct2d on the CPU (native path) against torch.nn + ReLU."""

from __future__ import annotations

import pytest
import torch

from bnkit.torch import BatchNorm2d, BatchNormAct2d, BatchNormAddAct2d


def pair(cls, **kwargs):
    """A fused module and a torch.nn.BatchNorm2d with the same random parameters."""
    torch.manual_seed(0)
    ours = cls(4, **kwargs)
    theirs = torch.nn.BatchNorm2d(4, momentum=ours.momentum if ours.convention.name == "torch" else 0.1)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(4) + 0.5)
        ours.bias.copy_(torch.randn(4))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_bn_act_matches_torch_nn_batchnorm_then_relu_forward_backward_and_running_stats():
    ours, theirs = pair(BatchNormAct2d)
    for step in range(2):
        x = torch.randn(3, 4, 5, 5) + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), torch.relu(theirs(x2))
        dy = torch.randn_like(x)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # the same native ops
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == 2
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)))


def test_bn_add_act_matches_torch_nn_with_residual_gradient():
    ours, theirs = pair(BatchNormAddAct2d)
    x = torch.randn(3, 4, 5, 5)
    r = torch.randn(3, 4, 5, 5)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    y1 = ours(x1, r1)
    y2 = torch.relu(theirs(x2) + r2)
    dy = torch.randn_like(x)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=0, atol=0)
    assert 0 < int((y1 > 0).sum()) < y1.numel()


def test_keras_convention_and_no_activation():
    x = torch.randn(3, 4, 2, 2)
    fused = BatchNormAct2d(4, convention="keras", act=None)
    plain = BatchNorm2d(4, convention="keras")
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=0, atol=0)
    assert fused.eps == 1e-3 and fused.momentum == 0.99
    assert "act=None" in repr(fused) and "convention='keras'" in repr(fused)


def test_state_dict_is_batchnorm2d_both_ways():
    fused = BatchNormAddAct2d(4)
    assert isinstance(fused, torch.nn.BatchNorm2d)
    plain = torch.nn.BatchNorm2d(4)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    fused.load_state_dict(plain.state_dict())


def test_clear_errors():
    with pytest.raises(ValueError, match="act must be 'relu' or None, got 'gelu'"):
        BatchNormAct2d(4, act="gelu")
    m = BatchNormAddAct2d(4)
    with pytest.raises(
        ValueError, match=r"residual must have the input's shape \(2, 4, 3, 3\), got \(2, 4, 3, 2\)"
    ):
        m(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
