"""bnkit.torch.SyncBatchNorm and convert_sync across 2 and 3 real gloo processes on localhost.

Each world runs once (one spawn per world size, shared by the tests). Ranks hold different
batch sizes; in the 3-process world one rank holds an empty batch. Everything is compared with
single-process batch norm (torch.nn.BatchNorm2d for the torch convention, bnkit's BatchNorm2d
for the keras convention) over the concatenated batch. Tolerance 1e-6: float32 values of order
1, where the two sides differ only in summation order (the converted model with convolutions
runs in float64, where the convolutions' own float32 summation order would dominate).
"""

from __future__ import annotations

import pytest
import torch
from _sync_worker import make_data, make_layer, make_model, renorm_layer, run, train_steps
from torch import nn

import bnkit.torch as bt
from _gloo import spawn_world

TIMEOUT_S = 120
WORLDS = {2: [5, 3], 3: [4, 0, 7]}
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    world_size = request.param
    sizes = WORLDS[world_size]
    out = tmp_path_factory.mktemp(f"world{world_size}")
    return sizes, spawn_world(run, world_size, out, sizes, timeout_s=TIMEOUT_S)


def _slices(tensor, sizes):
    return list(torch.split(tensor, sizes))


def _assert_ranks_make_one_process(ranks, outputs, grads):
    """Each step's outputs and input gradients of the ranks, concatenated, are one process's over the
    whole batch; weight and bias gradients are each rank's contribution (DDP or an all_reduce sums them)."""
    assert all(len(r["outputs"]) == len(outputs) for r in ranks)
    for step, (y, (x_grad, weight_grad, bias_grad)) in enumerate(zip(outputs, grads, strict=True)):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in ranks]), y, **TOL)
        torch.testing.assert_close(torch.cat([r["grads"][step][0] for r in ranks]), x_grad, **TOL)
        torch.testing.assert_close(sum(r["grads"][step][1] for r in ranks), weight_grad, **TOL)
        torch.testing.assert_close(sum(r["grads"][step][2] for r in ranks), bias_grad, **TOL)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_sync_batchnorm_equals_single_process_batchnorm(world, convention):
    sizes, results = world
    x_all, target_all = make_data(sizes)
    if convention == "torch":
        single = make_layer(lambda channels, convention: nn.BatchNorm2d(channels), convention)
    else:
        single = make_layer(bt.BatchNorm2d, convention)
    _assert_ranks_make_one_process([r[convention] for r in results], *train_steps(single.train(), x_all, target_all, 2))
    for r in results:
        torch.testing.assert_close(r[convention]["running_mean"], single.running_mean, **TOL)
        torch.testing.assert_close(r[convention]["running_var"], single.running_var, **TOL)
        assert int(r[convention]["num_batches_tracked"]) == 2
    assert [len(r[convention]["outputs"][0]) for r in results] == sizes


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_renorm_sync_batchnorm_equals_single_process_renorm(world, convention):
    """r and d from the group's statistics: every rank's slice as in one process, every rank's state alike."""
    sizes, results = world
    x_all, target_all = make_data(sizes)
    single = make_layer(renorm_layer(bt.BatchNorm2d), convention).train()
    ranks = [r[f"renorm-{convention}"] for r in results]
    _assert_ranks_make_one_process(ranks, *train_steps(single, x_all, target_all, 3))
    for r in results:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(r[f"renorm-{convention}"]["state"][key], value, **TOL)


def test_convert_sync_model_equals_single_process_model(world):
    sizes, results = world
    x_all, target_all = make_data(sizes)
    model = make_model().double().train()
    x = x_all.double().requires_grad_(True)
    y = model(x)
    (y * target_all[:, :2].double()).sum().backward()
    assert results[0]["model"]["types"] == ["Conv2d", "SyncBatchNorm", "ReLU", "Conv2d", "SyncBatchNorm"]
    torch.testing.assert_close(torch.cat([r["model"]["output"] for r in results]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["model"]["input_grad"] for r in results]), x.grad, **TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(sum(r["model"]["param_grads"][name] for r in results), p.grad, **TOL)
    for key, value in model.state_dict().items():
        for r in results:
            torch.testing.assert_close(r["model"]["state"][key], value, **TOL)


def test_recalibration_across_ranks_equals_concatenated_data(world):
    sizes, results = world
    x_all, _ = make_data(sizes)
    model = make_model()
    with torch.no_grad():
        first = model[0](x_all).double()
    states = [r["recalibrated"] for r in results]
    rel = dict(rtol=1e-6, atol=1e-9)
    for state in states:
        torch.testing.assert_close(state["1.running_mean"].double(), first.mean((0, 2, 3)), **rel)
        torch.testing.assert_close(state["1.running_var"].double(), first.var((0, 2, 3), correction=1), **rel)
        assert int(state["1.num_batches_tracked"]) == 0  # left as it was
    for key in states[0]:  # every rank ends with the same statistics, later layers included
        for state in states[1:]:
            torch.testing.assert_close(state[key], states[0][key], rtol=0, atol=0)
        for r in results:  # a DistributedDataParallel-wrapped model alike (and no rank waits)
            torch.testing.assert_close(r["recalibrated_ddp"][key], states[0][key], rtol=0, atol=0)


def test_eval_forward_on_one_rank_alone_uses_that_ranks_batch(world):
    _, results = world
    x, y = results[0]["eval_alone"]
    expected = nn.BatchNorm2d(x.shape[1], track_running_stats=False).eval()(x)
    torch.testing.assert_close(y, expected, **TOL)


def test_without_process_group_sync_batchnorm_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    references = (("torch", nn.BatchNorm2d(3)), ("keras", bt.BatchNorm2d(3, convention="keras")))
    for convention, reference in references:
        sync = bt.SyncBatchNorm(3, convention=convention)
        torch.testing.assert_close(sync(x), reference(x))
        torch.testing.assert_close(sync.running_var, reference.running_var)


def test_convert_sync_keeps_parameters_state_and_convention():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, momentum=None),
                          bt.BatchNorm1d(2, convention="keras"), bt.FrozenBatchNorm2d(2))
    model[1].running_mean.fill_(0.5)
    model.eval()
    weight = model[1].weight
    converted = bt.convert_sync(model)
    assert isinstance(converted[1], bt.SyncBatchNorm) and isinstance(converted[2], bt.SyncBatchNorm)
    assert converted[1].weight is weight and converted[1].momentum is None
    assert converted[1].convention.name == "torch" and converted[2].convention.name == "keras"
    assert converted[2].momentum == 0.99 and not converted[1].training
    assert isinstance(converted[3], bt.FrozenBatchNorm2d)
    assert float(converted[1].running_mean[0]) == 0.5


def test_convert_sync_keeps_the_process_group_of_a_torch_sync_batchnorm():
    group = object()  # stands in for a dist.new_group(...) handle; no collective runs here
    converted = bt.convert_sync(nn.Sequential(nn.SyncBatchNorm(2, process_group=group), nn.BatchNorm1d(2)))
    assert converted[0].process_group is group and converted[1].process_group is None
    other = object()
    assert bt.convert_sync(nn.SyncBatchNorm(2, process_group=group), other).process_group is other


def test_bias_false_as_torch_nn(world):
    sizes, results = world
    x_all, target_all = make_data(sizes)
    single = nn.BatchNorm2d(x_all.shape[1], bias=False).train()
    x = x_all.clone().requires_grad_(True)
    y = single(x)
    (y * target_all).sum().backward()
    torch.testing.assert_close(torch.cat([r["no_bias"]["output"] for r in results]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["no_bias"]["input_grad"] for r in results]), x.grad, **TOL)
    for r in results:
        torch.testing.assert_close(r["no_bias"]["running_var"], single.running_var, **TOL)


def test_one_value_in_the_whole_group(world):
    """torch convention: refused after counting the batch, as torch.nn; keras: beta, as Keras."""
    _, results = world
    for r in results:
        outcome, message, count, _, _ = r["one_value"]["torch"]
        assert outcome == "ValueError" and "more than 1 value per channel" in message and count == 1
    keras_outcomes = [r["one_value"]["keras"] for r in results]
    assert all(o[0] == "ok" for o in keras_outcomes)
    reference = make_layer(bt.BatchNorm1d, "keras").train()
    beta = reference.bias.detach()
    expected = reference(torch.full((1, beta.numel()), 2.0))
    torch.testing.assert_close(keras_outcomes[0][1], expected, rtol=0, atol=0)
    torch.testing.assert_close(keras_outcomes[0][1][0], beta, rtol=0, atol=0)
    for o in keras_outcomes:  # every rank updates the same statistics
        assert o[2] == 1
        torch.testing.assert_close(o[3], reference.running_mean, **TOL)
        torch.testing.assert_close(o[4], reference.running_var, **TOL)


def test_sync_batchnorm_is_a_torch_sync_batchnorm_with_its_signature():
    import inspect

    layer = bt.SyncBatchNorm(4, bias=False, process_group=None)
    assert isinstance(layer, nn.SyncBatchNorm) and layer.bias is None
    theirs = list(inspect.signature(nn.SyncBatchNorm).parameters.items())
    ours = list(inspect.signature(bt.SyncBatchNorm).parameters.items())
    assert [name for name, _ in ours[: len(theirs)]] == [name for name, _ in theirs]
    for (name, p), (_, q) in zip(theirs, ours, strict=False):
        assert p.kind == q.kind, name
    assert [name for name, _ in ours[len(theirs):]] == ["convention", "renorm", "renorm_clipping", "renorm_momentum"]
    assert repr(layer) == repr(nn.SyncBatchNorm(4, bias=False))
    # no process group: a plain batch norm, any rank from 2, as torch.nn.SyncBatchNorm
    x = torch.randn(3, 4, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), nn.SyncBatchNorm(4, bias=False)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bt.SyncBatchNorm(0)(torch.randn(2, 0, 3))


def test_convert_sync_batchnorm_classmethod_keeps_conventions_and_bias():
    model = nn.Sequential(nn.BatchNorm2d(2, bias=False), bt.BatchNorm1d(3, convention="keras"),
                          nn.Sequential(nn.SyncBatchNorm(2)))
    converted = bt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert all(type(m) is bt.SyncBatchNorm for m in (model[0], model[1], model[2][0]))
    assert model[0].bias is None and model[0].weight is not None
    assert [m.convention.name for m in (model[0], model[1], model[2][0])] == ["torch", "keras", "torch"]
    single = bt.SyncBatchNorm.convert_sync_batchnorm(bt.BatchNorm2d(2))
    assert type(single) is bt.SyncBatchNorm
    assert bt.convert_sync_batchnorm is bt.convert_sync
