"""bnkit.torch batch renormalization (convention="keras") against Keras 3's own
``BatchNormalization(renorm=True)`` on its torch backend, over several training steps.

Both layers take the same NCHW torch tensor (Keras with ``axis=1``). At every step the outputs,
the input, gamma and beta gradients, and all five statistics (``moving_mean``,
``moving_variance``, ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``) are compared, with
the renorm clipping binding and with no clipping; then inference.

Tolerances (float32, well-conditioned data: means up to 1.5, standard deviations 1 to 3): rtol=1e-6
everywhere, plus an atol for entries near 0, where a relative bound means nothing: outputs and dx
4 float32 ulps of their largest magnitude (an entry near 0 is the difference of O(max) terms);
means 4e-7 (means of values of size ~4); dgamma and dbeta 1e-6 times the sum of their terms'
magnitudes (sums of terms of both signs). The layers round differently: Keras computes the batch
variance as E[x^2] - E[x]^2 and the output in separate element-wise ops, bnkit with PyTorch's fused
kernel and Welford statistics.

What E[x^2] - E[x]^2 costs Keras on offset data (unit standard deviation, mean ``loc``, float32;
measured here, relative error of the batch standard deviation against float64): loc 10: 1e-5,
loc 100: 4e-4, loc 1000: 7e-2, loc 1e4: NaN. bnkit stays within 1e-7 (test_offset_data_...).
Keras' input gradient, taken through the same E[x^2] - E[x]^2, loses about (mean / std)^2 float32
ulps: at mean 3, std 1, 2e-6 of max|dx| against float64 while bnkit's stays within 1e-7, which is
why the data here keep |mean| <= 1.5 std.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

keras = pytest.importorskip("keras")

from _keras_pairs import AFFINE, keras_pair  # noqa: E402

import bnkit.torch as bt  # noqa: E402
from bnkit import reference as ref  # noqa: E402

RTOL = 1e-6
ULPS = 4
ATOL_MEAN = 4e-7
LEARNING_RATE = 0.05
SHAPES = {"N,C": (8, 3), "N,C,L": (4, 3, 5), "N,C,H,W": (3, 3, 4, 5), "N,C,D,H,W": (2, 3, 3, 2, 4)}
BINDING = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}
CLIPPINGS = {"unclipped": None, "clipped": BINDING, "rmin-only": {"rmin": 0.95}}
STATS = {
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
    "running_stddev": "moving_stddev",
    "renorm_mean": "renorm_mean",
    "renorm_stddev": "renorm_stddev",
}


def _pair(shape, momentum, renorm_momentum, clipping, eps=1e-3, affine="affine"):
    renorm = {"renorm": True, "renorm_clipping": clipping, "renorm_momentum": renorm_momentum}
    return keras_pair(shape, momentum, eps, affine, **renorm)


def _close(actual, expected, atol, what):
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=RTOL, atol=atol, msg=lambda detail: f"{what}: {detail}"
    )


def _ulps(expected):
    return ULPS * torch.finfo(torch.float32).eps * float(expected.detach().abs().max())


def _params(layer, keras_layer=False):
    if keras_layer:
        return [v.value for v in (layer.gamma, layer.beta) if v is not None]
    return [p for p in (layer.weight, layer.bias) if p is not None]


def _correction(theirs, x):
    """Keras' r and d for batch ``x`` (float64, from Keras' renorm statistics before the step)."""
    stats = ref.batch_stats(x.double().numpy(), axis=1)
    renorm_mean, renorm_stddev = (np.asarray(w.numpy(), dtype=np.float64) for w in (theirs.renorm_mean,
                                                                                    theirs.renorm_stddev))
    return ref.renorm_correction(stats, renorm_mean, renorm_stddev, theirs.epsilon, theirs.renorm_clipping)


def _train_then_infer(ours, theirs, shape, steps=4, layout="contiguous"):
    """Returns whether any clipping bound bound (r or d at a bound) during the steps."""
    g = torch.Generator().manual_seed(11)
    bound = False
    for step in range(steps):
        x = torch.randn(shape, generator=g) * (1 + step % 3) + 0.5 * step
        dy = torch.randn(shape, generator=g)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        r, d = _correction(theirs, x)
        bounds = theirs.renorm_clipping
        bound |= any(
            bounds.get(key) is not None and np.isclose(value, bounds[key], rtol=1e-12).any()
            for key, value in (("rmax", r), ("rmin", r), ("dmax", np.abs(d)))
        )
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = ours(x1), theirs(x2, training=True)
        _close(y1, y2, _ulps(y2), f"training output, step {step}")
        grads_ours = torch.autograd.grad(y1, [x1, *_params(ours)], dy)
        grads_keras = torch.autograd.grad(y2, [x2, *_params(theirs, True)], dy)
        _close(grads_ours[0], grads_keras[0], _ulps(grads_keras[0]), f"dx, step {step}")
        # dgamma = r * sum(dy * xhat) + d * sum(dy): bound by the magnitudes of its terms
        dims = [i for i in range(x.dim()) if i != 1]
        x64 = x.double()
        xhat = (x64 - x64.mean(dims, keepdim=True)) / x64.std(dims, correction=0, keepdim=True)
        scale = float(max(np.abs(r).max(), np.abs(d).max(), 1.0))
        atol = RTOL * scale * float((dy.double().abs() * xhat.abs().clamp_min(1.0)).sum(dims).max())
        for a, b in zip(grads_ours[1:], grads_keras[1:], strict=True):
            _close(a, b, atol, f"dgamma/dbeta, step {step}")
        for ours_name, keras_name in STATS.items():
            atol = ATOL_MEAN if ours_name.endswith("mean") else 0.0
            _close(getattr(ours, ours_name), getattr(theirs, keras_name).value, atol, f"{keras_name}, step {step}")
        with torch.no_grad():  # the same SGD step on both sides
            for p_ours, g_ours, p_keras in zip(_params(ours), grads_ours[1:], _params(theirs, True), strict=True):
                p_ours.sub_(LEARNING_RATE * g_ours)
                p_keras.copy_(p_ours)
    ours.eval()
    x = torch.randn(shape, generator=g) + 1
    y_keras = theirs(x, training=False)
    _close(ours(x), y_keras, _ulps(y_keras), "inference output")
    return bound


@pytest.mark.parametrize("clipping", list(CLIPPINGS))
@pytest.mark.parametrize("momenta", [(0.9, 0.7), (0.99, 0.99), (0.0, 0.5), (1.0, 0.0)], ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_matches_keras_renorm_over_steps(shape_name, momenta, clipping):
    shape = SHAPES[shape_name]
    ours, theirs = _pair(shape, *momenta, CLIPPINGS[clipping])
    bound = _train_then_infer(ours, theirs, shape)
    assert bound == (clipping != "unclipped")  # clipping active where given, inactive where not


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("affine", list(AFFINE))
def test_matches_keras_renorm_center_scale_eps(affine, eps):
    shape = SHAPES["N,C,H,W"]
    ours, theirs = _pair(shape, 0.8, 0.6, BINDING, eps, affine)
    _train_then_infer(ours, theirs, shape)


def test_matches_keras_renorm_channels_last():
    shape = SHAPES["N,C,H,W"]
    ours, theirs = _pair(shape, 0.8, 0.6, BINDING)
    _train_then_infer(ours, theirs, shape, layout="channels_last")


def test_defaults_are_keras_defaults():
    ours = bt.BatchNorm2d(3, convention="keras", renorm=True)
    theirs = keras.layers.BatchNormalization(renorm=True)
    assert (ours.eps, ours.momentum, ours.renorm_momentum) == (theirs.epsilon, theirs.momentum, theirs.renorm_momentum)
    assert ours.renorm_clipping == theirs.renorm_clipping == {}
    theirs = keras.layers.BatchNormalization(axis=1, renorm=True)
    theirs.build(SHAPES["N,C,H,W"])
    _train_then_infer(ours, theirs, SHAPES["N,C,H,W"])


def test_one_value_per_channel_matches_keras():
    """Keras computes it (variance 0, r = sqrt(eps) / renorm_stddev); PyTorch's kernel would refuse it."""
    ours, theirs = _pair((1, 3), 0.9, 0.8, None)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(1, 3, generator=g) * 2
        y_keras = theirs(x, training=True)
        _close(ours(x), y_keras, _ulps(y_keras), "output")
        for ours_name, keras_name in STATS.items():
            _close(getattr(ours, ours_name), getattr(theirs, keras_name).value, ATOL_MEAN, keras_name)


def test_offset_data_costs_keras_accuracy_not_bnkit():
    """Mean 100, standard deviation 1: Keras' E[x^2] - E[x]^2 loses ~4e-4 of the batch standard
    deviation in float32, and so of its renorm and moving statistics; bnkit's stay within 1e-6 of float64."""
    shape = (16, 3, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) + 100
    clipping = {"dmax": 0.0}  # d = 0: the output is gamma * r * xhat + beta, of order 1
    ours, theirs = _pair(shape, 0.0, 0.0, clipping)
    y_ours, y_keras = ours(x), theirs(x, training=True)
    y_ref, stats, _, _ = ref.forward_renorm_train(x.double().numpy(), np.zeros(3), np.ones(3),
                                                  ours.weight.detach().numpy(), ours.bias.detach().numpy(),
                                                  ours.eps, 1, clipping)
    truth = np.sqrt(stats.var + ours.eps)
    err_ours = np.abs(ours.renorm_stddev.numpy() / truth - 1).max()
    err_keras = np.abs(np.asarray(theirs.renorm_stddev.numpy()) / truth - 1).max()
    assert err_ours < 1e-6 and err_keras > 1e-4
    scale = np.abs(y_ref).max()
    assert np.abs(y_ours.detach().numpy() - y_ref).max() < 1e-6 * scale
    # Keras' output keeps its accuracy here: unclipped, r = s / renorm_stddev cancels the error of s
    assert np.abs(y_keras.detach().numpy() - y_ref).max() < 1e-6 * scale
    err_var = np.abs(np.asarray(theirs.moving_variance.numpy()) / stats.var - 1).max()
    assert err_var > 1e-4 and np.abs(ours.running_var.numpy() / stats.var - 1).max() < 1e-6
