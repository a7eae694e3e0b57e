"""Runs in each spawned process of tests/torch/test_sync.py (a module of its own: spawn imports it).

Every rank builds the same data from the same seed, takes its own slice (sizes differ per rank,
and may be 0), runs bnkit's SyncBatchNorm and a converted model, recalibrates, and saves what it
saw; the test process compares with single-process batch norm over the concatenated batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from _gloo import join_world

CHANNELS = 3


def make_data(sizes):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), CHANNELS, 4, 5, generator=generator) * 2 + 3
    target = torch.randn(sum(sizes), CHANNELS, 4, 5, generator=generator)
    return x, target


def make_layer(cls, convention):
    generator = torch.Generator().manual_seed(1)
    layer = cls(CHANNELS, convention=convention)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(CHANNELS, generator=generator))
        layer.running_mean.copy_(torch.randn(CHANNELS, generator=generator))
        layer.running_var.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
    return layer


RENORM = {"renorm_clipping": {"rmax": 1.05, "rmin": 0.95, "dmax": 0.1}}


def renorm_layer(cls):
    """``cls`` with batch renormalization (clipping that binds on make_data's batches)."""

    def make(channels, convention):
        momentum = 0.3 if convention == "torch" else 0.7
        return cls(channels, convention=convention, renorm=True, renorm_momentum=momentum, **RENORM)

    return make


def make_model():
    import bnkit.torch as bt

    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        bt.BatchNorm2d(2, convention="keras"),
    )


def train_steps(layer, x, target, steps):
    """``steps`` training steps of ``layer`` on the same batch: each step's output and the gradients
    of the input, weight and bias (the loss ``sum(y * target)``)."""
    outputs, grads = [], []
    for _step in range(steps):
        x_step = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(x_step)
        (y * target).sum().backward()
        outputs.append(y.detach())
        grads.append((x_step.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return outputs, grads


def run(rank, world_size, init_file, out_dir, sizes):
    import bnkit
    import bnkit.torch as bt

    join_world(rank, world_size, init_file)
    try:
        start = sum(sizes[:rank])
        x_all, target_all = make_data(sizes)
        x_local = x_all[start : start + sizes[rank]]
        target_local = target_all[start : start + sizes[rank]]
        result = {}
        for convention in ("torch", "keras"):
            layer = make_layer(bt.SyncBatchNorm, convention).train()
            outputs, grads = train_steps(layer, x_local, target_local, steps=2)  # the running update compounds
            result[convention] = {
                "outputs": outputs,
                "grads": grads,
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
                "num_batches_tracked": layer.num_batches_tracked.clone(),
            }
        # batch renormalization: r and d from the group's statistics, the same on every rank
        for convention in ("torch", "keras"):
            layer = make_layer(renorm_layer(bt.SyncBatchNorm), convention).train()
            outputs, grads = train_steps(layer, x_local, target_local, steps=3)
            result[f"renorm-{convention}"] = {
                "outputs": outputs,
                "grads": grads,
                "state": {k: v.clone() for k, v in layer.state_dict().items()},
            }
        # float64, so that the convolutions' own summation order does not blur the comparison
        model = bt.convert_sync(make_model().double()).train()
        x = x_local.double().requires_grad_(True)
        y = model(x)
        (y * target_local[:, :2].double()).sum().backward()
        result["model"] = {
            "output": y.detach(),
            "input_grad": x.grad,
            "param_grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "types": [type(m).__name__ for m in model],
        }
        # recalibration across ranks: each rank sees its slice in two batches (or none)
        model = make_model()
        half = sizes[rank] // 2
        batches = [b for b in (x_local[:half], x_local[half:]) if len(b)]
        bnkit.recalibrate(model, batches, progress=False)
        result["recalibrated"] = {k: v.clone() for k, v in model.state_dict().items()}
        # wrapped in DDP, whose forward broadcasts buffers: ranks with 2 batches and with none
        ddp = nn.parallel.DistributedDataParallel(make_model())
        bnkit.recalibrate(ddp, batches, progress=False)
        result["recalibrated_ddp"] = {k: v.clone() for k, v in ddp.module.state_dict().items()}
        # bias=False, as torch.nn.SyncBatchNorm takes it
        layer = bt.SyncBatchNorm(CHANNELS, bias=False).train()
        x = x_local.clone().requires_grad_(True)
        y = layer(x)
        (y * target_local).sum().backward()
        result["no_bias"] = {"output": y.detach(), "input_grad": x.grad, "running_var": layer.running_var.clone()}
        # one value per channel in the whole group: rank 0 holds one sample, the others none
        one = torch.full((1 if rank == 0 else 0, CHANNELS), 2.0)
        result["one_value"] = {}
        for convention in ("torch", "keras"):
            layer = make_layer(bt.SyncBatchNorm, convention).train()
            try:
                outcome = ("ok", layer(one).detach())
            except ValueError as error:
                outcome = ("ValueError", str(error))
            result["one_value"][convention] = (
                *outcome, int(layer.num_batches_tracked), layer.running_mean.clone(), layer.running_var.clone()
            )
        if rank == 0:  # eval() on one rank alone: no collective, or this would wait for the others
            layer = bt.SyncBatchNorm(CHANNELS, track_running_stats=False).eval()
            result["eval_alone"] = (x_local, layer(x_local))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
