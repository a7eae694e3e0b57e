"""bnkit.torch batch renormalization against its float64 spec (bnkit.reference), in both conventions,
and as a PyTorch layer: state, checkpoints, errors, eval(), lazy layers, dtypes, and the lifecycle
tools (fold_bn, freeze_bn, recalibrate).

Tolerances: float64 layers against the float64 reference differ in summation order only
(Welford in PyTorch's kernel against two passes): rtol=1e-10, atol=1e-12.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
import bnkit.torch as bt
from bnkit import reference as ref

TOL64 = dict(rtol=1e-10, atol=1e-12)
LAYERS = {
    (6, 3): bt.BatchNorm1d, (4, 3, 5): bt.BatchNorm1d, (3, 3, 4, 5): bt.BatchNorm2d, (2, 3, 3, 2, 4): bt.BatchNorm3d
}
CLIPPING = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}
# (convention, momentum, renorm_momentum)
SETTINGS = [
    ("keras", 0.9, 0.7), ("keras", 0.99, 0.99), ("torch", 0.1, 0.3), ("torch", None, None), ("torch", 1.0, 0.01)
]


def _layer(cls, channels, convention, momentum, renorm_momentum, clipping, affine="affine", dtype=torch.float64):
    kwargs = {"affine": affine != "none", "bias": affine != "no-bias"}
    layer = cls(
        channels, momentum=momentum, convention=convention, renorm=True, renorm_clipping=clipping,
        renorm_momentum=renorm_momentum, dtype=dtype, **kwargs,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(channels, generator=g, dtype=dtype))
    return layer


def _np(t):
    return None if t is None else t.detach().numpy()


def _check_against_reference(layer, shape, steps=4, clipping=None):
    conv, eps = layer.convention.name, layer.eps
    state = ref.RenormState.initial(shape[1])
    g = torch.Generator().manual_seed(2)
    clipped = False
    for step in range(steps):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step) + 2 * step).requires_grad_(True)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        y = layer(x)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        grads = torch.autograd.grad(y, [x, *params], dy)
        gamma, beta = _np(layer.weight), _np(layer.bias)
        y_ref, stats, r, d = ref.forward_renorm_train(
            x.detach().numpy(), state.renorm_mean, state.renorm_stddev, gamma, beta, eps, 1, clipping
        )
        g_ref = ref.backward_renorm_train(
            dy.numpy(), x.detach().numpy(), state.renorm_mean, state.renorm_stddev, gamma, eps, 1, clipping
        )
        state = ref.update_renorm(state, stats, layer.momentum, layer.renorm_momentum, eps, conv)
        torch.testing.assert_close(y.detach(), torch.from_numpy(y_ref), **TOL64)
        torch.testing.assert_close(grads[0], torch.from_numpy(g_ref.dx), **TOL64)
        expected = [e for e, p in ((g_ref.dgamma, layer.weight), (g_ref.dbeta, layer.bias)) if p is not None]
        for got, want in zip(grads[1:], expected, strict=True):
            torch.testing.assert_close(got, torch.from_numpy(want), **TOL64)
        for name in ("running_mean", "running_var", "running_stddev", "renorm_mean", "renorm_stddev"):
            torch.testing.assert_close(getattr(layer, name), torch.from_numpy(getattr(state, name)), **TOL64)
        assert int(layer.num_batches_tracked) == state.num_batches_tracked
        clipped |= bool(clipping) and bool((np.abs(d) >= clipping["dmax"]).any() or (r >= clipping["rmax"]).any())
    layer.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y_ref = ref.forward_eval(x.numpy(), state.running_mean, state.running_var, _np(layer.weight), _np(layer.bias), eps)
    torch.testing.assert_close(layer(x), torch.from_numpy(y_ref), **TOL64)
    return clipped


@pytest.mark.parametrize("clipping", [None, CLIPPING], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("shape", list(LAYERS), ids=str)
def test_matches_reference_over_steps(shape, settings, clipping):
    layer = _layer(LAYERS[shape], shape[1], *settings, clipping)
    clipped = _check_against_reference(layer, shape, clipping=clipping)
    assert clipped == (clipping is not None)  # the bounds bind on this data when given


@pytest.mark.parametrize("affine", ["none", "no-bias"])
@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_without_affine_or_bias_matches_reference(convention, affine):
    shape = (4, 3, 5)
    layer = _layer(bt.BatchNorm1d, 3, convention, 0.5, 0.5, CLIPPING, affine)
    _check_against_reference(layer, shape, clipping=CLIPPING)


def test_sync_batchnorm_without_process_group_matches_reference():
    layer = _layer(bt.SyncBatchNorm, 3, "keras", 0.8, 0.6, CLIPPING)
    _check_against_reference(layer, (3, 3, 2, 2, 2), clipping=CLIPPING)


def test_state_dict_buffers_repr_and_defaults():
    layer = bt.BatchNorm2d(4, renorm=True)
    assert list(layer.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked",
        "running_stddev", "renorm_mean", "renorm_stddev",
    ]
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]  # the state is buffers
    assert layer.renorm_momentum == 0.01 and layer.renorm_clipping == {}
    assert bt.BatchNorm2d(4, renorm=True, convention="keras").renorm_momentum == 0.99
    torch.testing.assert_close(layer.running_stddev, torch.ones(4))
    torch.testing.assert_close(layer.renorm_stddev, torch.ones(4))
    torch.testing.assert_close(layer.renorm_mean, torch.zeros(4))
    assert "renorm=True, renorm_clipping={}, renorm_momentum=0.01" in repr(layer)
    assert repr(bt.BatchNorm2d(4)) == repr(nn.BatchNorm2d(4))  # without renorm, torch.nn's text
    assert list(bt.BatchNorm2d(4).state_dict()) == list(nn.BatchNorm2d(4).state_dict())


def test_checkpoint_round_trip_and_reset():
    layer = bt.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 2})
    layer(torch.randn(4, 3, 2, 2) * 3 + 1)
    other = bt.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 2})
    other.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(getattr(other, name), value)
    with pytest.raises(RuntimeError, match="running_stddev"):  # a plain checkpoint lacks the renorm state
        other.load_state_dict(nn.BatchNorm2d(3).state_dict())
    layer.reset_running_stats()
    assert float(layer.running_stddev.sum()) == 3 and float(layer.renorm_mean.abs().sum()) == 0
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "quoted"),
    [
        ({"renorm_clipping": {"rmaxx": 2}}, ValueError, "'rmaxx'"),
        ({"renorm_clipping": {"rmax": 0.5, "rmin": 2.0}}, ValueError, "rmax=0.5, rmin=2.0"),
        ({"renorm_clipping": {"dmax": -0.5}}, ValueError, "dmax=-0.5"),
        ({"renorm_clipping": {"dmax": "big"}}, ValueError, "'big'"),
        ({"renorm_clipping": {"dmax": float("nan")}}, ValueError, "NaN"),
        ({"renorm_clipping": [1, 2]}, TypeError, "[1, 2]"),
        ({"renorm_momentum": "slow"}, TypeError, "'slow'"),
        ({"renorm_momentum": None, "convention": "keras"}, ValueError, "renorm_momentum=None"),
        ({"renorm": "yes"}, TypeError, "'yes'"),
        ({"track_running_stats": False}, ValueError, "track_running_stats=True"),
    ],
)
def test_constructor_errors_name_the_layer_and_quote_the_value(kwargs, error, quoted):
    kwargs = {"renorm": True, **kwargs}
    with pytest.raises(error, match=r"^BatchNorm2d: .*" + quoted.replace("[", r"\[").replace("]", r"\]")):
        bt.BatchNorm2d(3, **kwargs)


def test_eval_is_plain_batch_norm_with_the_running_statistics():
    layer = bt.BatchNorm2d(3, renorm=True, renorm_clipping=CLIPPING)
    for step in range(3):
        layer(torch.randn(4, 3, 3, 3) * 2 + step)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
    layer.eval(), plain.eval()
    x = torch.randn(5, 3, 3, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # eval() changes nothing


def test_torch_convention_refuses_what_torch_nn_refuses():
    layer = bt.BatchNorm1d(3, renorm=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    assert int(layer.num_batches_tracked) == 1  # counted first, as torch.nn counts
    torch.testing.assert_close(layer.renorm_stddev, torch.ones(3))  # but nothing else changed
    with pytest.raises(ValueError, match="eps must be positive"):
        bt.BatchNorm1d(3, eps=0.0, renorm=True)(torch.randn(4, 3))
    with pytest.raises(bt.ChannelMismatchError, match="expected 3 channels"):
        layer(torch.randn(4, 2))
    with pytest.raises(bt.NonFloatingInputError):
        layer(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(bt.DtypeMismatchError):
        layer(torch.randn(4, 3, dtype=torch.float64))


def test_keras_convention_computes_what_keras_computes_for_one_value_per_channel():
    """Variance 0: r = sqrt(eps) / max(renorm_stddev, sqrt(eps)) and the output is d * gamma + beta."""
    layer = _layer(bt.BatchNorm1d, 3, "keras", 0.9, 0.9, None, dtype=torch.float32)
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    y = layer(x)
    stats = ref.batch_stats(x.detach().numpy().astype(np.float64))
    _, d = ref.renorm_correction(stats, np.zeros(3), np.ones(3), layer.eps)
    expected = d * layer.weight.detach().numpy() + layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy()[0], expected, rtol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_empty_batch_is_counted_and_changes_nothing():
    layer = bt.BatchNorm2d(3, renorm=True)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    assert layer(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    assert int(layer.num_batches_tracked) == 1
    for k, v in before.items():
        torch.testing.assert_close(getattr(layer, k), v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics(dtype):
    layer = bt.BatchNorm2d(3, renorm=True, renorm_clipping=CLIPPING)
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    y = layer(x.to(dtype))
    assert y.dtype == dtype and layer.running_stddev.dtype == torch.float32
    expected = reference(x.to(dtype).float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # a half output's rounding
    for name in ("running_mean", "running_var", "running_stddev", "renorm_mean", "renorm_stddev"):
        torch.testing.assert_close(getattr(layer, name), getattr(reference, name), rtol=1e-6, atol=1e-6)


def test_channels_last_matches_contiguous():
    layer = bt.BatchNorm2d(3, renorm=True, convention="keras")
    other = copy.deepcopy(layer)
    x = torch.randn(4, 3, 6, 6) * 2 + 3
    y = layer(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, other(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.renorm_mean, other.renorm_mean, rtol=1e-6, atol=1e-7)


def test_lazy_layer_becomes_a_renorm_layer():
    lazy = bt.LazyBatchNorm2d(convention="keras", renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.5)
    eager = bt.BatchNorm2d(4, convention="keras", renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.5)
    x = torch.randn(3, 4, 2, 2) * 2 + 1
    torch.testing.assert_close(lazy(x), eager(x))
    assert type(lazy) is bt.BatchNorm2d and lazy.renorm
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(lazy.state_dict()[name], value)


def test_convert_sync_keeps_the_renorm_state():
    layer = bt.BatchNorm2d(3, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.2)
    layer(torch.randn(4, 3, 2, 2))
    sync = bt.convert_sync(layer)
    assert sync.renorm and sync.renorm_clipping == CLIPPING and sync.renorm_momentum == 0.2
    assert sync.renorm_stddev is layer.renorm_stddev and sync.running_stddev is layer.running_stddev


def test_compiles():
    layer = bt.BatchNorm2d(3, renorm=True, renorm_clipping=CLIPPING)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(layer.renorm_stddev, eager.renorm_stddev)


# --- lifecycle: eval() is plain batch norm, so fold/freeze/recalibrate apply -------------------


def _trained_model(convention):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), bt.BatchNorm2d(3, convention=convention, renorm=True, renorm_clipping=CLIPPING),
        nn.ReLU(),
    )
    for step in range(3):
        model(torch.randn(4, 2, 5, 5) + step)
    return model.eval()


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_fold_and_freeze_keep_the_inference_output(convention):
    model = _trained_model(convention)
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)
    folded = bnkit.fold_bn(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-6)
    frozen = bnkit.freeze_bn(copy.deepcopy(model), convention="keras")  # running statistics in train()
    torch.testing.assert_close(frozen.train()(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'1' have renorm=True"):  # batch statistics: no renorm correction
        bnkit.freeze_bn(copy.deepcopy(model), convention="torch")
    kept = bnkit.freeze_bn(copy.deepcopy(model), convention="torch", freeze_stats=False)
    assert kept[1].renorm and not kept[1].weight.requires_grad


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_recalibrate_sets_running_stddev_with_the_variance_and_keeps_renorm_stats(convention):
    model = _trained_model(convention)
    bn = model[1]
    renorm = (bn.renorm_mean.clone(), bn.renorm_stddev.clone())
    batches = [torch.randn(4, 2, 5, 5) * 2 for _ in range(3)]
    bnkit.recalibrate(model, batches, progress=False)
    with torch.no_grad():
        h = model[0](torch.cat(batches)).double()
    var = h.var((0, 2, 3), correction=1 if convention == "torch" else 0)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_stddev.double(), torch.sqrt(var + bn.eps), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.renorm_mean, renorm[0], rtol=0, atol=0)
    torch.testing.assert_close(bn.renorm_stddev, renorm[1], rtol=0, atol=0)


def test_a_clipping_schedule_is_an_assignment_between_steps():
    """Keras applies the bounds given from the first step; the paper's schedule relaxes them: assign them."""
    layer = _layer(bt.BatchNorm1d, 3, "keras", 0.9, 0.5, {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0})
    state = ref.RenormState.initial(3)
    g = torch.Generator().manual_seed(4)
    for step, clipping in enumerate([{"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}, {"rmax": 1.5, "dmax": 0.5}, {}]):
        layer.renorm_clipping = clipping
        x = torch.randn(6, 3, generator=g, dtype=torch.float64) * 3 + step
        y = layer(x)
        y_ref, stats, r, _ = ref.forward_renorm_train(
            x.numpy(), state.renorm_mean, state.renorm_stddev, _np(layer.weight), _np(layer.bias), layer.eps, 1,
            clipping,
        )
        state = ref.update_renorm(state, stats, 0.9, 0.5, layer.eps, "keras")
        torch.testing.assert_close(y.detach(), torch.from_numpy(y_ref), **TOL64)
        if step == 0:
            np.testing.assert_array_equal(r, 1.0)  # no room: plain batch norm
    with pytest.raises(ValueError, match="rmax=0.5, rmin=1.0"):
        layer.renorm_clipping = {"rmax": 0.5, "rmin": 1.0}
