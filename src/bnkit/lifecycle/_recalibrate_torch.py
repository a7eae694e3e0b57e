"""PyTorch side of :func:`bnkit.recalibrate`."""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bnkit.lifecycle._progress import batch_total, progress_bar
from bnkit.lifecycle._torch_bn import (
    _BatchNorm,
    batchnorms,
    convention_of,
    display_name,
    require_running_stats,
)


class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), in float64."""

    def __init__(self, num_features: int, device) -> None:
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.mean = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Merge a batch ``(N, C, *)`` (channel axis 1) with Chan et al.'s parallel update."""
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        n_b = values.shape[1]
        if n_b == 0:
            return
        mean_b = values.mean(dim=1)
        m2_b = (values - mean_b[:, None]).square_().sum(dim=1)  # two-pass within the batch
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def flat(self) -> torch.Tensor:
        return torch.cat([self.count, self.mean, self.m2])

    @classmethod
    def merge_flat(cls, rows: torch.Tensor, num_features: int) -> Moments:
        """Merge ``(ranks, 1 + 2C)`` rows of ``flat()`` exactly: n-weighted means plus between-rank M2."""
        counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + num_features], rows[:, 1 + num_features :]
        merged = cls(num_features, rows.device)
        total = counts.sum()
        merged.count = total.reshape(1)
        if total > 0:
            merged.mean = (counts * means).sum(0) / total
            merged.m2 = m2s.sum(0) + (counts * (means - merged.mean).square()).sum(0)
        return merged


def _normalise_with_batch_stats(name: str, bn: _BatchNorm, moments: Moments):
    def forward(input: torch.Tensor) -> torch.Tensor:
        moments.add(input)
        if input.numel() == 0:
            return input.clone()
        if input.numel() == input.shape[1]:
            raise ValueError(
                f"{display_name(name, bn)} got a batch with 1 value per channel (input shape "
                f"{tuple(input.shape)}), which cannot be normalised with its own statistics; use larger "
                "batches or drop the last incomplete one (DataLoader(drop_last=True))"
            )
        return F.batch_norm(input, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    return forward


def _input_of(batch, device):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("recalibrate got an empty tuple/list as a batch; expected (input, ...)")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"recalibrate expects batches of tensors or (tensor, ...) tuples, got {type(batch).__name__}"
        )
    return batch if device is None else batch.to(device)


def recalibrate_torch(model: nn.Module, batches, num_batches, *, progress, device, process_group):
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # DDP broadcasts buffers in every forward, a collective: ranks with different numbers
        # of batches would wait on each other; the statistics are merged once at the end instead
        recalibrate_torch(model.module, batches, num_batches, progress=progress, device=device,
                          process_group=process_group)
        return model
    found = batchnorms(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no batch-norm layers to recalibrate")
    for name, bn in found:
        require_running_stats(name, bn, "recalibrate")
    moments = {name: Moments(bn.num_features, bn.running_mean.device) for name, bn in found}
    training = {m: m.training for m in model.modules()}
    total = batch_total(batches, num_batches)
    for name, bn in found:
        if "forward" in bn.__dict__:
            raise ValueError(f"{display_name(name, bn)} has an instance attribute 'forward'; cannot hook it")
        bn.forward = _normalise_with_batch_stats(name, bn, moments[name])
    model.eval()
    seen = 0
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task("recalibrate", total=total)
            # islice: a generator or DataLoader iterator loses no batch beyond num_batches
            for batch in itertools.islice(batches, num_batches):
                model(_input_of(batch, device))
                seen += 1
                bar.advance(task)
    finally:
        for _, bn in found:
            del bn.forward
        for module, was_training in training.items():
            module.training = was_training
    if _distributed(process_group):
        moments = _gather(found, moments, process_group)
    if all(float(moments[name].count) == 0 for name, _ in found):
        raise ValueError(
            "recalibrate got no batches (an empty iterable?); the running statistics are unchanged"
            if seen == 0 and not _distributed(process_group)
            else "recalibrate got no values: every batch was empty; the running statistics are unchanged"
        )
    updates = {}  # every layer's new statistics, checked before any is written
    for name, bn in found:
        m = moments[name]
        n = float(m.count)
        if n == 0:
            warnings.warn(f"{display_name(name, bn)} received no data; its statistics are unchanged", stacklevel=3)
            continue
        unbiased = convention_of(bn).unbiased_running_var
        if unbiased and n < 2:
            raise ValueError(
                f"{display_name(name, bn)} received 1 value per channel; the unbiased variance of the "
                "torch convention needs at least 2"
            )
        mean = m.mean.to(bn.running_mean.dtype)
        var = (m.m2 / (n - 1 if unbiased else n)).to(bn.running_var.dtype)
        bad = ~(torch.isfinite(mean) & torch.isfinite(var))
        if bad.any():
            channels = bad.nonzero().flatten().tolist()
            shown = ", ".join(map(str, channels[:5])) + (", ..." if len(channels) > 5 else "")
            raise ValueError(
                f"{display_name(name, bn)}: the statistics of its input are not finite (NaN or infinity in "
                f"channel{'s' if len(channels) > 1 else ''} {shown}): a batch holds NaN or infinite values, or "
                "values too large for its dtype; every layer's running statistics are left unchanged"
            )
        updates[name] = (mean, var)
    with torch.no_grad():
        for name, bn in found:
            if name in updates:
                bn.running_mean.copy_(updates[name][0])
                bn.running_var.copy_(updates[name][1])
                if getattr(bn, "renorm", False):
                    # the running variance follows the running stddev in training: keep the pair consistent;
                    # renorm_mean/renorm_stddev steer training's correction and are left as they are
                    var = updates[name][1].to(bn.running_stddev.dtype)
                    bn.running_stddev.copy_(torch.sqrt(var + bn.eps))
    return model


def _distributed(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _gather(found, moments, process_group):
    names = [name for name, _ in found]
    flat = torch.cat([moments[name].flat() for name in names])
    rows = [torch.empty_like(flat) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(rows, flat, group=process_group)
    table = torch.stack(rows)
    merged, start = {}, 0
    for name, bn in found:
        width = 1 + 2 * bn.num_features
        merged[name] = Moments.merge_flat(table[:, start : start + width], bn.num_features)
        start += width
    return merged
