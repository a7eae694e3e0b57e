"""bnkit.reference is the spec: it agrees with real torch.nn.BatchNorm in float64, with Keras'
update rule, with autograd and with finite differences.

Tolerances: everything here is float64. The reference and torch.nn compute the same formula in
a different order (two-pass vs Welford, different summation trees), so results agree to a few
ulps of the values involved; rtol=1e-12 leaves room for that and nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _numeric import finite_difference
from bnkit import reference as ref
from bnkit.conventions import KERAS, TORCH

RTOL = 1e-12  # float64, differing only in summation order
ATOL = 1e-12  # for values that are ~0 (normalized outputs cross zero)

SHAPES = [(5, 3), (4, 3, 6), (3, 2, 4, 5), (2, 3, 2, 3, 4)]
TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


def _batch(shape, seed, loc=0.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _torch_bn(shape, momentum=0.1, eps=1e-5, seed=0):
    bn = TORCH_BN[len(shape)](shape[1], eps=eps, momentum=momentum, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
    return bn


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_forward_train_and_eval_match_torch_nn(shape, eps):
    bn = _torch_bn(shape, eps=eps)
    x = _batch(shape, 1)
    y_torch = bn(torch.from_numpy(x))
    y_ref, stats = ref.forward_train(x, _np(bn.weight), _np(bn.bias), eps=eps, axis=1)
    np.testing.assert_allclose(y_ref, _np(y_torch), rtol=RTOL, atol=ATOL)
    assert stats.n == x.size // shape[1]
    np.testing.assert_allclose(stats.mean, x.mean(axis=tuple(i for i in range(x.ndim) if i != 1)), rtol=RTOL)

    bn.eval()
    x2 = _batch(shape, 2)
    y_ref_eval = ref.forward_eval(x2, _np(bn.running_mean), _np(bn.running_var), _np(bn.weight), _np(bn.bias), eps)
    np.testing.assert_allclose(y_ref_eval, _np(bn(torch.from_numpy(x2))), rtol=RTOL, atol=ATOL)


def test_forward_without_affine_uses_gamma_one_beta_zero():
    x = _batch((6, 4, 3), 3)
    y, stats = ref.forward_train(x, eps=1e-5)
    y_torch = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=1e-5)
    np.testing.assert_allclose(y, _np(y_torch), rtol=RTOL, atol=ATOL)
    # biased variance
    np.testing.assert_allclose(stats.var, x.var(axis=(0, 2), ddof=0), rtol=RTOL)


def test_channel_axis_last_equals_channel_axis_one():
    x = _batch((4, 3, 5), 4)
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
    y1, s1 = ref.forward_train(x, gamma, beta, eps=1e-3, axis=1)
    y_last, s_last = ref.forward_train(np.moveaxis(x, 1, -1), gamma, beta, eps=1e-3, axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(s_last.var, s1.var, rtol=RTOL)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.7, 1.0, None])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4, 5)], ids=str)
def test_update_running_torch_convention_matches_torch_nn_over_steps(shape, momentum):
    bn = _torch_bn(shape, momentum=momentum)
    running = ref.RunningStats(np.zeros(shape[1]), np.ones(shape[1]), 0)
    for step in range(4):
        x = _batch(shape, 10 + step, loc=step)
        bn(torch.from_numpy(x))
        running = ref.update_running(running, ref.batch_stats(x), momentum, "torch")
        assert running.num_batches_tracked == int(bn.num_batches_tracked) == step + 1
        np.testing.assert_allclose(running.mean, _np(bn.running_mean), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(running.var, _np(bn.running_var), rtol=RTOL, atol=ATOL)


def test_update_running_momentum_none_is_the_mean_of_the_batch_statistics():
    batches = [_batch((6, 2), s, loc=s) for s in range(5)]
    running = ref.RunningStats(np.zeros(2), np.ones(2), 0)
    for x in batches:
        running = ref.update_running(running, ref.batch_stats(x, axis=1), None, TORCH)
    means = np.mean([x.mean(axis=0) for x in batches], axis=0)
    unbiased_vars = np.mean([x.var(axis=0, ddof=1) for x in batches], axis=0)
    np.testing.assert_allclose(running.mean, means, rtol=1e-12)
    np.testing.assert_allclose(running.var, unbiased_vars, rtol=1e-12)
    assert running.num_batches_tracked == 5


def test_update_running_unbiased_needs_two_values_as_torch_nn():
    # torch.nn refuses a batch of one value per channel in training (its unbiased running
    # variance would divide by n - 1 = 0); the reference says so too instead of dividing by 0
    x = np.random.default_rng(0).normal(size=(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.from_numpy(x))
    stats = ref.batch_stats(x)
    with pytest.raises(ValueError, match="at least 2 values per channel, got n=1"):
        ref.update_running(ref.RunningStats(np.zeros(3), np.ones(3), 0), stats, 0.1, "torch")


def test_update_running_none_refused_in_keras():
    stats = ref.batch_stats(_batch((4, 2), 0))
    with pytest.raises(ValueError, match="not part of the keras convention"):
        ref.update_running(ref.RunningStats(np.zeros(2), np.ones(2), 0), stats, None, "keras")


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99, 1.0])
def test_update_running_keras_convention_matches_keras(momentum):
    keras = pytest.importorskip("keras")
    shape = (4, 3, 2, 5)
    # Keras 3.15 computes in float32 even for dtype="float64" (its result_type("float64", "float32")
    # is float32), so the comparison is in float32: float32 inputs, the reference in float64 on them.
    layer = keras.layers.BatchNormalization(axis=1, momentum=momentum)
    layer.build(shape)
    running = ref.RunningStats(np.zeros(3), np.ones(3), 0)
    for step in range(3):
        x = _batch(shape, 20 + step, loc=step).astype(np.float32)
        layer(torch.from_numpy(x), training=True)
        running = ref.update_running(running, ref.batch_stats(x), momentum, KERAS)
        # float32 rounding of Keras' E[x^2] - E[x]^2 and of the update; atol for means near 0
        np.testing.assert_allclose(running.mean, _np(layer.moving_mean.value), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(running.var, _np(layer.moving_variance.value), rtol=1e-6, atol=1e-6)


def test_update_running_conventions_differ_by_the_estimator_and_the_weight():
    x = _batch((5, 2), 7)
    stats = ref.batch_stats(x)
    start = ref.RunningStats(np.zeros(2), np.ones(2), 0)
    t = ref.update_running(start, stats, 0.25, "torch")
    k = ref.update_running(start, stats, 0.75, "keras")  # the same weights, translated
    np.testing.assert_allclose(t.mean, k.mean, rtol=1e-15)
    np.testing.assert_allclose(t.var - 0.75, (k.var - 0.75) * 5 / 4, rtol=1e-14)


# --- backward -------------------------------------------------------------------------------


def _autograd(x, dy, gamma, beta, eps, train, running=None):
    xt = torch.from_numpy(x).requires_grad_(True)
    g = torch.from_numpy(gamma).requires_grad_(True)
    b = torch.from_numpy(beta).requires_grad_(True)
    rm, rv = (None, None) if running is None else (torch.from_numpy(running[0]), torch.from_numpy(running[1]))
    y = torch.nn.functional.batch_norm(xt, rm, rv, g, b, training=train, eps=eps)
    return [_np(t) for t in torch.autograd.grad(y, (xt, g, b), torch.from_numpy(dy))]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_train_matches_autograd(shape):
    x, dy = _batch(shape, 30), _batch(shape, 31)
    gamma, beta = np.linspace(0.5, 2.0, shape[1]), np.linspace(-1, 1, shape[1])
    grads = ref.backward_train(dy, x, gamma, eps=1e-3)
    for ours, theirs in zip(grads, _autograd(x, dy, gamma, beta, 1e-3, train=True), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)  # float64, summation order


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_eval_matches_autograd(shape):
    x, dy = _batch(shape, 32), _batch(shape, 33)
    c = shape[1]
    gamma, beta = np.linspace(0.5, 2.0, c), np.linspace(-1, 1, c)
    running = (np.linspace(-0.3, 0.3, c), np.linspace(0.5, 3.0, c))
    grads = ref.backward_eval(dy, x, *running, gamma, eps=1e-5)
    for ours, theirs in zip(grads, _autograd(x, dy, gamma, beta, 1e-5, False, running), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_matches_finite_differences(train):
    shape, eps = (4, 2, 3), 1e-3
    x, dy = _batch(shape, 40), _batch(shape, 41)
    gamma, beta = np.array([1.5, 0.7]), np.array([0.2, -0.4])
    running = (np.array([0.1, -0.2]), np.array([2.0, 0.5]))

    def loss(x_, gamma_, beta_):
        if train:
            y = ref.forward_train(x_, gamma_, beta_, eps)[0]
        else:
            y = ref.forward_eval(x_, *running, gamma_, beta_, eps)
        return float((y * dy).sum())

    if train:
        grads = ref.backward_train(dy, x, gamma, eps)
    else:
        grads = ref.backward_eval(dy, x, *running, gamma, eps)
    numeric = (
        finite_difference(lambda a: loss(a, gamma, beta), x),
        finite_difference(lambda a: loss(x, a, beta), gamma),
        finite_difference(lambda a: loss(x, gamma, a), beta),
    )
    for ours, fd in zip(grads, numeric, strict=True):
        # central differences with h=1e-6: truncation ~h^2, rounding ~eps64/h ~ 1e-10
        np.testing.assert_allclose(ours, fd, rtol=1e-6, atol=1e-7)
