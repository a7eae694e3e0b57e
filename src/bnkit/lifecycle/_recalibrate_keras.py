"""Keras side of :func:`bnkit.recalibrate`: same definition, Keras' biased moving variance."""

from __future__ import annotations

import itertools

import numpy as np

from bnkit.conventions import KERAS
from bnkit.keras import keras
from bnkit.lifecycle._progress import batch_total, progress_bar


class _Moments:
    """Per-channel count, mean and M2 in float64 (Chan et al.'s merge of two-pass batch moments)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge ``(C, n)`` values; returns the batch's mean and biased variance."""
        n_b = values.shape[1]
        mean_b = values.mean(axis=1)
        m2_b = np.square(values - mean_b[:, None]).sum(axis=1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
        else:
            n = self.count + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.m2 = self.m2 + m2_b + np.square(delta) * (self.count * n_b / n)
            self.count = n
        return mean_b, m2_b / n_b


def _normalise_with_batch_stats(layer, moments: _Moments):
    ops = keras.ops

    def call(inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError(f"recalibrate does not support masks (BatchNormalization {layer.name!r} got one)")
        rank = len(inputs.shape)
        axis = layer.axis % rank
        values = np.moveaxis(np.asarray(ops.convert_to_numpy(inputs), dtype=np.float64), axis, 0)
        values = values.reshape(values.shape[0], -1)
        if values.shape[1] < 2:
            raise ValueError(
                f"BatchNormalization {layer.name!r} got a batch with {values.shape[1]} value(s) per channel "
                f"(input shape {tuple(inputs.shape)}), which cannot be normalised with its own statistics"
            )
        mean, var = moments.add(values)
        shape = [1] * rank
        shape[axis] = -1
        scale = 1.0 / np.sqrt(var + layer.epsilon)
        if layer.gamma is not None:
            scale = scale * np.asarray(ops.convert_to_numpy(layer.gamma), dtype=np.float64)
        shift = -mean * scale
        if layer.beta is not None:
            shift = shift + np.asarray(ops.convert_to_numpy(layer.beta), dtype=np.float64)
        dtype = inputs.dtype
        return inputs * ops.cast(np.reshape(scale, shape), dtype) + ops.cast(np.reshape(shift, shape), dtype)

    return call


def _input_of(batch):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("recalibrate got an empty tuple/list as a batch; expected (input, ...)")
        batch = batch[0]
    return batch


def recalibrate_keras(model, batches, num_batches, *, progress):
    layers = [m for m in model._flatten_layers(include_self=True, recursive=True)
              if isinstance(m, keras.layers.BatchNormalization)]
    if not layers:
        raise ValueError(f"Keras model {model.name!r} has no BatchNormalization layers to recalibrate")
    moments = {id(layer): _Moments() for layer in layers}
    for layer in layers:
        layer.call = _normalise_with_batch_stats(layer, moments[id(layer)])
    seen = 0
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("recalibrate", total=batch_total(batches, num_batches))
            # islice: a generator or DataLoader iterator loses no batch beyond num_batches
            for batch in itertools.islice(batches, num_batches):
                model(_input_of(batch), training=False)  # dropout off; batch norms use batch statistics
                seen += 1
                bar.advance(task)
    finally:
        for layer in layers:
            del layer.call
    if seen == 0:
        raise ValueError("recalibrate got no batches (an empty iterable?); the moving statistics are unchanged")
    updates = {}  # every layer's new statistics, checked before any is written
    for layer in layers:
        m = moments[id(layer)]
        if m.count == 0:
            continue
        convention = getattr(layer, "convention", KERAS)  # bnkit's layer may follow PyTorch's
        mean = m.mean.astype(layer.moving_mean.dtype)
        var = m.m2 / (m.count - 1 if convention.unbiased_running_var else m.count)  # Keras: biased
        var = var.astype(layer.moving_variance.dtype)
        bad = ~(np.isfinite(mean) & np.isfinite(var))
        if bad.any():
            channels = np.flatnonzero(bad).tolist()
            shown = ", ".join(map(str, channels[:5])) + (", ..." if len(channels) > 5 else "")
            raise ValueError(
                f"BatchNormalization {layer.name!r}: the statistics of its input are not finite (NaN or infinity "
                f"in channel{'s' if len(channels) > 1 else ''} {shown}): a batch holds NaN or infinite values, or "
                "values too large for its dtype; every layer's moving statistics are left unchanged"
            )
        updates[id(layer)] = (mean, var)
    for layer in layers:
        if id(layer) in updates:
            mean, var = updates[id(layer)]
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
            if layer.renorm:  # the variance follows the moving stddev in training; renorm_* are left as they are
                stddev = np.sqrt(var.astype(np.float64) + layer.epsilon)
                layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
    return model
