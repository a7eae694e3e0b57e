"""bnkit.reference's batch renormalization, the spec of bnkit's renorm layers: checked against an
independent float64 autograd transcription of Keras 3's algorithm, finite differences with r and d
held constant, and its limiting cases (no clipping room: plain batch norm; momentum 1: the batch).

Tolerances: float64 throughout; the implementations differ in summation order only (rtol=1e-12),
finite differences carry ~h^2 truncation and ~eps64/h rounding (rtol=1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _numeric import finite_difference
from bnkit import reference as ref

RTOL, ATOL = 1e-12, 1e-12
SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 5), (2, 3, 2, 3, 2)]
CLIPPINGS = {
    "none": {},
    "binding": {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2},
    "rmax-only": {"rmax": 1.5},
    "explicit-None": {"rmax": None, "rmin": None, "dmax": None},
}


def _batch(shape, seed, loc=1.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _keras_algorithm(x, dy, gamma, beta, renorm_mean, renorm_stddev, eps, clipping):
    """Keras 3's renorm training step, written out in torch float64 autograd (channel axis 1)."""
    x = torch.from_numpy(x).requires_grad_(True)
    gamma = torch.from_numpy(gamma).requires_grad_(True)
    beta = torch.from_numpy(beta).requires_grad_(True)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *(1,) * (x.dim() - 2))
    mean = x.mean(dims)
    var = ((x - mean.reshape(shape)) ** 2).mean(dims)
    stddev = torch.sqrt(var + eps)
    floor = torch.maximum(torch.from_numpy(renorm_stddev), torch.tensor(eps, dtype=torch.float64).sqrt())
    r = (stddev / floor).detach()
    d = ((mean - torch.from_numpy(renorm_mean)) / floor).detach()
    if clipping.get("rmin") is not None:
        r = torch.maximum(r, torch.tensor(clipping["rmin"], dtype=torch.float64))
    if clipping.get("rmax") is not None:
        r = torch.minimum(r, torch.tensor(clipping["rmax"], dtype=torch.float64))
    if clipping.get("dmax") is not None:
        d = torch.clamp(d, -clipping["dmax"], clipping["dmax"])
    xhat = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    y = xhat * (r * gamma).reshape(shape) + (d * gamma + beta).reshape(shape)
    grads = torch.autograd.grad(y, (x, gamma, beta), torch.from_numpy(dy))
    return y.detach().numpy(), r.numpy(), d.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("clipping", list(CLIPPINGS), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_keras_algorithm(shape, clipping):
    bounds = CLIPPINGS[clipping]
    c = shape[1]
    x, dy = _batch(shape, 1), _batch(shape, 2, loc=0.0)
    gamma, beta = np.linspace(0.5, 2.0, c), np.linspace(-1, 1, c)
    renorm_mean, renorm_stddev = np.linspace(-0.5, 2.0, c), np.linspace(0.5, 3.0, c)
    eps = 1e-3
    y, stats, r, d = ref.forward_renorm_train(x, renorm_mean, renorm_stddev, gamma, beta, eps, 1, bounds)
    y_k, r_k, d_k, grads_k = _keras_algorithm(x, dy, gamma, beta, renorm_mean, renorm_stddev, eps, bounds)
    np.testing.assert_allclose(y, y_k, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r, r_k, rtol=RTOL)
    np.testing.assert_allclose(d, d_k, rtol=RTOL, atol=ATOL)
    grads = ref.backward_renorm_train(dy, x, renorm_mean, renorm_stddev, gamma, eps, 1, bounds)
    for ours, theirs in zip(grads, grads_k, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    if clipping == "binding":  # the bounds hold and bind on this data
        assert r.min() >= 0.9 and r.max() <= 1.1 and np.abs(d).max() <= 0.2
        assert np.isclose(r, 1.1).any() or np.isclose(r, 0.9).any()
        assert np.isclose(np.abs(d), 0.2).any()


def test_channel_axis_last_equals_channel_axis_one():
    x = _batch((3, 2, 5, 4), 3)
    args = (np.array([0.5, -0.5]), np.array([2.0, 0.5]), np.array([1.5, 0.5]), np.array([0.1, 0.2]), 1e-3)
    y1, _, r1, d1 = ref.forward_renorm_train(x, *args[:4], eps=args[4], axis=1, clipping={"rmax": 1.2})
    x_last = np.moveaxis(x, 1, -1)
    y2, _, r2, d2 = ref.forward_renorm_train(x_last, *args[:4], eps=args[4], axis=-1, clipping={"rmax": 1.2})
    np.testing.assert_allclose(np.moveaxis(y2, -1, 1), y1, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(d1, d2)


def test_backward_is_the_gradient_with_r_and_d_held_constant():
    """Batch norm with the weight r*gamma and bias d*gamma + beta, r and d frozen at this batch's."""
    shape, eps = (4, 2, 3), 1e-3
    x, dy = _batch(shape, 4), _batch(shape, 5, loc=0.0)
    gamma, beta = np.array([1.5, 0.7]), np.array([0.2, -0.4])
    renorm_mean, renorm_stddev = np.array([1.0, 2.0]), np.array([1.5, 3.0])
    clipping = {"rmax": 1.2, "dmax": 0.3}
    _, _, r, d = ref.forward_renorm_train(x, renorm_mean, renorm_stddev, gamma, beta, eps, 1, clipping)

    def loss(x_, gamma_, beta_):
        return float((ref.forward_train(x_, gamma_ * r, gamma_ * d + beta_, eps)[0] * dy).sum())

    grads = ref.backward_renorm_train(dy, x, renorm_mean, renorm_stddev, gamma, eps, 1, clipping)
    numeric = (
        finite_difference(lambda a: loss(a, gamma, beta), x),
        finite_difference(lambda a: loss(x, a, beta), gamma),
        finite_difference(lambda a: loss(x, gamma, a), beta),
    )
    for ours, fd in zip(grads, numeric, strict=True):
        np.testing.assert_allclose(ours, fd, rtol=1e-6, atol=1e-7)


def test_no_room_to_correct_is_plain_batch_norm():
    """rmin = rmax = 1 and dmax = 0 leave r = 1, d = 0: batch norm, its gradient included."""
    x, dy = _batch((5, 3, 4), 6), _batch((5, 3, 4), 7)
    gamma, beta = np.array([1.5, 0.7, 1.0]), np.array([0.2, -0.4, 0.0])
    clipping = {"rmin": 1.0, "rmax": 1.0, "dmax": 0.0}
    y, _, r, d = ref.forward_renorm_train(x, np.ones(3), np.full(3, 5.0), gamma, beta, 1e-5, 1, clipping)
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    np.testing.assert_array_equal(y, ref.forward_train(x, gamma, beta, 1e-5)[0])
    for ours, plain in zip(
        ref.backward_renorm_train(dy, x, np.ones(3), np.full(3, 5.0), gamma, 1e-5, 1, clipping),
        ref.backward_train(dy, x, gamma, 1e-5),
        strict=True,
    ):
        np.testing.assert_allclose(ours, plain, rtol=RTOL, atol=ATOL)


def test_renorm_stddev_below_sqrt_eps_is_floored():
    stats = ref.batch_stats(_batch((6, 2), 8))
    r, d = ref.renorm_correction(stats, np.zeros(2), np.zeros(2), eps=1e-2)
    np.testing.assert_allclose(r, np.sqrt(stats.var + 1e-2) / 0.1, rtol=RTOL)
    np.testing.assert_allclose(d, stats.mean / 0.1, rtol=RTOL)


def test_update_keras_convention_is_keras_update():
    """Keras: every average weighs the old value by its momentum; the variance follows the stddev."""
    x = _batch((8, 3), 9)
    stats = ref.batch_stats(x, axis=1)
    state = ref.RenormState(*(np.linspace(0.5, 1.5, 3) * k for k in (1, 2, 3, 4, 5)), 2)
    new = ref.update_renorm(state, stats, momentum=0.9, renorm_momentum=0.6, eps=1e-3, convention="keras")
    s = np.sqrt(stats.var + 1e-3)
    np.testing.assert_allclose(new.running_mean, 0.9 * state.running_mean + 0.1 * stats.mean, rtol=RTOL)
    np.testing.assert_allclose(new.running_stddev, 0.9 * state.running_stddev + 0.1 * s, rtol=RTOL)
    np.testing.assert_allclose(new.running_var, new.running_stddev**2 - 1e-3, rtol=RTOL)
    np.testing.assert_allclose(new.renorm_mean, 0.6 * state.renorm_mean + 0.4 * stats.mean, rtol=RTOL)
    np.testing.assert_allclose(new.renorm_stddev, 0.6 * state.renorm_stddev + 0.4 * s, rtol=RTOL)
    assert new.num_batches_tracked == 3


def test_update_torch_convention_weighs_the_new_value_and_tracks_the_unbiased_stddev():
    x = _batch((8, 3), 10)
    stats = ref.batch_stats(x, axis=1)
    state = ref.RenormState.initial(3)
    # momentum 1: the running statistics are this batch's (unbiased variance, as torch.nn's)
    new = ref.update_renorm(state, stats, momentum=1.0, renorm_momentum=0.25, eps=1e-5, convention="torch")
    np.testing.assert_allclose(new.running_mean, x.mean(0), rtol=RTOL)
    np.testing.assert_allclose(new.running_var, x.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(new.renorm_mean, 0.25 * x.mean(0), rtol=RTOL)
    np.testing.assert_allclose(new.renorm_stddev, 0.75 + 0.25 * np.sqrt(x.var(0) + 1e-5), rtol=RTOL)


def test_update_momentum_none_is_a_cumulative_average_in_torch_only():
    batches = [_batch((5, 2), seed) for seed in range(11, 15)]
    state = ref.RenormState.initial(2)
    for x in batches:
        state = ref.update_renorm(state, ref.batch_stats(x), None, None, 1e-5, "torch")
    np.testing.assert_allclose(state.running_mean, np.mean([x.mean(0) for x in batches], axis=0), rtol=RTOL)
    np.testing.assert_allclose(state.renorm_mean, state.running_mean, rtol=RTOL)
    with pytest.raises(ValueError, match="momentum=None"):
        ref.update_renorm(state, ref.batch_stats(batches[0]), None, 0.9, 1e-3, "keras")
