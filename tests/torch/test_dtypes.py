"""Input dtypes (float64, float32, bfloat16, float16) and memory formats, both conventions.

Each output is compared with the NumPy float64 reference run on the very same values (the
half-precision input upcast exactly), so the error measured is bnkit's alone. Tolerances and
what was measured on this grid (3 training steps then eval, (N,C), (N,C,H,W), (N,C,D,H,W),
contiguous and channels_last):

* float64: rtol=1e-12 (float64 rounding; statistics computed in float64).
* float32: rtol=1e-6 plus atol=1e-6 for outputs near 0 (outputs are O(1); worst 6.5e-7 abs).
* bfloat16 / float16 outputs: the statistics and the normalisation are computed in float32 and
  the result is rounded once to the output dtype, so the error is at most the unit roundoff
  u of that dtype relative to the exact value: u = 2**-8 = 3.9e-3 for bfloat16 (measured
  3.82e-3, i.e. ~1.6e-2 absolute for outputs up to ~4) and u = 2**-11 = 4.9e-4 for float16
  (measured 4.85e-4, ~1.9e-3 absolute). atol=1e-5 covers outputs so close to 0 that the
  float32 error dominates.
* Running statistics stay float32 for half inputs and are as accurate as for float32 input:
  rtol=1e-6 (measured 2.6e-7 relative for the variance, 1.4e-7 absolute for the mean).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnkit.torch as bt
from bnkit import reference as ref

LAYERS = {2: (bt.BatchNorm1d, nn.BatchNorm1d), 4: (bt.BatchNorm2d, nn.BatchNorm2d)}
LAYERS[5] = (bt.BatchNorm3d, nn.BatchNorm3d)
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
SHAPES = {"N,C": (64, 4), "N,C,H,W": (8, 4, 6, 6), "N,C,D,H,W": (4, 4, 3, 3, 3)}
LAYOUTS = [(name, "contiguous") for name in SHAPES] + [
    (name, "channels_last") for name, shape in SHAPES.items() if len(shape) in CHANNELS_LAST
]
# dtype -> (rtol, atol) for outputs against the float64 reference (see the module docstring)
OUTPUT_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2.0**-8, 1e-5),
    torch.float16: (2.0**-11, 1e-5),
}
STATS_RTOL, STATS_ATOL = 1e-6, 1e-6  # float32 running statistics; atol for means near 0


def _np64(t):
    return t.detach().to(torch.float64).numpy()


def _input(shape, layout, dtype, g, loc):
    x = (torch.randn(shape, generator=g) * 3 + loc).to(dtype)
    return x.to(memory_format=CHANNELS_LAST[len(shape)]) if layout == "channels_last" else x


def _assert_within(actual, expected, rtol, atol, what):
    np.testing.assert_allclose(_np64(actual), expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("dtype", list(OUTPUT_TOL), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("shape_name, layout", LAYOUTS, ids=[f"{s}-{lay}" for s, lay in LAYOUTS])
def test_dtype_against_float64_reference(shape_name, layout, convention, dtype):
    shape = SHAPES[shape_name]
    channels = shape[1]
    # float64 layers hold float64 parameters and statistics; every other input dtype
    # goes through a default (float32) layer, whose float32 statistics serve half inputs too
    layer_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = LAYERS[len(shape)][0](channels, momentum=0.5, convention=convention, dtype=layer_dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(generator=g)
    gamma, beta = _np64(layer.weight), _np64(layer.bias)
    rtol, atol = OUTPUT_TOL[dtype]
    running = ref.RunningStats(np.zeros(channels), np.ones(channels), 0)
    for step in range(3):
        x = _input(shape, layout, dtype, g, loc=step)
        y = layer(x)
        assert y.dtype == dtype
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])
        y_ref, stats = ref.forward_train(_np64(x), gamma, beta, layer.eps)
        running = ref.update_running(running, stats, layer.momentum, convention)
        _assert_within(y, y_ref, rtol, atol, f"training output, step {step}")
        assert layer.running_mean.dtype == layer.running_var.dtype == layer_dtype
        stats_rtol = 1e-12 if dtype == torch.float64 else STATS_RTOL
        _assert_within(layer.running_mean, running.mean, stats_rtol, STATS_ATOL, "running mean")
        _assert_within(layer.running_var, running.var, stats_rtol, 0.0, "running var")
    layer.eval()
    x = _input(shape, layout, dtype, g, loc=1.0)
    y = layer(x)
    running_mean, running_var = _np64(layer.running_mean), _np64(layer.running_var)
    y_ref = ref.forward_eval(_np64(x), running_mean, running_var, gamma, beta, layer.eps)
    _assert_within(y, y_ref, rtol, atol, "inference output")
    assert y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape_name, layout", LAYOUTS, ids=[f"{s}-{lay}" for s, lay in LAYOUTS])
def test_half_precision_as_torch_nn(shape_name, layout, dtype):
    """Half inputs: the torch convention is torch.nn bit for bit (outputs, float32 running
    statistics, gradients and their memory format), and the Keras convention's training output
    and gradients are torch.nn's too (the same fused kernel and batch statistics)."""
    shape = SHAPES[shape_name]
    ours_cls, nn_cls = LAYERS[len(shape)]
    for convention in ("torch", "keras"):
        ours = ours_cls(shape[1], eps=1e-3, convention=convention)
        theirs = nn_cls(shape[1], eps=1e-3)
        theirs.load_state_dict(ours.state_dict())
        g = torch.Generator().manual_seed(1)
        x = _input(shape, layout, dtype, g, loc=2.0)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        # the Keras convention takes torch.nn's NCHW path for channels_last CPU input (accurate sums)
        y1, y2 = ours(x1), theirs(x2 if convention == "torch" else x2.contiguous())
        assert torch.equal(y1, y2) and y1.stride() == x1.stride()
        dy = _input(shape, layout, dtype, g, loc=0.0)
        y1.backward(dy)
        y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad) and x1.grad.dtype == dtype
        assert x1.grad.stride() == x1.stride()
        assert torch.equal(ours.weight.grad, theirs.weight.grad) and ours.weight.grad.dtype == torch.float32
        assert ours.running_var.dtype == torch.float32
        if convention == "torch":
            assert torch.equal(ours.running_mean, theirs.running_mean)
            assert torch.equal(ours.running_var, theirs.running_var)


def test_channels_last_output_and_contiguous_input_give_the_same_values():
    for convention in ("torch", "keras"):
        layer = bt.BatchNorm2d(4, convention=convention)
        x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * 2 + 1
        y_cl = layer(x.to(memory_format=torch.channels_last))
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        y = layer(x)
        assert y.is_contiguous()
        # the same values up to float32 summation order in the statistics
        torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
