"""bnkit.torch's layers in the torch convention are drop-ins for torch.nn's, checked side by side.

Every case builds a torch.nn layer and a bnkit layer from the same arguments, runs both on the
same input, and requires: the same output, gradients and buffers, bit for bit (both run
PyTorch's native kernel); or, where torch.nn raises, an exception that is an instance of
torch.nn's type, raised at the same moment (what was counted in ``num_batches_tracked``
before the refusal is the same). The inputs are PyTorch's own ModuleInfo entries for
BatchNorm1d/2d/3d (``module_inputs_func`` and ``module_error_inputs_func`` of
``torch.testing._internal.common_modules``) and a table of this file's own cases.
scripts/run_reference_tests.py runs PyTorch's test files themselves with the same swap.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn

import bnkit.torch as bt

common_modules = pytest.importorskip("torch.testing._internal.common_modules")  # needs expecttest

BATCHNORM_INFOS = [
    info for info in common_modules.module_db if info.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
]


def _ours(cls):
    return getattr(bt, cls.__name__)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _run(layer, args, kwargs):
    """(outcome, buffers): outcome is the output and gradients, or the exception raised."""
    try:
        output = layer(*args, **kwargs)
        if output.requires_grad and output.numel():
            output.backward(torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape))
        grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads += [p.grad for p in layer.parameters()]
        outcome = (output.detach(), grads)
    except Exception as error:  # compared with torch.nn's below
        outcome = error
    return outcome, {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_same(theirs, ours, label):
    (t_outcome, t_buffers), (o_outcome, o_buffers) = theirs, ours
    if isinstance(t_outcome, Exception):
        assert isinstance(o_outcome, type(t_outcome)), (
            f"{label}: torch.nn raised {type(t_outcome).__name__}: {t_outcome}; bnkit gave {o_outcome!r}"
        )
    else:
        assert not isinstance(o_outcome, Exception), f"{label}: torch.nn ran, bnkit raised {o_outcome!r}"
        (t_out, t_grads), (o_out, o_grads) = t_outcome, o_outcome
        assert t_out.dtype == o_out.dtype and t_out.stride() == o_out.stride(), label
        torch.testing.assert_close(o_out, t_out, rtol=0, atol=0, equal_nan=True, msg=label)
        assert len(t_grads) == len(o_grads), label
        for t, o in zip(t_grads, o_grads, strict=True):
            assert (t is None) == (o is None), label
            if t is not None:
                torch.testing.assert_close(o, t, rtol=0, atol=0, equal_nan=True, msg=label)
    assert list(t_buffers) == list(o_buffers), label
    for key in t_buffers:
        torch.testing.assert_close(o_buffers[key], t_buffers[key], rtol=0, atol=0, equal_nan=True, msg=f"{label} {key}")


def _side_by_side(cls, c_args, c_kwargs, f_args, f_kwargs, training, dtype=None, steps=2):
    theirs, ours = cls(*c_args, **c_kwargs), _ours(cls)(*c_args, **c_kwargs)
    for layer in (theirs, ours):
        if dtype is not None:
            layer.to(dtype)
        layer.train(training)
    label = f"{cls.__name__}{c_args}{c_kwargs} training={training}"
    for step in range(steps):  # twice: the running statistics (and momentum=None's count) compound
        _assert_same(
            _run(theirs, _clone(f_args), _clone(f_kwargs)), _run(ours, _clone(f_args), _clone(f_kwargs)),
            f"{label} step {step}",
        )


@pytest.mark.parametrize("info", BATCHNORM_INFOS, ids=lambda info: info.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_module_info_inputs(info, training, dtype):
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
    assert inputs
    for module_input in inputs:
        c, f = module_input.constructor_input, module_input.forward_input
        _side_by_side(info.module_cls, c.args, c.kwargs, f.args, f.kwargs, training, dtype)


@pytest.mark.parametrize("info", BATCHNORM_INFOS, ids=lambda info: info.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_info_error_inputs(info, training):
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                           training=training)
    assert errors
    for error_input in errors:
        module_input = error_input.module_error_input
        c, f = module_input.constructor_input, module_input.forward_input
        pattern = re.compile(error_input.error_regex)
        if error_input.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            for cls in (info.module_cls, _ours(info.module_cls)):
                with pytest.raises(error_input.error_type, match=pattern):
                    cls(*c.args, **c.kwargs)
            continue
        # as PyTorch's test_errors: built (no train()/eval() call: a new module trains), then forward
        theirs, ours = info.module_cls(*c.args, **c.kwargs), _ours(info.module_cls)(*c.args, **c.kwargs)
        for layer in (theirs, ours):
            with pytest.raises(error_input.error_type, match=pattern):
                layer(*f.args, **f.kwargs)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        # and in this test's mode too, with the outcome compared
        _side_by_side(info.module_cls, c.args, c.kwargs, f.args, f.kwargs, training, steps=1)


def _x(*shape, dtype=torch.float32, **kwargs):
    generator = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(shape, generator=generator) * 2 + 1).to(dtype).requires_grad_(dtype.is_floating_point)


CASES = [
    # (class, constructor args, constructor kwargs, input) — each runs in train() and eval()
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)),
    (nn.BatchNorm2d, (3,), {}, _x(2, 4, 4, 4)),  # wrong channel count
    (nn.BatchNorm2d, (3,), {"affine": False, "track_running_stats": False}, _x(2, 4, 4, 4)),  # fine in torch.nn
    (nn.BatchNorm2d, (3,), {"track_running_stats": False}, _x(2, 4, 4, 4)),
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4)),  # wrong rank
    (nn.BatchNorm1d, (4,), {}, _x(1, 4)),  # one value per channel
    (nn.BatchNorm1d, (4,), {"momentum": None}, _x(1, 4)),
    (nn.BatchNorm1d, (3,), {}, _x(1, 4)),  # one value and the wrong channel count
    (nn.BatchNorm2d, (4,), {}, _x(1, 4, 1, 1)),
    (nn.BatchNorm2d, (4,), {}, _x(1, 4, 2, 1)),
    (nn.BatchNorm2d, (3,), {"eps": 0.0}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"eps": -1.0}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"eps": 0.0}, _x(2, 4, 4, 4)),
    (nn.BatchNorm2d, (3,), {"eps": "1e-5"}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"eps": float("nan")}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": 1.5}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": -0.5}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": torch.tensor(0.25)}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": torch.tensor([0.25])}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": "0.1"}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": True}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"momentum": None}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"bias": False}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"affine": False, "bias": False}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {}, _x(0, 3, 4, 4)),  # empty batch
    (nn.BatchNorm2d, (0,), {}, _x(2, 0, 4, 4)),  # no channels
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4, dtype=torch.float64)),  # float64 into float32
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4, dtype=torch.float16)),  # half into float32: fine
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4, dtype=torch.bfloat16)),
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4, dtype=torch.int64)),
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, dtype=torch.int64)),  # wrong rank and integer: rank first
    (nn.BatchNorm2d, (3,), {}, _x(2, 3, 4, 4).to(torch.complex64)),
    (nn.BatchNorm2d, (3,), {"dtype": torch.float64}, _x(2, 3, 4, 4)),  # float32 into float64
    (nn.BatchNorm2d, (3,), {"dtype": torch.float16}, _x(2, 3, 4, 4)),
    (nn.BatchNorm2d, (3,), {"dtype": torch.float64}, _x(2, 3, 4, 4, dtype=torch.float64)),
    (nn.BatchNorm3d, (2,), {}, _x(2, 2, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)),
    (nn.BatchNorm3d, (2,), {}, _x(1, 2, 1, 1, 1)),
    (nn.BatchNorm1d, (5,), {"momentum": None}, _x(3, 5, 7)),
    (nn.BatchNorm1d, (5,), {}, _x(3, 5, 7)[:, :, ::2]),  # not contiguous
    (nn.BatchNorm1d, (5,), {}, torch.full((4, 5), float("nan"))),
    (nn.BatchNorm1d, (5,), {}, "not a tensor"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0].__name__}{case[1]}{case[2]}-{_shape(case[3])}")
def test_own_cases_fail_and_succeed_as_torch_nn(case, training):
    cls, c_args, c_kwargs, x = case
    _side_by_side(cls, c_args, c_kwargs, (x,), {}, training)


def _shape(x):
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{tuple(x.shape)}{str(x.dtype)[6:]}{'' if x.is_contiguous() else '-strided'}"


def test_arguments_and_exceptions_at_construction_as_torch_nn():
    for c_args, c_kwargs in [((-2,), {}), ((2.5,), {}), (("3",), {}), ((True,), {}), ((0,), {}),
                             ((3,), {"eps": None, "momentum": "x"}), ((3,), {"device": "meta"})]:
        try:
            theirs = nn.BatchNorm2d(*c_args, **c_kwargs)
        except Exception as error:
            with pytest.raises(type(error)):
                bt.BatchNorm2d(*c_args, **c_kwargs)
        else:
            ours = bt.BatchNorm2d(*c_args, **c_kwargs)
            assert repr(ours).replace("eps=1e-05", "eps=None") == repr(theirs) or repr(ours) == repr(theirs)


# ---------------------------------------------------------------- the rest of the module interface


def test_repr_state_dict_and_parameters_are_torch_nns():
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"bias": False}, {"momentum": None}):
        theirs, ours = nn.BatchNorm2d(3, **kwargs), bt.BatchNorm2d(3, **kwargs)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert "convention='keras'" in repr(bt.BatchNorm2d(3, convention="keras"))


def test_old_checkpoint_without_num_batches_tracked_loads_as_in_torch_nn():
    """A version-1 state dict (before num_batches_tracked): torch.nn keeps the layer's own count
    (0 for a new layer); on the meta device it fills in 0."""
    counts = []
    for layer in (nn.BatchNorm2d(3), bt.BatchNorm2d(3), nn.BatchNorm2d(3), bt.BatchNorm2d(3)):
        layer.num_batches_tracked.fill_(7 if len(counts) < 2 else 0)
        state = nn.BatchNorm2d(3).state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1
        state["running_mean"].fill_(0.5)
        layer.load_state_dict(state)
        assert layer.num_batches_tracked.dtype == torch.long and float(layer.running_mean[0]) == 0.5
        counts.append(int(layer.num_batches_tracked))
    assert counts == [7, 7, 0, 0]
    for cls in (nn.BatchNorm2d, bt.BatchNorm2d):
        with torch.device("meta"):
            layer = cls(3)
        state = nn.BatchNorm2d(3).state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1
        layer.load_state_dict(state, assign=True)
        assert int(layer.num_batches_tracked) == 0


def test_reset_methods_as_torch_nn():
    x = _x(4, 3, 2, 2)
    for layer in (nn.BatchNorm2d(3), bt.BatchNorm2d(3), bt.BatchNorm2d(3, convention="keras")):
        layer(x)
        with torch.no_grad():
            layer.weight.fill_(3)
        layer.reset_running_stats()
        assert int(layer.num_batches_tracked) == 0 and float(layer.running_var.sum()) == 3
        assert float(layer.weight.detach().sum()) == 9
        layer.reset_parameters()
        assert float(layer.weight.detach().sum()) == 3 and float(layer.bias.detach().abs().sum()) == 0


def test_factory_kwargs_to_half_meta_and_device_context():
    ours = bt.BatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert ours.weight.dtype == ours.running_mean.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long
    ours.half()
    assert ours.weight.dtype == ours.running_var.dtype == torch.float16
    assert ours.to(torch.float32).weight.dtype == torch.float32
    with torch.device("meta"):
        meta, meta_theirs = bt.BatchNorm2d(3), nn.BatchNorm2d(3)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    x = torch.empty(2, 3, 4, 4, device="meta")
    assert meta(x).shape == meta_theirs(x).shape == x.shape
    meta.to_empty(device="cpu").reset_parameters()
    assert repr(meta) == repr(nn.BatchNorm2d(3))


def test_pickle_deepcopy_and_torch_save_round_trip():
    x = _x(4, 3, 2, 2)
    for layer in (bt.BatchNorm2d(3, momentum=None), bt.BatchNorm2d(3, convention="keras"), bt.SyncBatchNorm(3)):
        layer(x)
        buffer = io.BytesIO()
        torch.save(layer, buffer)  # the whole module: this test's own object, read back below
        buffer.seek(0)
        copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)]
        for twin in copies:
            assert type(twin) is type(layer) and twin.convention == layer.convention
            for t in (layer, twin):
                t.eval()
            torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"])
def test_lazy_layers_as_torch_nns(name):
    rank = {"LazyBatchNorm1d": 3, "LazyBatchNorm2d": 4, "LazyBatchNorm3d": 5}[name]
    x = _x(*(4, 3, 2, 2, 2)[:rank])
    theirs, ours = getattr(nn, name)(momentum=None), getattr(bt, name)(momentum=None)
    assert isinstance(ours, getattr(nn, name))
    assert repr(ours) == repr(theirs)
    _assert_same(_run(theirs, (_clone(x),), {}), _run(ours, (_clone(x),), {}), name)
    assert type(ours) is getattr(bt, name.replace("Lazy", "")) and type(theirs) is getattr(nn, name.replace("Lazy", ""))
    assert repr(ours) == repr(theirs)
    keras_lazy = getattr(bt, name)(convention="keras")
    keras_lazy(x)
    assert keras_lazy.convention.name == "keras" and keras_lazy.num_features == 3 and keras_lazy.eps == 1e-3


def test_the_triton_path_sees_only_inputs_torch_nn_takes(monkeypatch):
    """The Triton kernels (CUDA) check nothing: an input torch.nn would refuse takes PyTorch's path,
    which refuses it as torch.nn does. Simulated here on CPU by forcing the dispatch."""
    from bnkit import kernels

    taken = []
    monkeypatch.setattr(kernels, "use_triton", lambda x, *args, **kwargs: True)
    monkeypatch.setattr(kernels, "batch_norm", lambda module, x, **kwargs: taken.append(tuple(x.shape)) or x)
    x = _x(2, 3, 4, 4)
    bt.BatchNorm2d(3)(x)
    bt.BatchNormAct2d(3)(x)
    assert taken == [(2, 3, 4, 4), (2, 3, 4, 4)]
    taken.clear()
    refused = [
        (bt.BatchNorm2d(3), _x(2, 4, 4, 4), RuntimeError),
        (bt.BatchNorm2d(3, eps=0.0), x, ValueError),
        (bt.BatchNorm2d(3, eps="1e-5"), x, TypeError),
        (bt.BatchNorm2d(3, momentum="0.1"), x, TypeError),
        (bt.BatchNorm2d(3), _x(1, 3, 1, 1), ValueError),
        (bt.BatchNorm2d(3, dtype=torch.float16), x, RuntimeError),
        (bt.BatchNormAct2d(3), _x(2, 4, 4, 4), RuntimeError),
        (bt.SyncBatchNorm(3), _x(1, 3), ValueError),
    ]
    for layer, bad, error in refused:
        with pytest.raises(error):
            layer(bad)
    assert taken == []
    # valid but not for the kernels' parameters: a 0-d tensor momentum runs on PyTorch's path, as torch.nn
    y = bt.BatchNorm2d(3, momentum=torch.tensor(0.5))(x)
    assert taken == [] and torch.equal(y, nn.BatchNorm2d(3, momentum=torch.tensor(0.5))(x))
