"""Batch normalization pitfalls in an ONNX model (``onnx.ModelProto``), found by reading its graph.

ONNX ``BatchNormalization`` computes, per channel c (axis 1),
``y = scale * (x - mean) / sqrt(var + epsilon) + B``, with the running ``input_mean``/``input_var`` in
inference and the batch's (biased) statistics in training mode, where it also outputs
``running = input * momentum + batch * (1 - momentum)`` (momentum weighs the *old* value, as in Keras).
Training mode is the attribute ``training_mode=1`` from opset 14 on; before, it was implied by the node
having more than one output (opset 9: ``Y, mean, var, saved_mean, saved_var``). onnxruntime's CPU kernel
follows exactly that, and refuses to load a node whose outputs disagree with ``training_mode``.

Codes (those shared with :mod:`bnkit.diagnose.lint` mean the same there):

``bn-training-mode`` (error with ``for_inference``, warning otherwise)
    A BN that runs in training mode in the graph: each call normalises with the batch's statistics.
``bn-outputs-mismatch`` (error)
    ``training_mode=1`` with one output, or ``training_mode=0`` with more: onnxruntime refuses the model
    ("This number of op outputs should be 3 when Training_mode = True").
``eps-not-positive`` (error)
    ``epsilon <= 0`` (or NaN): a channel whose variance is 0 divides by zero.
``momentum-literal-port`` (warning in training mode, info otherwise)
    ``momentum < 0.5``: ONNX's momentum weighs the old statistic, so the new batch gets ``1 - momentum``;
    a value such as 0.1 is most likely PyTorch's momentum copied literally (PyTorch's exporter writes
    ``1 - momentum``). In inference the attribute is unused, but converters carry it into the trained layer.
``momentum-out-of-range`` (error in training mode, info otherwise)
    ``momentum`` outside [0, 1]: the running statistics extrapolate instead of averaging.
``bn-nonfinite-statistics`` / ``bn-negative-variance`` (error)
    A ``scale``, ``B``, ``input_mean`` or ``input_var`` initializer with NaN or infinity, or an
    ``input_var`` below ``-epsilon`` (``sqrt`` of a negative number: NaN for that channel in inference).
``bn-per-activation`` (warning)
    Opset < 9 with ``spatial=0``: statistics per activation (C×H×W values), not per channel; neither
    PyTorch's nor Keras' batch norm has such a mode.
``conv-bias-before-bn`` (warning)
    A Conv/ConvTranspose/Gemm with a bias initializer whose only reader is a training-mode BN: the BN
    subtracts the batch mean per channel, which cancels the bias (it gets zero gradient).
``batch-of-one`` (error with one value per channel, warning otherwise)
    With ``batch_size=1``, a training-mode BN: with one value per channel (an ``(N, C)`` input) the batch
    variance is 0 and onnxruntime outputs ``B`` for every input, without an error; with more (``N, C, H, W``)
    each channel is normalised over one sample's own values. The values per channel come from the BN's
    input shape (``onnx.shape_inference``) with the batch set to 1.
``eps-mismatch`` (info)
    BN nodes of one model with different epsilons.

Not a finding: an epsilon below 1e-5. onnxruntime's CUDA kernel passes epsilon through
``ClampCudnnBatchNormEpsilon``, which raises it to ``CUDNN_BN_MIN_EPSILON`` with a warning; that constant
was 1e-5 in old cuDNN headers but is 0.0 in cuDNN 7.6 and later (``cudnn.h`` of 7.6.5), which every current
onnxruntime CUDA build uses, so a small positive epsilon is kept. (Not run on a GPU here: the installed
onnxruntime has the CPU provider only.)

What the graph alone cannot tell is left to ``bnkit compare`` (which runs it against its source): a BN
the exporter folded into a Conv with statistics from another state leaves no node to lint.
"""

from __future__ import annotations

import math

from bnkit.diagnose.lint import Finding, _eps_mismatch

__all__ = ["lint_onnx"]

_BIASED_PRODUCERS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}  # op -> the input slot of its bias


def _opset(model, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bn_nodes(model):
    """``(graph, node, where)`` for every BatchNormalization in the graph and its subgraphs."""
    from bnkit.formats.onnx import _graphs

    for graph, where in _graphs(model.graph, "graph"):
        for node in graph.node:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                yield graph, node, where


def _training(node, attributes: dict, opset: int) -> tuple[bool, str]:
    """Whether onnxruntime runs ``node`` in training mode, and why."""
    outputs = sum(bool(o) for o in node.output)
    if opset >= 14:
        return attributes.get("training_mode", 0) == 1, f"training_mode=1 with {outputs} outputs"
    if opset < 7 and attributes.get("is_test", 0) == 0 and outputs > 1:
        return True, f"opset {opset}, is_test=0 and {outputs} outputs"
    return outputs > 1, f"opset {opset} and {outputs} outputs (before opset 14 more than one output means training)"


def lint_onnx(model, *, for_inference: bool = False, batch_size: int | None = None, input_shape=None):
    """Findings for an ``onnx.ModelProto`` (see the module doc), errors first. ``batch_size``: the batch size
    it will run at (``batch-of-one``); ``input_shape`` is not used: the graph declares its own shapes."""
    from bnkit.summarize._onnx import initializer_sources, value_shapes

    shapes = value_shapes(model) if batch_size == 1 else {}

    opset = _opset(model)
    findings: list[Finding] = []
    named_eps = []
    for graph, node, where in _bn_nodes(model):
        name = node.name or f"(BatchNormalization reading {node.input[0]!r})"
        shown = f"BatchNormalization {name!r}" + ("" if where == "graph" else f" ({where})")
        attributes = _attributes(node)
        eps = attributes.get("epsilon", 1e-5)
        momentum = attributes.get("momentum", 0.9)
        named_eps.append((name, eps))
        training, why = _training(node, attributes, opset)
        outputs = sum(bool(o) for o in node.output)
        if opset >= 14 and outputs != (3 if training else 1):
            findings.append(Finding(
                "bn-outputs-mismatch", name,
                f"{shown} has training_mode={int(training)} and {outputs} outputs: onnxruntime refuses to load "
                f"the model (training_mode=1 needs 3 outputs: Y, running_mean, running_var; 0 needs 1).",
                "error",
            ))  # fmt: skip
        elif training:
            findings.append(Finding(
                "bn-training-mode", name,
                f"{shown} runs in training mode ({why}): each call normalises with the batch's own statistics "
                "(a batch of one gives B for every input) and outputs updated running statistics. For "
                "inference export the model in eval() (training_mode=0, one output); onnx2tf ignores "
                "training_mode and onnx2torch refuses it.",
                "error" if for_inference else "warning",
            ))  # fmt: skip
        findings += _eps_findings(name, shown, eps)
        findings += _momentum_findings(name, shown, momentum, training)
        if opset < 9 and attributes.get("spatial", 1) == 0:
            findings.append(Finding(
                "bn-per-activation", name,
                f"{shown} has spatial=0 (opset {opset}): its statistics are per activation (C×H×W values), not "
                "per channel. Neither PyTorch's nor Keras' batch norm has this mode, and opset 9 removed it.",
                "warning",
            ))  # fmt: skip
        findings += _statistics_findings(name, shown, node, initializer_sources(graph), eps)
        if training:
            findings += _bias_findings(graph, node, shown)
        if training and batch_size == 1:
            findings.append(_batch_of_one(name, shown, shapes.get(node.input[0])))
    findings += _eps_mismatch(named_eps)
    order = ("error", "warning", "info")
    return sorted(findings, key=lambda f: order.index(f.severity))


def _eps_findings(name, shown, eps) -> list[Finding]:
    if not (isinstance(eps, float) and eps > 0):
        return [Finding(
            "eps-not-positive", name,
            f"{shown} has epsilon={eps!r}: a channel whose variance is 0 (a constant or dead channel) divides "
            "by zero. Use ONNX's default 1e-5.",
            "error",
        )]  # fmt: skip
    return []


def _momentum_findings(name, shown, momentum, training: bool) -> list[Finding]:
    used = "" if training else " (unused in inference, but converters carry it into the layer they train)"
    if not (isinstance(momentum, float) and 0.0 <= momentum <= 1.0):
        return [Finding(
            "momentum-out-of-range", name,
            f"{shown} has momentum={momentum!r}, outside [0, 1]{used}: one of the update weights momentum and "
            "1 - momentum is negative, so the running statistics extrapolate instead of averaging.",
            "error" if training else "info",
        )]  # fmt: skip
    if momentum < 0.5:
        return [Finding(
            "momentum-literal-port", name,
            f"{shown} has momentum={momentum:g}{used}: ONNX's momentum weighs the old running statistic, so each "
            f"new batch gets {1 - momentum:.0%} of the weight. Is it PyTorch's momentum copied literally? ONNX's "
            f"equivalent is {1 - momentum:g} (bnkit.translate_momentum({momentum:g}, 'torch', 'keras')).",
            "warning" if training else "info",
        )]  # fmt: skip
    return []


def _batch_of_one(name, shown, shape) -> Finding:
    per_channel = None if shape is None or None in shape[2:] else math.prod(shape[2:])
    if per_channel == 1:
        return Finding(
            "batch-of-one", name,
            f"{shown} runs in training mode and gets one value per channel at batch size 1: the batch variance "
            "is 0 and onnxruntime outputs B for every input, without an error. Use a batch of 2 or more, or "
            "an inference graph (training_mode=0).",
            "error",
        )  # fmt: skip
    known = "" if per_channel is None else f" ({per_channel:,} values per channel)"
    return Finding(
        "batch-of-one", name,
        f"{shown} runs in training mode and normalises each channel over a single sample at batch size 1{known}: "
        "the statistics are that sample's own (instance normalization in effect). Use a larger batch or an "
        "inference graph (training_mode=0).",
        "warning",
    )  # fmt: skip


def _array(tensor):
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # a tensor onnx cannot turn into an array: the reader's checks named it already
        return None


def _statistics_findings(name, shown, node, sources, eps) -> list[Finding]:
    import numpy as np

    findings = []
    for slot, role in enumerate(("scale", "B", "input_mean", "input_var"), start=1):
        tensor = sources.get(node.input[slot]) if len(node.input) > slot else None
        values = None if tensor is None else _array(tensor)
        if values is None or values.dtype.kind not in "fc":
            continue
        bad = np.flatnonzero(~np.isfinite(values.reshape(-1)))
        if bad.size:
            findings.append(Finding(
                "bn-nonfinite-statistics", name,
                f"{shown}'s {role} ({tensor.name!r}) has {bad.size} non-finite value(s) (channel "
                f"{', '.join(map(str, bad[:5]))}{' ...' if bad.size > 5 else ''}): those channels output NaN.",
                "error",
            ))  # fmt: skip
        elif role == "input_var" and isinstance(eps, float) and math.isfinite(eps):
            negative = np.flatnonzero(values.reshape(-1) + eps < 0)
            if negative.size:
                findings.append(Finding(
                    "bn-negative-variance", name,
                    f"{shown}'s input_var ({tensor.name!r}) is below -epsilon at {negative.size} channel(s) "
                    f"({', '.join(map(str, negative[:5]))}{' ...' if negative.size > 5 else ''}): sqrt(var + "
                    "epsilon) is NaN there in inference. A variance is never negative: a damaged or crafted file?",
                    "error",
                ))  # fmt: skip
    return findings


def _bias_findings(graph, bn, shown) -> list[Finding]:
    """A biased Conv/ConvTranspose/Gemm whose output only ``bn`` reads (and is no graph output)."""
    from bnkit.summarize._onnx import initializer_sources

    source = bn.input[0]
    producers = [n for n in graph.node if source in n.output]
    readers = [n for n in graph.node if source in n.input]
    if len(producers) != 1 or len(readers) != 1 or source in {o.name for o in graph.output}:
        return []
    producer = producers[0]
    slot = _BIASED_PRODUCERS.get(producer.op_type)
    if slot is None or len(producer.input) <= slot or not producer.input[slot]:
        return []
    bias = initializer_sources(graph).get(producer.input[slot])
    if bias is None:
        return []
    size = math.prod(bias.dims)
    producer_name = producer.name or f"({producer.op_type} writing {source!r})"
    return [Finding(
        "conv-bias-before-bn", producer_name,
        f"{producer.op_type} {producer_name!r} has a bias ({size:,} values) and feeds {shown} directly, which runs "
        "in training mode: the batch norm subtracts the per-channel batch mean, which cancels the bias (its "
        "gradient is zero). Drop the bias (bias=False in PyTorch, use_bias=False in Keras).",
        "warning",
    )]  # fmt: skip
