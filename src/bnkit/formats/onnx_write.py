r"""``.onnx`` written from a PyTorch module or a Keras model, every batch norm kept as a
``BatchNormalization`` node with the layer's exact epsilon and its momentum in ONNX's meaning.

How. torch 2.13's exporters (``dynamo=True`` and the TorchScript one) fold a batch norm that follows a
convolution into the convolution in eval, with no switch to keep it: the TorchScript exporter's eval
peephole pass merges every ``onnx::Conv`` → ``onnx::BatchNormalization`` pair it sees. bnkit therefore
exports with the TorchScript exporter (``torch.onnx.export(dynamo=False)``) but never lets it see a batch
norm: the module is traced with :func:`bnkit.torch.tracing.symbolic_trace` (batch norms stay
``call_module`` leaves; a Keras model goes through :func:`bnkit.convert.keras_to_torch` first, a loaded
``.pt2`` program already is such a graph), and every leaf with a registered emitter
(:mod:`bnkit.formats.onnx_emit`, one file per family) is replaced by a placeholder whose ONNX form is a
node of bnkit's private domain — which no exporter pass matches, so none folds it. After the export the
placeholders become standard-domain nodes (``BatchNormalization`` with the emitter's ``epsilon``,
``momentum`` and, in a training-mode file, ``training_mode=1`` and the running-statistic outputs, which
become graph outputs ``<layer>.running_mean`` / ``<layer>.running_var``), named after their layer.

Why not an emitter for every operator: every other layer is written by the exporter exactly as
``torch.onnx.export`` writes it — the real tool's translation of each operator, which onnxruntime runs
within float rounding of PyTorch — and the only thing wrong with its output is the fold. Keeping the
exporter for them and overriding only the layers whose ONNX form bnkit must control keeps the writer
small and its coverage that of the exporter; a layer the exporter cannot write fails with its message.

Opsets 9 to the newest ``onnx`` defines: the exporter writes up to its own newest
(``torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``, 20 in torch 2.13); a newer one is
reached with ``onnx.version_converter``. An inference ``BatchNormalization`` has one form from opset 9
on (five inputs, ``epsilon``, ``momentum``, one output); a training-mode one needs ``training_mode``
(opset 14): opsets 9 to 13 imply training from the number of outputs, and bnkit writes training-mode
files from opset 14 only.

Checked before anything is written: the file is checked by ``onnx.checker`` and run by onnxruntime
(CPU) on a random batch of 2 against the source model — the Keras model itself for a Keras source — in
inference; the largest difference must stay within :data:`~bnkit.formats.keras_h5.ROUND_TRIP_TOLERANCE`
(1e-5) of the largest output, and the file must hold one ``BatchNormalization`` per batch-norm call of
the source. A training-mode file is also run in training mode against the PyTorch module with its
batch norms in training (its output and updated statistics within :data:`TRAINING_TOLERANCE`). Then it
is written atomically (:func:`~bnkit.formats.atomic.atomic_path`), never over an existing file without
``force``. The file takes and returns PyTorch's layout (``N, C, H, W``), a Keras model's input
included (ONNX's convolutions are channels-first).
"""

from __future__ import annotations

import copy
import importlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.atomic import atomic_path, check_writable
from bnkit.formats.keras_h5 import ROUND_TRIP_TOLERANCE, RoundTrip
from bnkit.text import one_line, printable

__all__ = ["write", "OnnxWritten", "DEFAULT_OPSET", "MIN_OPSET", "newest_opset", "TRAINING_TOLERANCE"]

DEFAULT_OPSET = 17
MIN_OPSET = 9
TRAINING_MIN_OPSET = 14
# A training-mode file against PyTorch's training forward: each batch norm sums its batch statistics
# in another order than PyTorch's kernel, and a deep network passes that rounding on (see
# tests/convert/real_networks.py's TRAINING_TOL, measured on ResNet50)
TRAINING_TOLERANCE = 1e-4
_DOMAIN = "bnkit.onnx_write"  # the placeholders' private domain; never in a written file
_PROTOBUF_LIMIT = 2**31 - 1  # one ModelProto serialised; bnkit writes no external data


@dataclass(frozen=True)
class OnnxWritten:
    """What :func:`write` checked: the file against the source in inference (and, for a training-mode
    file, against PyTorch's training forward), its opset and its ``BatchNormalization`` nodes."""

    round_trip: RoundTrip
    opset: int
    batch_norms: int
    training_error: float | None = None  # relative, output and updated statistics, worst of them


def newest_opset() -> int:
    """The newest opset of the installed ``onnx``."""
    onnx = _onnx()
    return int(onnx.defs.onnx_opset_version())


def write(
    model, path, *, input_shape=None, opset: int = DEFAULT_OPSET, training: bool = False, force: bool = False
) -> OnnxWritten:
    """Write ``model`` (a ``torch.nn.Module``, a loaded ``.pt2`` graph or a Keras model) to ``path`` as
    ONNX (see the module doc); raise :class:`ModelFileError` in one line naming what stops it.

    ``input_shape``: without the batch, in PyTorch's layout (``C,H,W``), or a list of them for several
    inputs; read from a Keras model's inputs where left out. ``training``: batch norms in training
    mode (``training_mode=1``, their updated running statistics as extra outputs; opset 14 on).
    """
    from bnkit.formats.onnx_emit import NotWritable
    from bnkit.frameworks import framework_of

    path = Path(path)
    shown = printable(str(path))
    onnx = _onnx()
    newest = int(onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ModelFileError(f"{shown}: opset {opset!r} is not supported; give {MIN_OPSET} to {newest}")
    if training and opset < TRAINING_MIN_OPSET:
        raise ModelFileError(
            f"{shown}: a training-mode file needs opset {TRAINING_MIN_OPSET} or newer (BatchNormalization's "
            f"training_mode attribute); opsets 9 to 13 imply training from the number of outputs; got {opset}"
        )
    check_writable(path, force)  # before the slow part
    framework = framework_of(model)
    module, shapes, keras_layout = _torch_module(model, framework, input_shape, shown)
    try:
        proto, expected = _export(module, shapes, opset, training, shown)
    except NotWritable as e:
        raise ModelFileError(f"{shown}: not written: {e}") from e
    found = sum(node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") for node in proto.graph.node)
    if found != expected:
        raise ModelFileError(
            f"{shown}: not written: the source calls {expected} batch norms, the exported graph holds {found} "
            "BatchNormalization nodes (a batch norm called as a function, folded by the exporter?)"
        )
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise ModelFileError(f"{shown}: not written: {len(data)} bytes, over protobuf's 2 GiB limit for one file")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelFileError(f"{shown}: not written: onnx.checker refuses the exported graph ({one_line(e)})") from e
    round_trip = _check_inference(model, module, framework, data, shapes, keras_layout, training, shown)
    training_error = _check_training(module, data, shapes, proto, shown) if training else None
    with atomic_path(path, force) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return OnnxWritten(round_trip, opset, found, training_error)


# ------------------------------------------------------------------------------------------ the module


def _torch_module(model, framework: str, input_shape, shown: str):
    """``(module, shapes, keras_layout)``: the PyTorch module to export, its input shapes (PyTorch's
    layout, no batch), and for a Keras source whether its inputs are channels-last (to be permuted)."""
    shapes = None
    if input_shape is not None:
        given = list(input_shape)
        shapes = [tuple(s) for s in given] if given and isinstance(given[0], (tuple, list)) else [tuple(given)]
    if framework == "keras":
        from bnkit.convert import UnsupportedLayerError, keras_to_torch
        from bnkit.keras.data_format import is_channels_first

        channels_last = not is_channels_first(model)
        if shapes is None:
            shapes = []
            for tensor in model.inputs:
                shape = tuple(tensor.shape[1:])
                if any(d is None for d in shape):
                    raise ModelFileError(
                        f"{shown}: the Keras model's input shape {shape} is not fully known; give input_shape"
                    )
                shapes.append(shape if len(shape) <= 1 or not channels_last else (shape[-1], *shape[:-1]))
        try:
            module = keras_to_torch(model)
        except UnsupportedLayerError as e:
            raise ModelFileError(f"{shown}: not written: {e}") from e
        return module, shapes, channels_last
    if framework != "torch":
        raise ModelFileError(f"{shown}: an ONNX file is written from a PyTorch module or a Keras model")
    if shapes is None:
        shapes = _placeholder_shapes(model)
        if shapes is None:
            raise ModelFileError(f"{shown}: writing ONNX needs the input shape (--input-shape, C,H,W)")
    return model, shapes, False


def _placeholder_shapes(model):
    """The input shapes a loaded ``.pt2`` graph records (without the batch), or None."""
    shapes = []
    for node in getattr(getattr(model, "graph", None), "nodes", ()):
        if node.op == "placeholder":
            value = node.meta.get("val")
            if not hasattr(value, "shape"):
                return None
            shapes.append(tuple(int(d) for d in value.shape[1:]))
    return shapes or None


# ------------------------------------------------------------------------------------------ export


def _export(module, shapes, opset: int, training: bool, shown: str):
    """The exported ``ModelProto`` with the placeholders made standard nodes, and how many batch norms
    the source calls (placeholders and batch norms called as functions)."""
    import torch
    import torch.nn.functional as F
    from torch.onnx import _constants

    from bnkit.formats.onnx_emit import emitter_for
    from bnkit.formats.quiet import captured
    from bnkit.torch.tracing import symbolic_trace

    onnx = _onnx()
    source = copy.deepcopy(module).eval()  # the placeholders replace layers of a copy, never the caller's
    try:
        graph_module = symbolic_trace(source)
    except Exception as e:
        raise ModelFileError(f"{shown}: not written: torch.fx cannot trace the module ({one_line(e, 300)})") from e
    nodes, functional = [], 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            functional += 1
        if node.op != "call_module":
            continue
        layer = graph_module.get_submodule(node.target)
        emit = emitter_for(layer)
        if emit is None:
            continue
        spec = emit(layer, node.target, training)
        target = f"_bnkit_onnx_{len(nodes)}"
        graph_module.add_submodule(target, _Placeholder(spec, node.target, len(nodes)))
        nodes.append((node.target, spec))
        node.target = target
    graph_module.recompile()
    exporter_opset = min(opset, int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET))
    examples = tuple(torch.zeros((2, *shape)) for shape in shapes)
    names = [f"input_{i}" if len(shapes) > 1 else "input" for i in range(len(shapes))]
    try:
        with torch.no_grad():
            out = graph_module(*examples)
    except Exception as e:
        raise ModelFileError(
            f"{shown}: not written: the module does not run on inputs of shapes {[tuple(x.shape) for x in examples]} "
            f"({type(e).__name__}: {one_line(e, 200)}); give input_shape"
        ) from e
    count = len(out) if isinstance(out, (list, tuple)) else 1
    # named outputs: the exporter mistakes a GraphModule's fx graph for a TorchScript one when it names them
    output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    buffer = io.BytesIO()
    try:
        with captured(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph_module, examples, buffer, dynamo=False, opset_version=exporter_opset, input_names=names,
                output_names=output_names, dynamic_axes={name: {0: "batch"} for name in names},
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
            )  # fmt: skip
    except Exception as e:
        raise ModelFileError(f"{shown}: not written: torch.onnx.export failed ({one_line(e, 300)})") from e
    proto = onnx.load_from_string(buffer.getvalue())
    _standard_nodes(proto, nodes)
    if opset != exporter_opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as e:
            raise ModelFileError(
                f"{shown}: not written: onnx.version_converter cannot take the graph from opset {exporter_opset} "
                f"to {opset} ({one_line(e, 300)})"
            ) from e
    return proto, len(nodes) + functional


class _Placeholder:
    """Builds the placeholder module (a class made on first use: torch is imported only in a writer)."""

    def __new__(cls, spec, name: str, index: int):
        return _placeholder_class()(spec, name, index)


_PLACEHOLDER_CLASS = None


def _placeholder_class():
    global _PLACEHOLDER_CLASS
    if _PLACEHOLDER_CLASS is not None:
        return _PLACEHOLDER_CLASS
    import torch
    from torch import nn

    class Emitted(torch.autograd.Function):
        """Computes the emitter's reference; its ONNX form is a node of bnkit's private domain."""

        @staticmethod
        def forward(ctx, x, index, outputs, reference, *tensors):
            result = reference(x, *tensors)
            if outputs == 1:
                return result
            return (result, *(t.detach().clone() for t in tensors[2 : 2 + outputs - 1]))

        @staticmethod
        def symbolic(g, x, index, outputs, reference, *tensors):
            out = g.op(f"{_DOMAIN}::Node", x, *tensors, index_i=index, outputs=outputs)
            values = out if outputs > 1 else (out,)
            values[0].setType(x.type())
            for value, tensor in zip(values[1:], tensors[2:], strict=False):
                value.setType(tensor.type())
            return out

    class Placeholder(nn.Module):
        def __init__(self, spec, name: str, index: int) -> None:
            super().__init__()
            self.spec, self.layer_name, self.index = spec, name, index
            for key, value in spec.inputs.items():
                # buffers (never parameters): the exporter writes them as initializers either way
                self.register_buffer(key, value.detach().clone())

        def forward(self, x):
            tensors = [getattr(self, key) for key in self.spec.inputs]
            outputs = 1 + len(self.spec.state_outputs)
            result = Emitted.apply(x, self.index, outputs, self.spec.reference, *tensors)
            return result[0] if outputs > 1 else result

    _PLACEHOLDER_CLASS = Placeholder
    return Placeholder


def _standard_nodes(proto, specs: list) -> None:
    """The placeholder nodes as the emitters' standard-domain nodes, named after their layers; a
    training-mode node's state outputs as graph outputs ``<layer>.<output>``."""
    onnx = _onnx()
    helper = onnx.helper
    for node in proto.graph.node:
        if node.domain != _DOMAIN:
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        name, spec = specs[index]
        node.domain, node.op_type, node.name = "", spec.op_type, name
        del node.attribute[:]
        for key, value in spec.attributes.items():
            node.attribute.append(helper.make_attribute(key, value))
        for position, state in enumerate(spec.state_outputs, start=1):
            value_name = f"{name}.{state}"
            node.output[position] = value_name
            channels = int(spec.inputs["mean"].shape[0]) if "mean" in spec.inputs else None
            proto.graph.output.append(helper.make_tensor_value_info(value_name, onnx.TensorProto.FLOAT, [channels]))
    kept = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


# ------------------------------------------------------------------------------------------ checks


def _session(data: bytes):
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings are not the user's concern here
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _batch(shapes) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, *shape)).astype("float32") for shape in shapes]


def _check_inference(model, module, framework, data, shapes, keras_layout, training, shown) -> RoundTrip:
    """The file in onnxruntime against the source model (the Keras model itself for a Keras source) in
    inference: ``max |file - source| / max |source|`` over the outputs within ``ROUND_TRIP_TOLERANCE``.
    A training-mode file is checked through its inference twin (the same graph with ``training_mode=0``
    and one output per batch norm); its training mode is :func:`_check_training`'s."""
    import numpy as np
    import torch

    batch = _batch(shapes)
    if training:  # the same graph in inference, for the check against the source in inference
        onnx = _onnx()
        proto = onnx.load_from_string(data)
        states = {name for node in proto.graph.node if node.op_type == "BatchNormalization" for name in node.output[1:]}
        for node in proto.graph.node:
            if node.op_type == "BatchNormalization":
                for attribute in node.attribute:
                    if attribute.name == "training_mode":
                        attribute.i = 0
                del node.output[1:]
        kept = [o for o in proto.graph.output if o.name not in states]
        del proto.graph.output[:]
        proto.graph.output.extend(kept)
        data = proto.SerializeToString()
    try:
        session = _session(data)
        feed = {i.name: b for i, b in zip(session.get_inputs(), batch, strict=True)}
        got = session.run(None, feed)
    except Exception as e:
        raise ModelFileError(f"{shown}: not written: onnxruntime cannot run the file ({one_line(e, 300)})") from e
    if framework == "keras":
        from bnkit.keras import keras

        inputs = [np.moveaxis(b, 1, -1) if keras_layout and b.ndim > 2 else b for b in batch]
        expected = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
        expected = expected if isinstance(expected, (list, tuple)) else [expected]
        expected = [np.asarray(keras.ops.convert_to_numpy(e)) for e in expected]
        got = [np.moveaxis(g, 1, -1) if keras_layout and g.ndim > 2 else g for g in got[: len(expected)]]
    else:
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(*[torch.from_numpy(b) for b in batch])
        finally:
            module.train(was)
        expected = [t.detach().numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
        got = got[: len(expected)]
    for a, b in zip(expected, got, strict=True):
        if a.shape != b.shape:
            raise ModelFileError(f"{shown}: not written: the file's output has shape {b.shape}, the model's {a.shape}")
    result = RoundTrip.between(expected, got)
    if not result.relative <= ROUND_TRIP_TOLERANCE:
        raise ModelFileError(
            f"{shown}: not written: onnxruntime's output differs from the model's by {result.difference:.3g}, "
            f"{result.relative:.3g} of the largest output {result.largest:.3g} (tolerance {ROUND_TRIP_TOLERANCE:g}) "
            "on a random batch"
        )
    return result


def _check_training(module, data, shapes, proto, shown) -> float:
    """The training-mode file against the PyTorch module with its batch norms in training (the rest
    in eval): output and updated running statistics, relative to each one's largest value."""
    import numpy as np
    import torch
    from torch import nn

    from bnkit.torch.frozen import is_batch_norm

    twin = copy.deepcopy(module).eval()
    for layer in twin.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) or is_batch_norm(layer):
            layer.train()
    batch = _batch(shapes)
    with torch.no_grad():
        out = twin(*[torch.from_numpy(b) for b in batch])
    expected = [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
    session = _session(data)
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: b for i, b in zip(session.get_inputs(), batch, strict=True)}
    got = dict(zip(names, session.run(None, feed), strict=True))
    state = dict(twin.named_buffers())
    pairs = list(zip(expected, [got[n] for n in names[: len(expected)]], strict=True))
    for name in names[len(expected) :]:
        layer, _, what = name.rpartition(".")
        pairs.append((state[f"{layer}.{what}"].numpy(), got[name]))
    worst = 0.0
    for a, b in pairs:
        largest = float(np.max(np.abs(a))) if a.size else 0.0
        error = float(np.max(np.abs(a - b))) if a.size else 0.0
        worst = max(worst, error / largest if largest > 0 else error)
    if not worst <= TRAINING_TOLERANCE:
        raise ModelFileError(
            f"{shown}: not written: in training mode onnxruntime differs from the module's training forward by "
            f"{worst:.3g} relative (output or updated statistics; tolerance {TRAINING_TOLERANCE:g})"
        )
    return worst


def _onnx():
    from bnkit.frameworks import import_optional

    onnx = import_optional("onnx", "writing ONNX")
    importlib.import_module("onnx.version_converter")  # a submodule onnx does not import itself
    return onnx


def _onnxruntime():
    from bnkit.frameworks import import_optional

    return import_optional("onnxruntime", "checking an ONNX file")
