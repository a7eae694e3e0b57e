"""bnkit.recalibrate: running statistics become the exact statistics of all the data.

References are float64 statistics of the concatenated data; tolerance 1e-6 relative (the
running buffers are float32, whose rounding is 6e-8 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.torch as bt

REL = dict(rtol=1e-6, atol=0)
SIZES = (5, 3, 8, 1)  # unequal batches, one of a single sample


def _batches(channels=3, mean=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, 4, 4, generator=generator) * 2 + mean for n in SIZES]


def _corrupt(bn):
    with torch.no_grad():
        bn.running_mean.fill_(123.0)
        bn.running_var.fill_(1e-3)


@pytest.mark.parametrize(("layer", "correction"), [
    (nn.BatchNorm2d(3), 1),
    (bt.BatchNorm2d(3), 1),
    (bt.BatchNorm2d(3, convention="keras"), 0),
])
def test_single_batchnorm_gets_the_statistics_of_the_concatenated_data(layer, correction):
    _corrupt(layer)
    batches = _batches(mean=1e4)  # a large mean: E[x^2] - E[x]^2 would lose every digit here
    bnkit.recalibrate(layer, batches, progress=False)
    data = torch.cat(batches).double()
    torch.testing.assert_close(layer.running_mean.double(), data.mean((0, 2, 3)), **REL)
    torch.testing.assert_close(layer.running_var.double(), data.var((0, 2, 3), correction=correction), **REL)


def test_deeper_layers_see_batch_normalised_inputs_as_documented():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), bt.BatchNorm2d(2, convention="keras"))
    for i in (1, 4):
        _corrupt(model[i])
    batches = _batches()
    bnkit.recalibrate(model, batches, progress=False)
    with torch.no_grad():
        first = torch.cat([model[0](x) for x in batches]).double()
        second = torch.cat([model[3](torch.relu(F.batch_norm(model[0](x), None, None, model[1].weight,
                                                              model[1].bias, True, 0.0, model[1].eps)))
                            for x in batches]).double()
    torch.testing.assert_close(model[1].running_mean.double(), first.mean((0, 2, 3)), **REL)
    torch.testing.assert_close(model[1].running_var.double(), first.var((0, 2, 3)), **REL)
    torch.testing.assert_close(model[4].running_mean.double(), second.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[4].running_var.double(), second.var((0, 2, 3), correction=0), **REL)


def test_everything_else_is_left_as_it_was():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=None), nn.Dropout(0.5),
                          bt.FrozenBatchNorm2d(3))
    model.train()
    model[3].eval()
    model[1].num_batches_tracked.fill_(7)
    params = {k: v.clone() for k, v in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    batches = [(x, torch.zeros(len(x))) for x in _batches()]  # (input, target) pairs, as a DataLoader yields
    assert bnkit.recalibrate(model, batches, num_batches=2, progress=True) is model
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum is None and int(model[1].num_batches_tracked) == 7
    assert "forward" not in vars(model[1])
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.grad is None
    with torch.no_grad():  # only the first two batches count
        z = model[0](torch.cat([x for x, _ in batches[:2]])).double()
    torch.testing.assert_close(model[1].running_var.double(), z.var((0, 2, 3)), **REL)
    assert model[3].running_mean.abs().sum() > 0  # frozen batch norms are recalibrated too


def test_num_batches_takes_no_batch_beyond_them_from_an_iterator():
    batches = iter(_batches())
    bn = nn.BatchNorm2d(3)
    bnkit.recalibrate(bn, batches, num_batches=2, progress=False)
    assert len(list(batches)) == len(SIZES) - 2  # the rest is still there for the caller
    data = torch.cat(_batches()[:2]).double()
    torch.testing.assert_close(bn.running_var.double(), data.var((0, 2, 3)), **REL)


def test_progress_bar_is_silent_when_not_a_terminal(capsys):
    bnkit.recalibrate(nn.BatchNorm2d(3), _batches(), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Linear has no batch-norm layers"):
        bnkit.recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="num_batches must be a positive int or None, got 0"):
        bnkit.recalibrate(nn.BatchNorm1d(2), [torch.randn(2, 2)], num_batches=0)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnkit.recalibrate(nn.BatchNorm1d(2, track_running_stats=False), [torch.randn(2, 2)])
    with pytest.raises(TypeError, match="got str"):
        bnkit.recalibrate(nn.BatchNorm1d(2), ["not a tensor"], progress=False)
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' got a batch with 1 value per channel"):
        bnkit.recalibrate(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), [torch.randn(1, 2)], progress=False)


def test_keras_model_gets_the_biased_statistics_of_the_concatenated_data():
    import numpy as np

    from bnkit.keras import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Conv2D(2, 1)(inputs))
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.BatchNormalization()(keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    model = keras.Model(inputs, outputs)
    first, second = model.layers[2], model.layers[-1]
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(n, 4, 4, 3)) * 2 + 1e3).astype("float32") for n in (5, 3, 8, 2)]
    kernel_before = model.layers[1].get_weights()[0].copy()
    bnkit.recalibrate(model, [(b, None) for b in batches], progress=False)
    conv = keras.ops.convert_to_numpy(model.layers[1](np.concatenate(batches))).astype(np.float64)
    conv = conv.reshape(-1, 2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first.moving_mean), conv.mean(0), rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first.moving_variance), conv.var(0), rtol=1e-6)
    np.testing.assert_array_equal(model.layers[1].get_weights()[0], kernel_before)
    assert "call" not in vars(first) and first.momentum == 0.5
    assert not np.allclose(keras.ops.convert_to_numpy(second.moving_variance), 1.0)  # later layers too
    with pytest.raises(ValueError, match=r"got a batch with 1 value\(s\) per channel"):
        bnkit.recalibrate(model, batches[:1] + [batches[0][:1]], progress=False)  # (1, 3) at the Dense


def _two_batchnorms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    for i in (1, 4):
        _corrupt(model[i])
    return model


def test_an_empty_iterable_is_refused():
    model = _two_batchnorms()
    with pytest.raises(ValueError, match=r"recalibrate got no batches \(an empty iterable\?\)"):
        bnkit.recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="recalibrate got no batches"):
        bnkit.recalibrate(model, iter(()), progress=False)
    with pytest.raises(ValueError, match="every batch was empty"):
        bnkit.recalibrate(model, [torch.empty(0, 3, 4, 4)], progress=False)
    assert float(model[1].running_mean[0]) == 123.0  # unchanged


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_refused_naming_the_layer_and_nothing_changes(bad):
    model = _two_batchnorms()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    batches[2][1, 2, 0, 0] = bad  # one value in the third batch: every channel of the 1x1 conv after it
    message = r"BatchNorm2d '1': the statistics of its input are not finite \(NaN or infinity in channels 0, 1, 2, 3\)"
    with pytest.raises(ValueError, match=message):
        bnkit.recalibrate(model, batches, progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


def test_keras_refuses_an_empty_iterable_and_non_finite_statistics():
    import numpy as np

    from bnkit.keras import keras

    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(inputs))
    model = keras.Model(inputs, outputs)
    bn = model.layers[-1]
    bn.moving_mean.assign(np.full(2, 7.0, "float32"))
    with pytest.raises(ValueError, match=r"recalibrate got no batches \(an empty iterable\?\)"):
        bnkit.recalibrate(model, [], progress=False)
    batch = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype("float32")
    batch[0, 0, 0, :] = np.nan
    with pytest.raises(ValueError, match=r"BatchNormalization '.*': the statistics of its input are not finite"):
        bnkit.recalibrate(model, [batch], progress=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), [7.0, 7.0])
