"""The PyTorch half of :func:`bnkit.diagnose.lint.lint`: its findings on a ``torch.nn.Module`` (the codes
and what they mean: :mod:`bnkit.diagnose.lint`)."""

from __future__ import annotations

import contextlib
import functools
import math

from bnkit.diagnose.lint import (
    Finding,
    _batch_of_one,
    _bias_finding,
    _eps_mismatch,
    _in_unit_interval,
    _momentum_finding,
    _number,
    _renorm_findings,
    _settings_findings,
)

__all__ = ["lint_torch"]


def lint_torch(model, for_inference, batch_size, input_shape) -> list[Finding]:
    from torch import nn

    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    findings: list[Finding] = []
    # each batch norm's input shape, from one pass on zeros, where the input shape is known; asked lazily
    bn_shapes = functools.cache(lambda: _torch_bn_input_shapes(model, input_shape) if input_shape is not None else {})

    if for_inference and model.training and bns:
        findings.append(
            Finding(
                "bn-training-mode",
                "(model)",
                f"the model is in train() mode: its {len(bns)} batch norm layer(s) normalise with each "
                "batch's statistics and overwrite their running statistics on every call. "
                "Call model.eval() before inference.",
                "error",
            )
        )
    elif not model.training:
        for name, bn in bns:
            if bn.training:
                findings.append(
                    Finding(
                        "bn-training-mode",
                        name,
                        f"{_describe(bn)} is in train() mode while the model is in eval(): it uses batch "
                        "statistics and updates its running statistics (a .train() call after "
                        "model.eval()?). Call .eval() on it, or model.eval() last.",
                        "error" if for_inference else "warning",
                    )
                )

    for name, bn in bns:
        if bn.running_mean is None:
            findings.append(
                Finding(
                    "bn-no-running-stats",
                    name,
                    f"{_describe(bn)} has no running statistics (track_running_stats=False): it "
                    "normalises with the batch's statistics even in eval(), so each output depends on "
                    "the other samples in the batch.",
                    "warning" if for_inference else "info",
                )
            )

    for producer_name, producer, bn_name, bn in _torch_producer_bn_pairs(model):
        if getattr(producer, "bias", None) is None:
            continue
        shape = None
        if isinstance(producer, nn.Linear):  # which axis its bias lies along depends on the input's rank
            with contextlib.suppress(ValueError):  # a model that does not run on zeros: rank unknown
                shape = bn_shapes().get(bn_name)
        if _torch_bias_is_per_bn_channel(producer, bn, shape):
            findings.append(
                _bias_finding(
                    producer_name,
                    type(producer).__name__,
                    bn_name,
                    _describe(bn),
                    producer.bias.numel(),
                    "bias=False",
                )
            )

    if batch_size == 1:
        # For inference, batch_size is the serving batch: BNs in train() mode use batch statistics.
        # For training, model.train() will switch every BN to batch statistics, except one kept in
        # eval() inside a model in train() mode: that one was frozen on purpose.
        uses_batch_stats = [
            (n, m) for n, m in bns if m.training or m.running_mean is None or (not for_inference and not model.training)
        ]
        values = _torch_values_per_channel(bn_shapes(), batch_size) if uses_batch_stats else {}
        for name, bn in uses_batch_stats:
            findings.append(_batch_of_one(name, _describe(bn), values.get(name), keras=False))

    for name, bn in bns:
        frozen = bn.affine and not bn.weight.requires_grad and not bn.bias.requires_grad
        if frozen and bn.training and bn.running_mean is not None:
            findings.append(
                Finding(
                    "frozen-bn-still-updating",
                    name,
                    f"{_describe(bn)} has weight and bias frozen (requires_grad=False) but is in train() "
                    "mode: its running statistics still update on every forward pass and it still "
                    "normalises with batch statistics. Call .eval() on it (after every model.train()) "
                    "to freeze it completely, as Keras' trainable=False does.",
                    "warning",
                )
            )

    for name, bn in bns:
        if bn.momentum is None or not _in_unit_interval(bn.momentum):  # out of range: its own finding
            continue
        convention = getattr(bn, "convention", None)
        if bn.momentum is None or (convention is not None and convention.momentum_weighs != "new"):
            continue  # a bnkit layer that declares Keras' meaning (bnkit.convert keeps it): not a literal copy
        weighs_new = True
        new_weight = bn.momentum
        if new_weight >= 0.5:
            findings.append(_momentum_finding(name, _describe(bn), bn.momentum, new_weight, weighs_new))

    findings += _settings_findings([(name, _describe(bn), bn.eps, bn.momentum) for name, bn in bns], keras=False)
    findings += _eps_mismatch([(name, bn.eps) for name, bn in bns if _number(bn.eps) is not None])
    findings += _renorm_findings([(name, _describe(bn), bn) for name, bn in bns])
    return findings


def _describe(bn) -> str:
    return f"{type(bn).__name__}({bn.num_features})"


def _torch_producer_bn_pairs(model):
    """(producer name, producer, bn name, bn) for each conv/linear whose only consumer is a BN.

    Read from a torch.fx trace of the model; where tracing fails (data-dependent control
    flow), from consecutive children of every ``nn.Sequential``.
    """
    import torch.fx
    from torch import nn

    from bnkit.torch.tracing import BatchNormLeafTracer

    producers = (nn.modules.conv._ConvNd, nn.Linear)
    batchnorm = nn.modules.batchnorm._BatchNorm

    class _Tracer(BatchNormLeafTracer):
        def is_leaf_module(self, module, qualified_name):
            return isinstance(module, producers) or super().is_leaf_module(module, qualified_name)

    pairs = []
    try:
        graph = _Tracer().trace(model)
    except Exception:  # fx cannot trace every model: fall back to Sequential order
        for parent_name, parent in model.named_modules():
            if not isinstance(parent, nn.Sequential):
                continue
            children = list(parent.named_children())
            for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
                if isinstance(a, producers) and isinstance(b, batchnorm):
                    prefix = f"{parent_name}." if parent_name else ""
                    pairs.append((prefix + a_name, a, prefix + b_name, b))
        return pairs
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        bn = model.get_submodule(node.target)
        source = node.args[0]
        if not isinstance(bn, batchnorm) or not isinstance(source, torch.fx.Node):
            continue
        if source.op == "call_module" and len(source.users) == 1:
            producer = model.get_submodule(source.target)
            if isinstance(producer, producers):
                pairs.append((source.target, producer, node.target, bn))
    return pairs


def _torch_bias_is_per_bn_channel(producer, bn, bn_input_shape) -> bool:
    """Whether the producer's bias lies along the batch norm's channel axis (which then cancels it).

    A conv's bias is per output channel, axis 1, the batch norm's. A Linear's is along the last axis:
    the batch norm's channel axis only on a 2-D input (N, C); on (N, C, L) it varies along L, which a
    BatchNorm1d does not cancel (it normalises each of the C channels over N and L). The input's rank
    comes from a probe where the input shape is known; without it, a Linear whose width is not the
    batch norm's cannot be on its channel axis, and one whose width is is taken for the usual 2-D case.
    """
    from torch import nn

    if not isinstance(producer, nn.Linear):
        return True
    if bn_input_shape is not None:
        return len(bn_input_shape) == 2
    return producer.out_features == bn.num_features


def _torch_values_per_channel(bn_input_shapes, batch_size) -> dict[str, int]:
    """Values each BN channel's statistics come from at ``batch_size`` (shapes probed at a batch of 1)."""
    return {name: batch_size * math.prod(shape[2:]) for name, shape in bn_input_shapes.items()}


def _torch_bn_input_shapes(model, input_shape) -> dict[str, tuple[int, ...]]:
    """Each batch norm's input shape in one eval pass on zeros of ``input_shape`` (batch of 1)."""
    import torch
    from torch import nn

    from bnkit.summarize.rows import normalize_input_shape
    from bnkit.torch.probe import probing

    shapes = normalize_input_shape(input_shape)
    seen: dict[str, tuple[int, ...]] = {}

    def record(name, module, args, output):
        seen.setdefault(name, tuple(args[0].shape))

    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    param = next(model.parameters(), None)
    kwargs = {} if param is None else {"dtype": param.dtype, "device": param.device}
    try:
        with probing(model, bns, record):
            model(*[torch.zeros((1, *s), **kwargs) for s in shapes])
    except Exception as e:
        raise ValueError(
            f"running {type(model).__name__} on zeros of input_shape {input_shape!r} (plus a batch "
            f"dimension) failed: {type(e).__name__}: {e}"
        ) from e
    return seen
