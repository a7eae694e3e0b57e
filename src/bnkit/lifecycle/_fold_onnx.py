r"""ONNX side of :func:`bnkit.fold_bn`: fold inference ``BatchNormalization`` nodes into the Conv,
ConvTranspose or Gemm node before them, in an ``onnx.ModelProto``.

An inference ``BatchNormalization`` (``scale``, ``B``, ``input_mean``, ``input_var``, ``epsilon``) is
the per-channel affine map ``y = z * s + t`` of its input ``z`` (channel axis 1) with

.. math::

    s = \frac{\mathrm{scale}}{\sqrt{\mathrm{input\_var} + \epsilon}},\qquad t = B - \mathrm{input\_mean}\cdot s

When ``z`` is the output of one of these nodes and nothing else reads ``z``, the node absorbs it:

* ``Conv``, weight ``W`` of shape ``(M, C/group, k...)``: ``W'[m] = s[m] W[m]``, ``b' = s b + t``;
* ``ConvTranspose``, weight ``(C, M/group, k...)``: output channel ``m = g * M/group + j`` is made by
  the weights ``W[g-th block of C/group rows, j]``, scaled by ``s[m]``; ``b' = s b + t``;
* ``Gemm``, ``Y = alpha * A' B' + beta * C`` (``B' = B^T`` when ``transB=1``): the columns of ``B'``
  are scaled, ``C' = s C + t / beta`` (``C' = t`` with ``beta = 1`` where there was no ``C`` or
  ``beta`` was 0).

``s`` and ``t`` and the new weights are computed in float64 and rounded once to the weight's dtype.
The node's output takes the batch norm's output name, so what read the batch norm reads it. Every
other batch norm is left as it is, with the reason (training mode, statistics that are not constants,
its input not the only use of a Conv/ConvTranspose/Gemm output...). Before returning, the original
and the folded model are run by onnxruntime (graph optimisations off, CPU) on the same random inputs
and compared: :data:`TOLERANCE` on the largest difference relative to the largest output value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bnkit.lifecycle.fold import FoldDecision

__all__ = ["fold_onnx", "save_onnx", "OnnxFold", "TOLERANCE"]

#: Largest accepted ``max|folded - original| / max|original|`` per output, by the output's element type.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 1e-2}
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_FLOATS = (np.float16, np.float32, np.float64)


class OnnxFold(NamedTuple):
    """The folded ``ModelProto``, one :class:`FoldDecision` per batch norm, and the check's figure."""

    model: object
    decisions: list[FoldDecision]
    max_relative_difference: float  # over every output, folded vs original, in onnxruntime


def _onnx():
    from bnkit.frameworks import import_optional

    return import_optional("onnx", "folding an ONNX model")


def _name(node, index: int) -> str:
    return node.name or f"{node.op_type} #{index} (output {node.output[0]!r})"


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _training_reason(node, opset: int) -> str:
    """Why ``node`` runs in training mode (batch statistics), or ""."""
    outputs = [o for o in node.output if o]
    if _attr(node, "training_mode", 0):
        return "training_mode=1: it normalises with the batch statistics, even in inference"
    if opset < 14 and len(outputs) > 1:
        return (f"it has {len(outputs)} outputs, which in opset {opset} means training mode "
                "(batch statistics, updated running statistics)")
    if opset < 7 and not _attr(node, "is_test", 0):
        return f"is_test=0 in opset {opset}: training mode"
    if not _attr(node, "spatial", 1):
        return "spatial=0 (statistics per channel and position, opset < 9) is not a per-channel affine map"
    return ""


def _bn_scale_shift(arrays: list[np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` in float64 from ``scale, B, input_mean, input_var``."""
    scale, bias, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays)
    s = scale / np.sqrt(var + eps)
    return s, bias - mean * s


def _fold_weights(producer, weight: np.ndarray, bias, s: np.ndarray, t: np.ndarray):
    """``(weight', bias', extra_attrs)`` of ``producer`` with the batch norm folded in, float64; or a reason."""
    w = weight.astype(np.float64)
    channels = s.shape[0]
    op = producer.op_type
    if op == "Conv":
        if w.shape[0] != channels:
            return f"its weight has {w.shape[0]} output channels, the batch norm {channels}"
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op == "ConvTranspose":
        group = int(_attr(producer, "group", 1))
        if w.shape[0] % group or w.shape[1] * group != channels:
            return f"its weight {tuple(w.shape)} with group={group} does not make {channels} output channels"
        blocks = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        blocks = blocks * s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w = blocks.reshape(w.shape)
    else:  # Gemm: the output's channels are the columns of B' (B^T when transB=1)
        if w.ndim != 2:
            return f"its B is {w.ndim}-D"
        trans_b = int(_attr(producer, "transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        if n != channels:
            return f"its output has {n} columns, the batch norm {channels} channels"
        w = w * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        beta = float(_attr(producer, "beta", 1.0))
        if bias is None or beta == 0.0:
            return w, t, {"beta": 1.0}
        c = bias.astype(np.float64)
        return w, c * s + t / beta, {}
    b = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
    if b.shape[0] != channels:
        return f"its bias has {b.shape[0]} values, the batch norm {channels} channels"
    return w, b * s + t, {}


class _Graph:
    """What the folding reads of the top-level graph: initializers, producers and consumers."""

    def __init__(self, graph, ir_version: int) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.to_array = numpy_helper.to_array
        self.initializers = {t.name: t for t in graph.initializer}
        # from IR 4 on, an initializer that is also a graph input is a default a caller may override; before,
        # every initializer had to be listed as an input (old exporters' files), so that says nothing
        self.runtime_inputs = {i.name for i in graph.input} if ir_version >= 4 else set()
        self.outputs = {o.name for o in graph.output}
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list] = {}
        for node in _all_nodes(graph):
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)

    def constant(self, name: str, what: str):
        """The constant ``name`` as a NumPy array, or a reason why it is not one: an initializer, reached
        through Identity nodes (torch's exporter stores equal tensors once, the others as Identity of it),
        or a Constant node's tensor."""
        source = name
        for _ in range(len(self.graph.node)):  # a chain of Identity nodes at most that long
            node = self.producer.get(source)
            if source in self.initializers or node is None or node.domain not in ("", "ai.onnx"):
                break
            if node.op_type == "Identity":
                source = node.input[0]
                continue
            value = _attr(node, "value", None) if node.op_type == "Constant" else None
            if value is None:
                break
            array = self.to_array(value)
            return array if array.dtype.type in _FLOATS else f"its {what} {name!r} is {array.dtype}, not float16/32/64"
        name = source
        if name not in self.initializers:
            return f"its {what} {name!r} is not an initializer (computed, or a graph input)"
        if name in self.runtime_inputs:
            return f"its {what} {name!r} is also a graph input, which a caller may override"
        array = self.to_array(self.initializers[name])
        if array.dtype.type not in _FLOATS:
            return f"its {what} {name!r} is {array.dtype}, not float16/32/64"
        return array


def _subgraphs(node) -> list:
    """The graphs in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    return [sub for a in node.attribute for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _all_nodes(graph):
    """Every node of ``graph`` and of the subgraphs in its nodes' attributes."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _try_fold(g: _Graph, bn, opset: int):
    """``(producer, new weight, new bias, attrs)`` to fold ``bn`` into, or a reason it stays."""
    reason = _training_reason(bn, opset)
    if reason:
        return reason
    if len(bn.input) < 5:
        return f"it has {len(bn.input)} inputs, not 5"
    x = bn.input[0]
    producer = g.producer.get(x)
    if producer is None:
        return f"its input {x!r} is a graph input, not the output of a Conv/ConvTranspose/Gemm"
    kind = f"{producer.op_type} {producer.name or producer.output[0]!r}"
    if producer.op_type not in _FOLDABLE or producer.domain not in ("", "ai.onnx"):
        return f"its input is the output of {kind}, not of a Conv/ConvTranspose/Gemm"
    if x in g.outputs:
        return f"the output of {kind} is also an output of the graph"
    readers = g.readers.get(x, [])
    if len(readers) != 1:
        others = ", ".join(repr(r.name or r.op_type) for r in readers if r is not bn)
        return f"the output of {kind} is also read by {others}"
    params = []
    for name, what in zip(bn.input[1:5], ("scale", "B", "input_mean", "input_var"), strict=True):
        value = g.constant(name, what)
        if isinstance(value, str):
            return value
        params.append(value)
    weight = g.constant(producer.input[1], f"{producer.op_type}'s weight")
    if isinstance(weight, str):
        return weight
    bias = None
    if len(producer.input) > 2 and producer.input[2]:
        bias = g.constant(producer.input[2], f"{producer.op_type}'s bias")
        if isinstance(bias, str):
            return bias
    s, t = _bn_scale_shift(params, float(_attr(bn, "epsilon", 1e-5)))
    folded = _fold_weights(producer, weight, bias, s, t)
    if isinstance(folded, str):
        return f"{kind}: {folded}"
    w, b, attrs = folded
    return producer, w.astype(weight.dtype), b.astype((bias if bias is not None else weight).dtype), attrs


def _unique(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _fold_graph(model) -> list[FoldDecision]:
    """Fold ``model``'s top-level graph in place; one decision per BatchNormalization anywhere in it."""
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = _default_opset(model)
    g = _Graph(graph, model.ir_version)
    listed = model.ir_version < 4  # new initializers are listed as graph inputs too
    taken = set(g.initializers) | {n for node in _all_nodes(graph) for n in (*node.input, *node.output)}
    taken |= {i.name for i in graph.input}
    decisions, drop, renames = [], [], {}
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = _name(node, index)
        outcome = _try_fold(g, node, opset)
        if isinstance(outcome, str):
            decisions.append(FoldDecision(name, "BatchNormalization", "kept", reason=outcome))
            continue
        producer, w, b, attrs = outcome
        # new initializers: the old ones may be shared with other nodes (tied weights)
        w_name = _unique(taken, f"{producer.input[1]}_bnfold")
        b_name = _unique(taken, f"{producer.output[0]}_bnfold_bias")
        new = [numpy_helper.from_array(w, w_name), numpy_helper.from_array(b, b_name)]
        graph.initializer.extend(new)
        if listed:
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in new)
        producer.input[1] = w_name
        if len(producer.input) > 2:
            producer.input[2] = b_name
        else:
            producer.input.append(b_name)
        for key, value in attrs.items():
            _set_attr(producer, key, value)
        renames[producer.output[0]] = node.output[0]
        producer.output[0] = node.output[0]
        drop.append(node)
        label = producer.name or f"{producer.op_type} (output {node.output[0]!r})"
        decisions.append(FoldDecision(name, "BatchNormalization", "folded", into=(label,)))
    for node in drop:
        graph.node.remove(node)
    stale = [v for v in graph.value_info if v.name in renames]  # the removed intermediate tensors
    for v in stale:
        graph.value_info.remove(v)
    if drop:  # a graph with nothing folded is returned as it was
        _prune_dead_constants(graph)
        _prune_initializers(graph, listed)
    for owner in graph.node:  # batch norms inside subgraphs: not folded
        for index, node in enumerate(n for sub in _subgraphs(owner) for n in _all_nodes(sub)):
            if node.op_type == "BatchNormalization":
                where = f"inside a subgraph of {owner.op_type} {owner.name or owner.output[0]!r}"
                decisions.append(FoldDecision(_name(node, index), "BatchNormalization", "kept",
                                              reason=f"it is {where} (If/Loop/Scan bodies are not folded)"))
    return decisions


def _prune_dead_constants(graph) -> None:
    """Drop the Identity and Constant nodes that fed only the folded batch norms (nothing reads them now)."""
    while True:
        read = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and n.domain in ("", "ai.onnx")
                and not any(o in read for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _prune_initializers(graph, listed: bool) -> None:
    """Drop the initializers nothing reads any more (the folded weights' and batch norms' old ones);
    ``listed`` (IR < 4): also their graph inputs, which only listed them."""
    read = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    if not listed:
        read |= {i.name for i in graph.input}
    unused = [t for t in graph.initializer if t.name not in read]
    names = {t.name for t in unused}
    for t in unused:
        graph.initializer.remove(t)
    for value in [i for i in graph.input if i.name in names]:
        graph.input.remove(value)


# ------------------------------------------------------------------------------------ verification


def _random_feeds(model, seed: int) -> dict[str, np.ndarray]:
    """A random value for every runtime input: a symbolic batch axis is 2, other symbolic axes 16."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (2 if i == 0 else 16)
                for i, d in enumerate(tensor.shape.dim)]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        feeds[value.name] = (rng.standard_normal(dims).astype(dtype) if dtype.kind == "f"
                             else np.zeros(dims, dtype))
    return feeds


def _run(model, feeds, which: str):
    from bnkit.frameworks import missing_framework
    from bnkit.text import one_line

    try:
        import onnxruntime as ort
    except ModuleNotFoundError as e:
        raise missing_framework("onnxruntime", "checking a folded ONNX model") from e
    options = ort.SessionOptions()
    # the graphs' own semantics: onnxruntime's fusions (its own Conv+BN folding among them) are off
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [o.name for o in session.get_outputs()], session.run(None, feeds)
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidArgument, ...)
        raise ValueError(f"onnxruntime could not run the {which} model to check the folding "
                         f"({type(e).__name__}: {one_line(e)})") from e


def _check(original, folded, seed: int) -> float:
    """The largest ``max|folded - original| / max|original|`` over the outputs; ``ValueError`` past TOLERANCE."""
    feeds = _random_feeds(original, seed)
    names, expected = _run(original, feeds, "original")
    _, actual = _run(folded, feeds, "folded")
    worst = 0.0
    for name, a, b in zip(names, expected, actual, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        scale = float(np.max(np.abs(a.astype(np.float64))))
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        relative = diff / scale if scale > 0 else diff
        tolerance = TOLERANCE.get(str(a.dtype), 1e-2)
        if not relative <= tolerance:  # NaN fails too
            raise ValueError(
                f"the folded ONNX model differs from the original at output {name!r} by {relative:.3g} relative "
                f"(max |difference| {diff:.3g}, tolerance {tolerance:g}) in onnxruntime on a random input; "
                "nothing was written"
            )
        worst = max(worst, relative)
    return worst


def fold_onnx(model, *, seed: int = 0, check: bool = True) -> OnnxFold:
    """A folded copy of the ``onnx.ModelProto`` ``model`` (left untouched), see the module doc.

    With ``check`` (the default), both models are run by onnxruntime on one random input per graph
    input (seeded by ``seed``) and a difference past :data:`TOLERANCE` raises ``ValueError``.
    """
    onnx = _onnx()
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    decisions = _fold_graph(folded)
    try:
        onnx.checker.check_model(folded)
    except Exception as e:  # onnx.checker.ValidationError
        raise ValueError(f"the folded ONNX model does not pass onnx.checker ({type(e).__name__}: {e})") from e
    worst = _check(model, folded, seed) if check and any(d.folded for d in decisions) else 0.0
    return OnnxFold(folded, decisions, worst)


def save_onnx(model, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the ``ModelProto`` to ``path`` in one file, atomically; an existing file only with ``force``."""
    from bnkit.formats.atomic import atomic_path

    onnx = _onnx()
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        from bnkit.formats import ModelFileError

        raise ModelFileError(f"{path}: an ONNX model is written as .onnx; got suffix {path.suffix!r}")
    with atomic_path(path, force) as tmp:
        onnx.save_model(model, str(tmp))
    return path
