"""bnkit.torch.BatchNorm*(convention="torch") is torch.nn.BatchNorm*, bit for bit.

The torch convention runs torch.nn's own forward, so every comparison here is exact
(``torch.equal``): outputs, running statistics, batch counts and gradients, over a grid of
shapes, momentum (0, 0.1, 1, None), eps, affine/bias, track_running_stats and memory formats,
through several training steps and then inference. State dicts have the same keys and load
both ways (also through a file written with torch.save and read with weights_only=True).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import bnkit.torch as bt

SHAPES = {"N,C": (6, 3), "N,C,L": (4, 3, 5), "N,C,H,W": (3, 3, 4, 5), "N,C,D,H,W": (2, 3, 3, 2, 4)}
PAIRS = {2: (bt.BatchNorm1d, nn.BatchNorm1d), 3: (bt.BatchNorm1d, nn.BatchNorm1d)}
PAIRS |= {4: (bt.BatchNorm2d, nn.BatchNorm2d), 5: (bt.BatchNorm3d, nn.BatchNorm3d)}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
AFFINE = {
    "affine": {"affine": True},
    "no-affine": {"affine": False},
    "no-bias": {"affine": True, "bias": False},
}

# every shape in contiguous layout, the 4D/5D ones also in channels_last(_3d)
LAYOUTS = [(name, "contiguous") for name in SHAPES] + [
    (name, "channels_last") for name, shape in SHAPES.items() if len(shape) in CHANNELS_LAST
]


def _pair(shape, **kwargs):
    ours_cls, theirs_cls = PAIRS[len(shape)]
    ours = ours_cls(shape[1], convention="torch", **kwargs)
    theirs = theirs_cls(shape[1], **kwargs)
    theirs.load_state_dict(ours.state_dict())  # not needed at init; it is the same state
    # give gamma/beta non-trivial values so the affine part is exercised
    with torch.no_grad():
        for a, b in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
            if a is not None:
                a.uniform_(0.5, 1.5)
                b.copy_(a)
    return ours, theirs


def _input(shape, layout, seed, loc=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + loc).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=CHANNELS_LAST[len(shape)])
    return x


def _assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _run_steps(ours, theirs, shape, layout, steps=3):
    """Train both for ``steps`` forward+backward passes, then one eval pass; all exact."""
    params_ours = [p for p in ours.parameters()]
    params_theirs = [p for p in theirs.parameters()]
    for step in range(steps):
        x = _input(shape, layout, seed=step, loc=step)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = ours(x1), theirs(x2)
        assert torch.equal(y1, y2)
        assert y1.is_contiguous(memory_format=_memory_format(x)) == y2.is_contiguous(memory_format=_memory_format(x))
        dy = _input(shape, layout, seed=100 + step)
        g1 = torch.autograd.grad(y1, [x1, *params_ours], dy)
        g2 = torch.autograd.grad(y2, [x2, *params_theirs], dy)
        for a, b in zip(g1, g2, strict=True):
            assert torch.equal(a, b)
        _assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = _input(shape, layout, seed=999, loc=1.0)
    assert torch.equal(ours(x), theirs(x))
    _assert_same_state(ours, theirs)


def _memory_format(x):
    if x.dim() in CHANNELS_LAST and x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
        return CHANNELS_LAST[x.dim()]
    return torch.contiguous_format


@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("affine", list(AFFINE), ids=list(AFFINE))
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0, None], ids=lambda m: f"m={m}")
@pytest.mark.parametrize("shape_name, layout", LAYOUTS, ids=[f"{s}-{lay}" for s, lay in LAYOUTS])
def test_bit_identical_to_torch_nn(shape_name, layout, momentum, affine, track):
    shape = SHAPES[shape_name]
    ours, theirs = _pair(shape, momentum=momentum, track_running_stats=track, **AFFINE[affine])
    _run_steps(ours, theirs, shape, layout)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_eps_bit_identical(shape_name, eps):
    shape = SHAPES[shape_name]
    ours, theirs = _pair(shape, eps=eps)
    assert ours.eps == theirs.eps == eps
    _run_steps(ours, theirs, shape, "contiguous", steps=2)


def test_float64_bit_identical():
    shape = SHAPES["N,C,H,W"]
    ours = bt.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    theirs = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for step in range(3):
        x = _input(shape, "contiguous", step, loc=step, dtype=torch.float64)
        assert torch.equal(ours(x), theirs(x))
    _assert_same_state(ours, theirs)


def test_defaults_are_torch_nn_defaults():
    ours, theirs = bt.BatchNorm2d(4), nn.BatchNorm2d(4)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.convention.name == "torch"
    assert isinstance(ours, nn.BatchNorm2d) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert isinstance(bt.BatchNorm1d(2), nn.BatchNorm1d) and isinstance(bt.BatchNorm3d(2), nn.BatchNorm3d)
    # positional arguments in torch.nn's order
    positional = bt.BatchNorm1d(5, 1e-3, 0.3, False, False)
    assert (positional.eps, positional.momentum, positional.affine, positional.track_running_stats) == (
        1e-3,
        0.3,
        False,
        False,
    )
    assert positional.weight is None and positional.running_mean is None


@pytest.mark.parametrize("affine", list(AFFINE), ids=list(AFFINE))
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
def test_state_dict_keys_identical_and_checkpoints_load_both_ways(tmp_path, affine, track):
    kwargs = dict(track_running_stats=track, **AFFINE[affine])
    for convention in ("torch", "keras"):
        ours = bt.BatchNorm2d(3, convention=convention, **kwargs)
        theirs = nn.BatchNorm2d(3, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]

        # train one copy so the checkpoint holds non-default values, then load it the other way
        ours.train()(_input((4, 3, 2, 2), "contiguous", 0, loc=2.0))
        path = tmp_path / f"ours-{convention}.pt"
        torch.save(ours.state_dict(), path)
        theirs.load_state_dict(torch.load(path, weights_only=True))
        _assert_same_state(ours, theirs)

        theirs.train()(_input((4, 3, 2, 2), "contiguous", 1, loc=-1.0))
        fresh = bt.BatchNorm2d(3, convention=convention, **kwargs)
        fresh.load_state_dict(theirs.state_dict())
        _assert_same_state(fresh, theirs)


def test_keras_convention_training_output_is_torch_nns():
    """Both conventions normalise with the same batch statistics: the training output (and its
    gradients) of the Keras convention are torch.nn's (on NCHW memory), bit for bit; only the
    running update differs."""
    for shape_name, layout in LAYOUTS:
        shape = SHAPES[shape_name]
        ours = PAIRS[len(shape)][0](3, eps=1e-5, convention="keras")
        theirs = PAIRS[len(shape)][1](3, eps=1e-5)
        x = _input(shape, layout, 5, loc=3.0)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        # on channels_last the Keras convention takes torch.nn's accurate NCHW path (the
        # channels_last CPU kernel sums in one float32 pass; see test_vs_keras)
        y1, y2 = ours(x1), theirs(x2.contiguous())
        assert torch.equal(y1, y2)
        dy = _input(shape, layout, 6)
        for a, b in zip(
            torch.autograd.grad(y1, [x1, ours.weight, ours.bias], dy),
            torch.autograd.grad(y2, [x2, theirs.weight, theirs.bias], dy),
            strict=True,
        ):
            assert torch.equal(a, b)
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
        assert not torch.equal(ours.running_var, theirs.running_var)  # biased vs unbiased, m=.99 vs .1


def test_train_eval_toggle_and_many_batches():
    """Alternating train/eval and a long cumulative average stay exact."""
    ours, theirs = _pair((5, 3, 4), momentum=None)
    for step, training in zip(range(8), itertools.cycle([True, True, False]), strict=False):
        ours.train(training)
        theirs.train(training)
        x = _input((5, 3, 4), "contiguous", step, loc=step % 3)
        assert torch.equal(ours(x), theirs(x))
    _assert_same_state(ours, theirs)
    assert int(ours.num_batches_tracked) == 6


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 3, 1, 2, 2)], ids=str)
def test_empty_batch_as_torch_nn(shape, convention):
    """An empty batch (N=0) in training: torch.nn returns an empty output, counts the batch and
    keeps the running statistics; both conventions do the same (the Keras convention used to
    divide by n = 0)."""
    ours, theirs = _pair(shape)
    ours = type(ours)(3, convention=convention)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for a, b in ((ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
            a.fill_(2.0)
            b.fill_(2.0)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        x1, x2 = torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
        y1, y2 = ours(x1), theirs(x2)
        assert y1.shape == y2.shape == shape
        y1.sum().backward()
        y2.sum().backward()
        assert x1.grad.shape == x2.grad.shape
        assert torch.equal(ours.weight.grad, theirs.weight.grad)
        _assert_same_state(ours, theirs)
    assert int(ours.num_batches_tracked) == 1
