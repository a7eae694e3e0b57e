r"""Batch norms as ONNX ``BatchNormalization`` nodes, with the layer's own epsilon and momentum.

ONNX's node computes, per channel c (axis 1), ``Y = scale * (X - mean) / sqrt(var + epsilon) + B``.
In inference ``mean``/``var`` are the stored running statistics. In training mode (``training_mode=1``,
opset 14 on) they are the batch's mean and *biased* variance, and the node also outputs the updated
statistics ``running = momentum * running + (1 - momentum) * batch``: ``momentum`` weighs the *old*
value (Keras' meaning), and the running variance takes the biased batch variance.

So the layer's settings become:

* ``epsilon = eps`` (an ONNX float attribute: ``eps`` rounded to float32, as PyTorch and Keras use it
  on float32 inputs);
* ``momentum = 1 - m`` for a layer in PyTorch's convention (``m`` weighs the new batch statistic
  there), ``m`` as it is for Keras' convention (bnkit's ``convention="keras"``, which
  :func:`bnkit.convert.keras_to_torch` gives a Keras ``BatchNormalization``); a cumulative average
  (``momentum=None``) has no ONNX momentum: the attribute keeps ONNX's default 0.9 in inference,
  where it is unused, and a training-mode file is refused;
* ``scale``/``B``: the affine weight and bias, ones and zeros where the layer has none.

Refused, by layer name: a layer without running statistics (``track_running_stats=False``: it
normalises with the batch's statistics in eval too, which an inference node cannot); in a
training-mode file, a layer whose running variance is the *unbiased* batch variance (PyTorch's
convention, tf-keras 2's fused one): ONNX's training-mode node would store the biased one, off by a
factor ``n / (n - 1)``, so the statistics the file computes would not be the layer's; and batch
renormalization (ONNX has none). Frozen batch norms (torchvision's ``FrozenBatchNorm2d``, bnkit's
``FrozenBatchNorm*d``) normalise with their statistics in training too: always an inference node.
"""

from __future__ import annotations

from bnkit.formats.onnx_emit import NotWritable, OnnxNode, to_onnx

__all__ = ["batch_norm", "frozen_batch_norm", "onnx_momentum"]

ONNX_DEFAULT_MOMENTUM = 0.9


def onnx_momentum(convention, momentum) -> float | None:
    """The ONNX ``momentum`` (weight of the old running value) of a layer's ``momentum`` in ``convention``;
    None for a cumulative average (``momentum=None``), which ONNX cannot express."""
    if momentum is None:
        return None
    old, _ = convention.weights(float(momentum))
    return float(old)


@to_onnx("torch.nn.modules.batchnorm._BatchNorm", subclasses=True)
def batch_norm(module, name: str, training: bool) -> OnnxNode:
    """``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and bnkit's batch norms (any convention)."""
    from bnkit.conventions import TORCH

    shown = f"layer {name!r} ({type(module).__name__})"
    if getattr(module, "uses_batch_stats", None) is False or type(module).__name__.startswith("FrozenBatchNorm"):
        return _node(module, name, False, ONNX_DEFAULT_MOMENTUM)
    if module.running_mean is None or module.running_var is None:
        raise NotWritable(
            f"{shown}: has no running statistics (track_running_stats=False): it normalises with the batch's "
            "statistics in eval too, which an inference BatchNormalization node cannot"
        )
    convention = getattr(module, "convention", TORCH)
    momentum = onnx_momentum(convention, module.momentum)
    if training:
        if getattr(module, "renorm", False):
            raise NotWritable(f"{shown}: batch renormalization (renorm=True) has no ONNX form in training mode")
        if momentum is None:
            raise NotWritable(
                f"{shown}: momentum=None (a cumulative average over the batches) has no ONNX momentum: "
                "a training-mode file cannot update its statistics as the layer does"
            )
        if convention.unbiased_running_var:
            raise NotWritable(
                f"{shown}: its running variance takes the unbiased batch variance ({convention.name} convention), "
                "ONNX's training-mode BatchNormalization the biased one: the file's updated statistics would be "
                "off by n/(n-1); write it in inference, or use convention='keras' (biased)"
            )
    return _node(module, name, training, ONNX_DEFAULT_MOMENTUM if momentum is None else momentum)


@to_onnx("torchvision.ops.misc.FrozenBatchNorm2d")
def frozen_batch_norm(module, name: str, training: bool) -> OnnxNode:
    """torchvision's ``FrozenBatchNorm2d``: fixed statistics and affine parameters, also in training."""
    return _node(module, name, False, ONNX_DEFAULT_MOMENTUM)


def _node(module, name: str, training: bool, momentum: float) -> OnnxNode:
    import torch
    import torch.nn.functional as F

    channels = module.running_mean.shape[0]
    like = module.running_mean
    scale = module.weight if getattr(module, "weight", None) is not None else torch.ones(channels, dtype=like.dtype)
    bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros(channels, dtype=like.dtype)
    eps = float(module.eps)
    inputs = {"scale": scale, "B": bias, "mean": module.running_mean, "var": module.running_var}

    def reference(x, scale, bias, mean, var):
        # the values the exporter traces through; the file's own node computes them in onnxruntime
        return F.batch_norm(x, mean.clone(), var.clone(), scale, bias, training, 1.0 - momentum, eps)

    attributes = {"epsilon": eps, "momentum": float(momentum)}
    if training:
        attributes["training_mode"] = 1
        return OnnxNode("BatchNormalization", inputs, attributes, reference, ("running_mean", "running_var"), 14)
    return OnnxNode("BatchNormalization", inputs, attributes, reference, (), 9)
