"""Summary of an ONNX model (``onnx.ModelProto``): one row per node that takes parameters.

ONNX has no parameters, only *initializers*: named constant tensors a node reads as inputs. A
``BatchNormalization`` node reads four, ``scale``, ``B``, ``input_mean`` and ``input_var`` (C values each),
so the same layer is counted three ways:

* **as ONNX stores it**: every floating-point initializer once (``ModelSummary.onnx_stored``). Exporters
  store equal constants once: torch 2.13's ``dynamo=True`` exporter gives a fresh BN's ``input_mean`` the
  initializer of ``B`` (both zeros) and ``input_var`` that of ``scale`` (both ones), so a BN can store 2·C;
* **as Keras counts it**: 4·C, ``input_mean`` and ``input_var`` non-trainable (``moving_mean``,
  ``moving_variance``), ``scale`` and ``B`` trainable;
* **as PyTorch counts it**: 2·C params (``weight``, ``bias``) and 2·C buffers (``running_mean``,
  ``running_var``).

In the Keras and PyTorch accountings an initializer counts once per input it feeds: the layers of the source
had a tensor each, which the exporter merged because their values were equal (resnet18 with fresh batch norms,
exported by the TorchScript exporter, shares one zero bias among the folded convs of a width). Every floating
initializer read by a node is a parameter there (trainable: ONNX marks none frozen), except a BN's statistics;
integer initializers (shapes, axes, indices) are constants, not parameters, and are left out of every count. A
node reading an initializer through ``Identity`` nodes (as the TorchScript exporter writes a BN's statistics)
reads that initializer.
Output shapes come from ``onnx.shape_inference`` (a symbolic size, e.g. the batch, is ``None``).
"""

from __future__ import annotations

from bnkit.summarize.rows import LayerRow, ModelSummary

__all__ = ["summarize_onnx", "parameter_inputs", "initializer_sources", "value_shapes", "BN_STATISTIC_SLOTS"]

#: The inputs of ``BatchNormalization`` that are running statistics: ``input_mean`` and ``input_var``.
BN_STATISTIC_SLOTS = (3, 4)


def _floating(data_type: int) -> bool:
    from onnx import TensorProto

    return data_type in (
        TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
        TensorProto.COMPLEX64, TensorProto.COMPLEX128,
    )  # fmt: skip


def _numel(tensor) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def initializer_sources(graph) -> dict:
    """Value name → the initializer (``TensorProto``) it is, following ``Identity`` nodes back to it."""
    sources = {t.name: t for t in graph.initializer}
    changed = True
    while changed:  # Identity chains in any node order
        changed = False
        for node in graph.node:
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input:
                source = sources.get(node.input[0])
                if source is not None and node.output and node.output[0] not in sources:
                    sources[node.output[0]] = source
                    changed = True
    return sources


def parameter_inputs(graph):
    """``(node, [(slot, initializer, is_statistic)])`` for every node (not ``Identity``) that reads floating
    initializers; ``is_statistic``: a BatchNormalization's ``input_mean``/``input_var``."""
    sources = initializer_sources(graph)
    for node in graph.node:
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
            continue
        read = []
        for slot, name in enumerate(node.input):
            tensor = sources.get(name) if name else None
            if tensor is not None and _floating(tensor.data_type):
                statistic = node.op_type == "BatchNormalization" and slot in BN_STATISTIC_SLOTS
                read.append((slot, tensor, statistic))
        if read:
            yield node, read


def value_shapes(model) -> dict:
    """Value name → its shape (a tuple, ``None`` for a symbolic size), from shape inference where it works."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot follow: its declared inputs and outputs only
        inferred = model
    graph = inferred.graph
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return shapes


def summarize_onnx(model, input_shape=None) -> ModelSummary:
    """The :class:`ModelSummary` of an ``onnx.ModelProto`` (see the module doc); ``input_shape`` is not
    needed (shapes come from the graph) and, when given, only noted."""
    from onnx import helper

    graph = model.graph
    shapes = value_shapes(model)
    rows = []
    for index, (node, read) in enumerate(parameter_inputs(graph)):
        statistics = sum(_numel(t) for _, t, statistic in read if statistic)
        trainable = sum(_numel(t) for _, t, statistic in read if not statistic)
        outputs = tuple(shapes[o] for o in node.output if o in shapes)
        rows.append(
            LayerRow(
                name=node.name or f"{node.op_type}_{index}",
                type=node.op_type,
                output_shapes=outputs if len(outputs) == len(node.output) and outputs else None,
                trainable_params=trainable,
                non_trainable_params=statistics,
                buffers=statistics,
            )
        )
    trainable = sum(r.trainable_params for r in rows)
    buffers = sum(r.buffers for r in rows)
    floating = [t for t in graph.initializer if _floating(t.data_type)]
    stored = sum(_numel(t) for t in floating)
    read_names = {t.name for _, read in parameter_inputs(graph) for _, t, _ in read}
    unread = [t for t in floating if t.name not in read_names]
    integers = [t for t in graph.initializer if not _floating(t.data_type)]

    read_stored = stored - sum(_numel(t) for t in unread)
    shared = trainable + buffers - read_stored
    notes = [
        f"ONNX stores {stored:,} values in {len(floating)} floating-point initializers"
        + (
            f"; Keras and PyTorch count {shared:,} more: the exporter stored equal tensors once (a fresh BN's "
            "input_mean shares B's zeros), and each input they feed counts"
            if shared > 0
            else ""
        )
        + "."
    ]
    if unread:
        notes.append(f"{len(unread)} floating initializers ({sum(_numel(t) for t in unread):,} values) no node reads.")
    if integers:
        notes.append(
            f"{len(integers)} integer initializers ({sum(_numel(t) for t in integers):,} values: shapes, axes, "
            "indices) are constants, not counted as parameters."
        )
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in graph.node)
    if bn_nodes == 0:
        notes.append(
            "No BatchNormalization node: an exporter folds a BN that follows a Conv into the Conv "
            "(torch.onnx.export in eval), leaving no running statistics to count."
        )
    if input_shape is not None:
        notes.append("input_shape is not used for an ONNX model: its shapes come from the graph.")
    inputs = [v for v in graph.input if v.name not in {t.name for t in graph.initializer}]
    input_shapes = tuple(shapes[v.name] for v in inputs if v.name in shapes) or None
    dtype = "float32"
    if inputs and inputs[0].type.tensor_type.elem_type:
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            pass
    return ModelSummary(
        name=graph.name or "model",
        framework="onnx",
        input_shapes=input_shapes,
        rows=rows,
        total=trainable + buffers,
        trainable=trainable,
        non_trainable=buffers,
        torch_params=trainable,
        torch_trainable=trainable,
        torch_buffers=buffers,
        torch_counters=0,
        memory=None,
        dtype=dtype,
        notes=notes,
        torch_running_stats=buffers,
        onnx_stored=stored,
    )
