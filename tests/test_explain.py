"""bnkit.explain's data, checked against real Keras 3 / torch.nn and the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnkit import reference
from bnkit.explain import explain, random_batch

QUANTITIES = ("training output", "running mean", "running variance", "inference output")


@pytest.fixture(scope="module")
def seed_example():
    return explain()  # Keras BatchNormalization(momentum=0.15, axis=-1) on 32 channels


def test_seed_settings_translate_momentum_and_keep_eps(seed_example):
    given, equivalent, literal = seed_example.settings
    assert (given.framework, given.momentum, given.eps, given.new_weight) == ("keras", 0.15, 1e-3, 0.85)
    assert (equivalent.framework, equivalent.momentum, equivalent.eps) == ("torch", 0.85, 1e-3)
    assert equivalent.code == "torch.nn.BatchNorm2d(32, eps=0.001, momentum=0.85)"
    # the seed bug: the number copied, PyTorch's default eps kept
    assert literal.code == "torch.nn.BatchNorm2d(32, momentum=0.15)"
    assert (literal.momentum, literal.eps, literal.new_weight) == (0.15, 1e-5, 0.15)
    assert equivalent.same_as_given and not literal.same_as_given


def test_seed_counts(seed_example):
    keras_count, torch_count = seed_example.counts
    assert (keras_count.total, keras_count.trainable, keras_count.non_trainable) == (128, 64, 64)
    assert (torch_count.total, torch_count.trainable, torch_count.non_trainable) == (64, 64, 0)
    assert torch_count.not_counted == 2 * 32 + 1  # running_mean, running_var, num_batches_tracked


@pytest.mark.parametrize(
    "center, scale", [(True, True), (False, True), (True, False), (False, False)]
)
def test_counts_match_real_keras_and_torch(center, scale):
    from bnkit.keras import keras

    result = explain(channels=6, center=center, scale=scale, input_shape=(2, 6, 2, 2))
    keras_count, torch_count = result.counts
    layer = keras.layers.BatchNormalization(momentum=0.15, axis=-1, center=center, scale=scale)
    layer.build((None, 4, 4, 6))
    trainable = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in layer.non_trainable_weights)
    assert (keras_count.total, keras_count.trainable, keras_count.non_trainable) == (
        layer.count_params(), trainable, non_trainable)

    if center == scale:  # torch.nn can express the layer directly
        module = torch.nn.BatchNorm2d(6, affine=center)
        assert torch_count.total == sum(p.numel() for p in module.parameters())
        assert torch_count.not_counted == sum(b.numel() for b in module.buffers())


def _reference_run(x, framework, momentum, eps):
    """One training step then one inference step of a fresh layer (gamma 1, beta 0), in float64."""
    y_train, stats = reference.forward_train(x, eps=eps, axis=1)
    c = x.shape[1]
    running = reference.update_running(reference.RunningStats(np.zeros(c), np.ones(c), 0), stats, momentum,
                                       framework)
    y_eval = reference.forward_eval(x, running.mean, running.var, eps=eps, axis=1)
    return dict(zip(QUANTITIES, (y_train, running.mean, running.var, y_eval), strict=True))


@pytest.mark.parametrize(
    "source, momentum, layers",
    [
        # given, equivalent, literal copy: (framework, momentum in its meaning, eps)
        ("keras", 0.15, [("keras", 0.15, 1e-3), ("torch", 0.85, 1e-3), ("torch", 0.15, 1e-5)]),
        ("torch", 0.1, [("torch", 0.1, 1e-5), ("keras", 0.9, 1e-5), ("keras", 0.1, 1e-3)]),
    ],
)
def test_differences_match_the_reference(source, momentum, layers):
    shape = (4, 5, 3, 3)
    result = explain(source=source, channels=5, momentum=momentum, input_shape=shape, seed=3)
    x = random_batch(shape, seed=3).double().numpy()
    given, equivalent, literal = (_reference_run(x, *layer) for layer in layers)
    for against, other in (("equivalent", equivalent), ("literal copy", literal)):
        for q in QUANTITIES:
            expected = np.abs(given[q] - other[q]).max()
            largest = max(np.abs(given[q]).max(), np.abs(other[q]).max())
            got = result.difference(q, against)
            # explain runs in float32: each value is off by a few float32 ulps of the largest one
            assert got.max_abs == pytest.approx(expected, abs=1e-5 * largest), (q, against)
    # equal training outputs for equal eps; the running variance differs by exactly n/(n-1)
    assert result.difference("training output", "equivalent").max_abs <= 1e-6
    assert result.difference("running variance", "equivalent").max_abs > 1e-4


def test_equivalent_difference_matches_real_keras_against_torch_nn():
    """What explain reports for Keras vs its torch.nn equivalent is what the real layers do."""
    from bnkit.keras import keras

    shape = (4, 6, 3, 3)
    result = explain(channels=6, input_shape=shape, seed=1)
    x = random_batch(shape, seed=1)
    keras_bn = keras.layers.BatchNormalization(momentum=0.15, axis=-1)
    nhwc = x.permute(0, 2, 3, 1)
    with torch.no_grad():  # Keras' torch backend: its tensors and variables are torch tensors
        k_train = keras_bn(nhwc, training=True).permute(0, 3, 1, 2).numpy()
        k_eval = keras_bn(nhwc, training=False).permute(0, 3, 1, 2).numpy()
        k_mean = keras_bn.moving_mean.value.numpy()
        k_var = keras_bn.moving_variance.value.numpy()

    torch_bn = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.85)
    with torch.no_grad():
        t_train = torch_bn(x).numpy()
        torch_bn.eval()
        t_eval = torch_bn(x).numpy()
    real = {
        "training output": np.abs(k_train - t_train).max(),
        "running mean": np.abs(k_mean - torch_bn.running_mean.numpy()).max(),
        "running variance": np.abs(k_var - torch_bn.running_var.numpy()).max(),
        "inference output": np.abs(k_eval - t_eval).max(),
    }
    for q, value in real.items():
        # Keras' float32 moments (E[x^2] - E[x]^2) differ from torch's by ~1e-6 relative
        assert result.difference(q, "equivalent").max_abs == pytest.approx(value, abs=2e-5), q


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="channels must be a positive integer, got 0"):
        explain(channels=0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 2"):
        explain(momentum=2)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got inf"):
        explain(eps=float("inf"))
    with pytest.raises(ValueError, match="no Keras equivalent"):
        explain(source="torch", momentum=None)
    with pytest.raises(ValueError, match="track_running_stats=False exists only with source='torch'"):
        explain(track_running_stats=False)
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        explain(channels=3, input_shape=(1, 3, 1, 1))
