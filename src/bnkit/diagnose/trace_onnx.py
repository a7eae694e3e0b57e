"""Trace an ONNX model (``onnx.ModelProto``): every node of a known kind, its output and where its inputs came from.

The model is run once by onnxruntime (CPUExecutionProvider) on a copy whose graph outputs include every
node's outputs, so each intermediate value is read as the runtime computed it. Nodes whose
``op_type`` is in :data:`~bnkit.diagnose.kinds.ONNX_OPS` become :class:`~bnkit.diagnose.trace.Entry`
rows; data flow through every other node (reshapes, casts, slices) is followed by tensor name, so the
traced graph is connected as in :mod:`~bnkit.diagnose.trace_torch`. ONNX tensors are NCHW: the
canonical output is the raw one, and weights are read in PyTorch's layout (Conv ``(out, in/g, *k)``;
Gemm ``B`` as ``(out, in)``; ConvTranspose ``(in, out/g, *k)`` swapped to ``(out/g, in, *k)``).
An activation the exporter wrote as several element-wise nodes (SiLU as ``x · Sigmoid(x)``, Hardswish as
``x · HardSigmoid(x)``, GELU as the erf chain; :mod:`~bnkit.diagnose.onnx_patterns`) is one ``act`` entry,
and ``MatMul`` then ``Add`` of a bias vector is one ``dense`` entry, as PyTorch's modules are.

A ``BatchNormalization`` node's state is ONNX's: ``y = scale · (x - mean) / sqrt(var + epsilon) + B``,
in training ``running = momentum · running + (1 - momentum) · batch`` (momentum weighs the *old* value,
default 0.9) with the biased batch variance; training when ``training_mode=1`` (opset 14+) or, before
opset 14, when the node has more than one output. Whether it used the batch statistics is observed
from its input and output. ``training=True`` runs every batch norm in training mode (``training_mode=1``
and the running statistics as outputs), ONNX's training forward pass.

Nothing from a custom domain is run: a node outside the default domain is refused by name.
"""

from __future__ import annotations

import numpy as np

from bnkit.diagnose.kinds import ONNX_OPS, kind_of
from bnkit.diagnose.onnx_patterns import activation_name
from bnkit.diagnose.report import BatchNormState
from bnkit.diagnose.trace import INPUT, Entry, Trace, folds_into, magnitude
from bnkit.frameworks import is_onnx_model

__all__ = ["trace_onnx", "is_onnx_model", "onnx_bn_state"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NO_DATA = {"Shape", "Size"}  # their outputs describe a tensor, they do not carry its values
_DATA_FIRST_ONLY = {"conv", "dense", "bn", "ln"}  # weights are operands too: the data is the first
_NEEDED_FOR = "compare with an ONNX model"


def _imports():
    from bnkit.frameworks import import_optional

    return import_optional("onnx", _NEEDED_FOR), import_optional("onnxruntime", _NEEDED_FOR)


def opset_of(model) -> int:
    """The default domain's opset version of ``model``."""
    return next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


def _check_nodes(model) -> None:
    for i, node in enumerate(model.graph.node):
        if node.domain not in _DEFAULT_DOMAINS:
            raise ValueError(
                f"ONNX node {node.name or i!r} ({node.op_type}) is in the custom domain {node.domain!r}: "
                "compare runs standard ONNX operators only"
            )


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _data_input(model):
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ValueError(f"compare runs ONNX models of one input; this graph has {len(inputs)} ({names})")
    return inputs[0]


_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}


def _training_copy(model, onnx) -> None:
    """Every BatchNormalization node in training mode, with its running statistics as outputs (before
    opset 14, where the number of outputs says training, also the saved mean and variance: onnxruntime
    takes 1 or 5 outputs there)."""
    opset = opset_of(model)
    extra = ("running_mean", "running_var", "saved_mean", "saved_var")
    for k, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        while len(node.output) < (3 if opset >= 14 else 5):
            node.output.append(f"{node.name or k}__bnkit_{extra[len(node.output) - 1]}")
        if opset >= 14:
            for a in list(node.attribute):
                if a.name == "training_mode":
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("training_mode", 1))


def _session(model, ort):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def trace_onnx(model, x: np.ndarray, training: bool, perturb=None) -> Trace:
    """Run ``model`` (an ``onnx.ModelProto``, not changed) with onnxruntime on ``x`` (NCHW) and record
    every node of a known kind. ``perturb`` is not supported (compare measures rounding on the other
    side, or adds up each layer's own); it must be None."""
    if perturb is not None:
        raise NotImplementedError("trace_onnx does not simulate rounding noise")
    onnx, ort = _imports()
    _check_nodes(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if training:
        _training_copy(work, onnx)
    graph = work.graph
    source = _data_input(work)
    dtype = _NP_TYPES.get(source.type.tensor_type.elem_type, np.float32)
    x = np.ascontiguousarray(np.asarray(x, dtype=dtype))
    present = {o.name for o in graph.output} | {source.name}
    for node in graph.node:
        for name in node.output:
            if name and name not in present:
                graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    try:
        session = _session(work, ort)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors are its own classes: one line, ours
        raise ValueError(f"onnxruntime refuses the ONNX model: {_first_line(e)}") from e
    names = [o.name for o in session.get_outputs()]
    values: dict[str, np.ndarray] = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    try:
        outputs = session.run(None, {source.name: x})
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"onnxruntime cannot run the ONNX model on input {tuple(x.shape)}: {_first_line(e)}") from e
    values.update(zip(names, outputs, strict=True))
    values[source.name] = x
    return _record(work, values, source.name, model)


def _first_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300]


def _consumers(graph) -> dict[str, int]:
    count: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            count[name] = count.get(name, 0) + 1
    for o in graph.output:
        count[o.name] = count.get(o.name, 0) + 1
    return count


class _Runner:
    """Re-run one node on new operands (the experiments' ``callables``): a one-node model whose
    constant inputs are the node's, built when first called."""

    def __init__(self, node, data: list[str], constants: dict[str, np.ndarray], opset: int, ir_version: int):
        # ``node`` may be a list: the element-wise nodes of one activation, the last one's output returned
        self.nodes = list(node) if isinstance(node, (list, tuple)) else [node]
        self.node, self.data, self.constants = self.nodes[-1], data, constants
        self.opset, self.ir_version = opset, ir_version
        self.session = None

    def __call__(self, operands):
        onnx, ort = _imports()
        arrays = list(operands) if isinstance(operands, (list, tuple)) else [operands]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        if self.session is None:
            helper = onnx.helper
            inputs = [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                for n, a in zip(self.data, arrays, strict=True)
            ]
            inits = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in self.constants.items()]
            graph = helper.make_graph(
                self.nodes, "bnkit_rerun", inputs, [onnx.ValueInfoProto(name=self.node.output[0])], inits
            )
            m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
            m.ir_version = self.ir_version
            self.session = _session(m, ort)
        return self.session.run(None, dict(zip(self.data, arrays, strict=True)))[0]


def _check(check, data: list[np.ndarray], consts: list[np.ndarray], out: np.ndarray) -> bool:
    if check is None:
        return True
    if check == "operands":
        return len(data) >= 2
    if check == "constant":
        return len(data) == 1 and any(np.size(c) > 1 for c in consts)
    first = data[0] if data else None
    if first is None or first.ndim < 3:
        return False
    if check == "to_2d":
        return out.ndim == 2 and out.shape[0] == first.shape[0]
    if check == "spatial":
        n, c = first.shape[:2]
        return tuple(out.shape[:2]) == (n, c) and out.size == n * c
    raise ValueError(f"unknown check {check!r} in bnkit.diagnose.kinds.ONNX_OPS")


def _weights(node, kind: str, attrs: dict, const) -> dict[str, np.ndarray]:
    """Canonical parameters (PyTorch's layout) of a node, from its constant inputs."""
    weights: dict[str, np.ndarray] = {}
    ins = list(node.input) + [""] * 5
    if kind == "conv" and const(ins[1]) is not None:
        w = const(ins[1])
        weights["weight"] = np.swapaxes(w, 0, 1) if node.op_type == "ConvTranspose" else w
        if const(ins[2]) is not None:
            weights["bias"] = const(ins[2])
    elif kind == "dense" and node.op_type == "Gemm" and const(ins[1]) is not None:
        b = const(ins[1]).astype(np.float32)
        w = (b if attrs.get("transB", 0) else b.T) * float(attrs.get("alpha", 1.0))
        weights["weight"] = w
        c = const(ins[2])
        if c is not None and c.size == w.shape[0]:
            weights["bias"] = c.reshape(-1) * float(attrs.get("beta", 1.0))
    elif kind == "dense" and const(ins[1]) is not None and const(ins[1]).ndim == 2:  # MatMul (x @ W)
        weights["weight"] = const(ins[1]).T
    elif kind == "bn":
        for key, slot in (("gamma", 1), ("beta", 2), ("mean", 3), ("var", 4)):
            if const(ins[slot]) is not None:
                weights[key] = const(ins[slot]).copy()
        weights["eps"] = np.asarray(float(attrs.get("epsilon", 1e-5)))
    elif kind == "ln":
        for key, slot in (("gamma", 1), ("beta", 2)):
            if const(ins[slot]) is not None:
                weights[key] = const(ins[slot]).copy()
        weights["eps"] = np.asarray(float(attrs.get("epsilon", 1e-5)))
    return weights


def onnx_bn_state(node, attrs: dict, opset: int, weights: dict, x: np.ndarray, y: np.ndarray, values) -> BatchNormState:
    """A BatchNormalization node's settings in bnkit's terms; whether it used the batch statistics is
    read from its input ``x`` and output ``y`` (the formula with each set of statistics, the closer wins)."""
    momentum = float(attrs.get("momentum", 0.9))
    outputs = [o for o in node.output if o]
    in_training = bool(attrs.get("training_mode", 0)) if opset >= 14 else len(outputs) > 1
    uses_batch = in_training
    if {"gamma", "beta", "mean", "var"} <= weights.keys() and x.ndim >= 2:
        eps = float(weights["eps"])
        shape = (1, -1) + (1,) * (x.ndim - 2)
        axes = tuple(k for k in range(x.ndim) if k != 1)
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        g, b = (weights[k].astype(np.float64).reshape(shape) for k in ("gamma", "beta"))

        def off(mean, var):
            return float(np.max(np.abs(g * (x64 - mean) / np.sqrt(var + eps) + b - y64), initial=0.0))

        mean, var = (weights[k].astype(np.float64).reshape(shape) for k in ("mean", "var"))
        running = off(mean, var)
        batch = off(x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True))
        uses_batch = batch < running
    after = [values.get(o) for o in outputs[1:3]] if len(outputs) >= 3 else [None, None]
    return BatchNormState(
        framework="onnx",
        eps=float(weights.get("eps", 1e-5)),
        momentum=momentum,
        momentum_weighs="old",
        new_weight=1.0 - momentum,
        running_var_estimator="biased",
        tracks_running_stats=True,
        uses_batch_stats=bool(uses_batch),
        in_training_mode=in_training,
        trainable=True,
        running_mean_before=weights.get("mean"),
        running_var_before=weights.get("var"),
        running_mean_after=after[0] if after[0] is not None else weights.get("mean"),
        running_var_after=after[1] if after[1] is not None else weights.get("var"),
    )


def _activations(graph, values: dict, input_name: str):
    """Activations written as several element-wise nodes (:mod:`~bnkit.diagnose.onnx_patterns`), keyed by
    their last node's index, and the indices of their other nodes."""
    from bnkit.diagnose.onnx_patterns import activation_regions

    data = {input_name}
    for node in graph.node:
        if node.op_type not in _NO_DATA and any(n in data for n in node.input if n):
            data.update(n for n in node.output if n in values and np.issubdtype(values[n].dtype, np.floating))
    regions = activation_regions(graph, values, data)
    return regions, {k for r in regions.values() for k in r.nodes[:-1]}


def _bias_of(entries: list[Entry], kind: str, node, inputs, constants: dict):
    """The bias vector of ``Add(MatMul(x, W), b)`` (b of W's output size, broadcast over the last axis)
    when ``node`` adds it to a MatMul entry that has none yet; else None."""
    if kind != "scale" or node.op_type != "Add" or len(inputs) != 1 or len(inputs[0]) != 1 or inputs[0][0] < 0:
        return None
    prev = entries[inputs[0][0]]
    if prev.kind != "dense" or prev.type != "MatMul" or "bias" in prev.weights or "weight" not in prev.weights:
        return None
    b = next((np.asarray(v) for v in constants.values() if np.size(v) > 1), None)
    width = prev.weights["weight"].shape[0]
    if b is None or b.size != width or b.shape[-1] != width:
        return None
    return b.reshape(-1).copy()


def _record(work, values: dict[str, np.ndarray], input_name: str, model) -> Trace:
    graph = work.graph
    opset = opset_of(work)
    table: dict[str, list] = {}
    for op, kind, check in ONNX_OPS:
        table.setdefault(op, []).append((kind, check))
    consumers = _consumers(model.graph)  # the model's own: the copy outputs every tensor
    provenance: dict[str, tuple[int, ...]] = {input_name: (INPUT,)}
    latest: dict[int, str] = {}  # entry -> the tensor name of its output now
    entries: list[Entry] = []
    used: dict[str, int] = {}

    def const(name):
        return values.get(name) if name and name not in provenance else None

    regions, inner = _activations(model.graph, values, input_name)  # the model's own outputs
    for i, node in enumerate(graph.node):
        if i in inner:
            continue  # part of an activation written as several nodes: recorded at its last node
        region = regions.get(i)
        data_names = [n for n in ([region.source] if region else node.input) if n and n in provenance]
        if node.op_type in _NO_DATA or not data_names:
            continue  # constants: no provenance
        out_name = node.output[0]
        out = values.get(out_name)
        kind = None
        if region is not None and out is not None:
            kind = "act"
        elif out is not None and np.issubdtype(out.dtype, np.floating):
            data = [values[n] for n in data_names]
            consts = [values[n] for n in node.input if n and n not in provenance and n in values]
            kind = next((k for k, c in table.get(node.op_type, ()) if _check(c, data, consts, out)), None)
        if kind is None:
            merged = tuple(sorted({p for n in data_names for p in provenance[n]}))
            for name in node.output:
                if name:
                    provenance[name] = merged
            continue
        if kind in _DATA_FIRST_ONLY:
            data_names = data_names[:1]
        attrs = _attrs(node)
        inputs = [provenance[n] for n in data_names]
        nodes = [graph.node[k] for k in region.nodes] if region else [node]
        inside = {o for n in nodes for o in n.output}
        constants = {
            n: values[n]
            for m in nodes
            for n in m.input
            if n and n not in data_names and n not in inside and n in values
        }
        runner = _Runner(nodes, data_names, constants, opset, work.ir_version)
        op_type = activation_name(values[region.source], out) if region else node.op_type
        # readers of the data outside the activation, and the activation once
        readers = consumers.get(data_names[0], 0) - (region.reads - 1 if region else 0)
        p = folds_into(entries, kind, inputs)
        b = _bias_of(entries, kind, node, inputs, constants)
        if b is not None and latest.get(inputs[0][0]) == data_names[0] and readers == 1:
            prev = entries[inputs[0][0]]  # MatMul then Add of a bias vector: a linear layer, as Gemm is
            prev.type = f"{prev.type}+{node.op_type}"
            prev.weights["bias"] = b
            prev.set_output(out, out)
            prev.callables.append(runner)
            latest[inputs[0][0]] = out_name
            provenance[out_name] = (inputs[0][0],)
            continue
        if p is not None and latest.get(p) == data_names[0] and readers == 1:
            prev = entries[p]  # an activation (or constant arithmetic) applied to this layer's output alone
            prev.type = f"{prev.type}+{op_type}"
            prev.set_output(out, out)
            prev.callables.append(runner)
            latest[p] = out_name
            provenance[out_name] = (p,)
            continue
        index = len(entries)
        name = node.name or f"{node.op_type}_{i}"
        count = used.get(name, 0)
        used[name] = count + 1
        entry = Entry(index, name if count == 0 else f"{name}_{count}", op_type, kind, out, out, inputs=inputs)
        arrays = [values[n] for n in data_names]
        entry.input_scales = [magnitude(a) for a in arrays]
        entry.input_shapes = [tuple(a.shape) for a in arrays]
        entry.inputs_finite = all(bool(np.isfinite(a).all()) for a in arrays if np.issubdtype(a.dtype, np.floating))
        if kind_of(kind).parametric and len(arrays) == 1:
            entry.input_raw = [arrays[0]]
        entry.callables.append(runner)
        entry.weights = _weights(node, kind, attrs, const)
        if kind == "scale":
            entry.weights["constant"] = next(np.asarray(v) for v in constants.values() if np.size(v) > 1)
        if kind == "bn":
            entry.bn = onnx_bn_state(node, attrs, opset, entry.weights, arrays[0], out, values)
        if kind == "flatten":
            entry.pre_flatten_shape = tuple(arrays[0].shape)
        entries.append(entry)
        latest[index] = out_name
        provenance[out_name] = (index,)
        for name in node.output[1:]:
            if name:
                provenance[name] = (index,)
    final_name = model.graph.output[0].name
    final = values[final_name]
    eps = float(np.finfo(final.dtype if np.issubdtype(final.dtype, np.floating) else np.float32).eps)
    return Trace(
        framework="onnx",
        entries=entries,
        output=np.asarray(final),
        output_producers=provenance.get(final_name, ()),
        input_scale=magnitude(values[input_name]),
        dtype_eps=eps,
        model=model,
    )
