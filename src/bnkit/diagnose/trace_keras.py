"""Trace a Keras functional or Sequential model: every layer of a known kind, its output and inputs.

The model's own graph is run (``Functional._run_through_graph``, what ``model(x)`` runs) with
each operation wrapped: layers whose class is in :data:`~bnkit.diagnose.kinds.KERAS_LAYERS` are
recorded, every other operation passes the provenance of its inputs on, and a model used as a
layer is entered, so that its layers are traced too (as ``bnkit.convert`` converts them in line).
A layer called more than once (shared weights) gives one entry per call.
"""

from __future__ import annotations

import numpy as np

from bnkit.conventions import KERAS, get_convention
from bnkit.diagnose.kinds import KERAS_LAYERS, KERAS_RANDOM_CUSTOM_LAYERS, KERAS_RANDOM_LAYERS, kind_of
from bnkit.diagnose.report import BatchNormState
from bnkit.diagnose.trace import (
    INPUT,
    Entry,
    Recorder,
    Trace,
    describe_operands,
    folds_into,
    magnitude,
    renorm_state,
    to_layout,
    to_numpy,
)

__all__ = ["trace_keras", "keras_kind", "keras_bn_state"]


def _class_names(layer) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def keras_kind(layer) -> str | None:
    names = _class_names(layer)
    for class_name, kind in KERAS_LAYERS:
        if class_name in names:
            if kind == "act" and "Activation" in names and _activation_name(layer) is None:
                return None  # Activation("linear") changes nothing
            if class_name == "Rescaling" and all(np.size(v) == 1 for v in (layer.scale, layer.offset)):
                return None  # x * 0.5 + 1: numbers are part of the operation, as in PyTorch
            return kind
    return None


def _activation_name(layer) -> str | None:
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return None if name in (None, "linear") else name


def keras_bn_state(layer, training: bool) -> BatchNormState:
    """A Keras batch norm's settings and the mode it runs in, and its moving statistics before the run."""
    conv = getattr(layer, "convention", None)
    try:
        conv = get_convention(conv) if conv is not None else KERAS
    except ValueError:
        conv = KERAS
    momentum = None if layer.momentum is None else float(layer.momentum)
    new_weight = None if momentum is None else conv.weights(momentum)[1]
    return BatchNormState(
        framework="keras",
        eps=float(layer.epsilon),
        momentum=momentum,
        momentum_weighs=conv.momentum_weighs,
        new_weight=new_weight,
        running_var_estimator=conv.running_var_estimator,
        tracks_running_stats=True,
        uses_batch_stats=bool(training and layer.trainable),
        in_training_mode=bool(training),
        trainable=bool(layer.trainable),
        running_mean_before=to_numpy(layer.moving_mean).copy(),
        running_var_before=to_numpy(layer.moving_variance).copy(),
        **renorm_state(layer, conv),
    )


def _layer_weights(layer, kind: str) -> dict[str, np.ndarray]:
    """Canonical parameters (PyTorch's shapes): ``weight`` (out, in per group, *kernel); BN statistics."""
    names = _class_names(layer)
    weights: dict[str, np.ndarray] = {}
    if kind == "conv":
        if "BaseSeparableConv" in names:
            depthwise = to_numpy(layer.depthwise_kernel)  # (*k, in, multiplier)
            r = depthwise.ndim - 2
            weights["depthwise"] = np.moveaxis(depthwise.reshape(*depthwise.shape[:r], -1), -1, 0)[:, None]
            pointwise = to_numpy(layer.pointwise_kernel)  # (1, .., 1, in, out)
            weights["weight"] = pointwise.reshape(pointwise.shape[-2], pointwise.shape[-1]).T
        elif "BaseDepthwiseConv" in names:
            kernel = to_numpy(layer.kernel)  # (*k, in, multiplier)
            r = kernel.ndim - 2
            weights["weight"] = np.moveaxis(kernel.reshape(*kernel.shape[:r], -1), -1, 0)[:, None]
        elif getattr(layer, "kernel", None) is not None:
            kernel = to_numpy(layer.kernel)
            r = kernel.ndim - 2
            order = (r, r + 1) if "BaseConvTranspose" in names else (r + 1, r)  # transpose: (*k, out, in)
            weights["weight"] = np.transpose(kernel, (*order, *range(r)))
    elif kind == "dense" and getattr(layer, "kernel", None) is not None:
        weights["weight"] = to_numpy(layer.kernel).T
    if kind in ("conv", "dense") and getattr(layer, "bias", None) is not None:
        weights["bias"] = to_numpy(layer.bias)
    elif kind == "bn":
        for key, attr in (("gamma", "gamma"), ("beta", "beta"), ("mean", "moving_mean"), ("var", "moving_variance")):
            value = getattr(layer, attr, None)
            if value is not None:
                weights[key] = to_numpy(value).copy()
        weights["eps"] = np.asarray(float(layer.epsilon))
        weights["axis"] = np.asarray(int(layer.axis))  # the channel axis: any, as Keras allows
    elif kind == "ln":
        for key in ("gamma", "beta"):
            if getattr(layer, key, None) is not None:
                weights[key] = to_numpy(getattr(layer, key)).copy()
        weights["eps"] = np.asarray(float(layer.epsilon))
    elif kind == "rnn":  # kernels as PyTorch's weight_ih, weight_hh per direction (GRU gates z, r, h -> r, z, n)
        for inner in (layer.forward_layer, layer.backward_layer) if "Bidirectional" in names else (layer,):
            for w in (inner.cell.kernel, inner.cell.recurrent_kernel):
                w = to_numpy(w).T
                if "GRU" in _class_names(inner):
                    z, r, h = np.split(w, 3)
                    w = np.concatenate([r, z, h])
                weights["weight"] = np.concatenate([weights.get("weight", np.zeros(0, w.dtype)), w.ravel()])
    elif kind == "scale":
        for k, w in enumerate(layer.weights):
            weights["constant" if k == 0 else f"constant_{k}"] = to_numpy(w).copy()
        for key in ("scale", "offset"):  # Rescaling's per-channel numbers
            if np.size(getattr(layer, key, 0)) > 1:
                weights[key] = np.asarray(getattr(layer, key), dtype="float32")
    return weights


def canonical(out: np.ndarray, kind: str, operand_shape, layout: str = "keras") -> np.ndarray:
    """A Keras output in PyTorch's layout: channels moved to axis 1, a flatten in C·H·W order (as it is
    in a channels_first model, ``layout="torch"``)."""
    if layout == "torch":
        return out
    if kind == "flatten" and operand_shape is not None and len(operand_shape) in (3, 4, 5):
        full = out.reshape((out.shape[0], *operand_shape[1:]))
        return np.ascontiguousarray(np.moveaxis(full, -1, 1)).reshape(out.shape[0], -1)
    return to_layout(out, "keras", "torch", copy=False)  # a view: compared, never written


def _functional(model):
    """The graph a Keras model runs: the model itself, or a Sequential model's functional model."""
    if hasattr(model, "_run_through_graph") and getattr(model, "_nodes_by_depth", None) is not None:
        return model
    functional = getattr(model, "_functional", None)
    if functional is not None and hasattr(functional, "_run_through_graph"):
        return functional
    return None


def _flat_tensors(value, keras) -> list:
    return [t for t in keras.tree.flatten(value) if keras.ops.is_tensor(t)]


class _Recorder(Recorder):
    def __init__(self, training: bool, keras, perturb=None, layout: str = "keras") -> None:
        super().__init__(perturb)
        self.training = training
        self.keras = keras
        self.bn_layers: list = []
        self.layout = layout  # "torch" for a channels_first model: its tensors are in PyTorch's layout

    def results(self, operands, result) -> list:
        # an identity returns its operand: nothing new
        return [out for out in _flat_tensors(result, self.keras) if all(out is not t for t in operands)]

    def wrap(self, op):
        """The operation_fn of ``_run_through_graph``: run ``op`` and record what it did."""

        def call(*args, **kwargs):
            inner = _functional(op) if isinstance(op, self.keras.Model) else None
            if inner is not None:  # a model used as a layer: trace its layers
                inputs = args[0] if len(args) == 1 else list(args)
                inputs = inner._standardize_inputs(inputs) if hasattr(inner, "_standardize_inputs") else inputs
                return inner._run_through_graph(inputs, operation_fn=self.wrap)
            names = _class_names(op)
            if names & {*KERAS_RANDOM_LAYERS, *KERAS_RANDOM_CUSTOM_LAYERS}:
                kwargs["training"] = False  # random masks cannot agree across frameworks
            elif "training" in getattr(op, "_call_context_args", ()):
                kwargs["training"] = self.training
            kind = keras_kind(op)
            state = keras_bn_state(op, self.training) if kind == "bn" else None
            result = op(*args, **kwargs)
            operands = _flat_tensors((args, kwargs), self.keras)
            data = [t for t in operands if self.of(t)]
            out = _flat_tensors(result, self.keras)
            if kind in ("add", "mul", "concat") and len(data) < 2:
                kind = None  # keras.ops.add(x, 1.0): not a sum of two layers' outputs
            elif kind == "scale" and len(data) != 1:
                kind = None
            elif (
                kind in ("pool", "gpool")
                and len(data) == 1
                and len(out) == 1
                and tuple(data[0].shape) == tuple(out[0].shape)
                and np.array_equal(to_numpy(data[0]), to_numpy(out[0]))
            ):
                kind = None  # an identity pooling (adaptive to its input's size): a converter may drop it
            if kind is None or not data or not out:
                self.pass_on(operands, result)
                return result
            went_on = self.record(op, kind, data, out[0], state)
            if len(out) > 1:
                self.pass_on([out[0]], result)
                return result
            return went_on

        return call

    def perturbed(self, entry: Entry, kind: str, output):
        """``output``, with simulated rounding noise when this run measures its propagation."""
        if self.perturb is None:
            return output
        noisy = self.perturb(entry, kind, output)
        if noisy is None:
            return output
        if isinstance(noisy, np.ndarray):  # a backend other than torch
            dtype = self.keras.backend.standardize_dtype(output.dtype)
            return self.keras.ops.convert_to_tensor(noisy, dtype=dtype)
        return noisy

    def record(self, layer, kind: str, operands: list, output, state):
        """Record a layer's output; return the tensor the model goes on with (``output``, or it
        with simulated rounding noise)."""
        inputs = [self.of(t) for t in operands]
        type_name = type(layer).__name__
        act = _activation_name(layer)
        if act is not None and (kind in ("conv", "dense") or type_name == "Activation"):
            type_name += f"({act})"  # Activation(hard_swish): which one, as PyTorch's class names say
        p = folds_into(self.entries, kind, inputs)
        if p is not None and self.output_ids.get(p) == id(operands[0]) and p not in self.consumed:
            # an activation layer applied to a convolution's or dense layer's output alone, or a
            # chain of arithmetic with constants: folded in
            prev = self.entries[p]
            output = self.perturbed(prev, kind, output)
            raw = to_numpy(output).copy()
            prev.type = f"{prev.type}+{type_name}"
            prev.set_output(raw, to_layout(raw, self.layout, "torch", copy=False))
            prev.callables.append(layer)
            for key, value in _layer_weights(layer, kind).items():
                prev.weights[f"{key}_{len(prev.callables) - 1}"] = value
            self.consumed.add(p)
            self.output_ids[p] = id(output)
            self.source(output, (p,))
            return output
        for operand in inputs:
            self.consumed.update(operand)
        index = len(self.entries)
        raw = to_numpy(output).copy()
        operand_shape = tuple(operands[0].shape) if operands else None
        canonical_raw = canonical(raw, kind, operand_shape, self.layout)
        entry = Entry(index, self.unique(layer.name), type_name, kind, raw, canonical_raw)
        entry.inputs = inputs
        keep = kind_of(kind).parametric and len(operands) == 1
        entry.input_scales, entry.input_shapes, entry.inputs_finite, kept = describe_operands(self, operands, keep)
        if keep:
            entry.input_raw = kept
        entry.callables = [layer]
        entry.weights = _layer_weights(layer, kind)
        if kind == "flatten":
            entry.pre_flatten_shape = operand_shape
        if state is not None:
            entry.bn = state
            self.bn_layers.append((layer, state))
        self.entries.append(entry)
        if self.perturb is not None:
            output = self.perturbed(entry, kind, output)
            raw = to_numpy(output).copy()
            entry.set_output(raw, canonical(raw, kind, operand_shape, self.layout))
        self.output_ids[index] = id(output)
        self.source(output, (index,))
        return output


def data_layout(model) -> str:
    """The layout of a Keras model's tensors: ``"torch"`` (N, C, *spatial) for a channels_first model,
    else ``"keras"`` (channels-last)."""
    from bnkit.keras.data_format import is_channels_first

    return "torch" if is_channels_first(model) else "keras"


def trace_keras(model, x: np.ndarray, training: bool, perturb=None) -> Trace:
    """Run ``model`` on ``x`` (NHWC) through its own graph and record every layer of a known kind.

    A training-mode run updates the moving statistics; they (and every other weight) are
    restored afterwards. ``perturb`` as in :func:`bnkit.diagnose.trace_torch.trace_torch`.
    """
    from bnkit.keras import keras

    graph = _functional(model)
    if graph is None or not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise ValueError(
            f"the Keras model {model.name!r} has no defined inputs: build it (call it once, or give "
            "keras.Input(shape=...)) before comparing; subclassed models have no graph to trace"
        )
    if len(graph.inputs) != 1:
        raise ValueError(f"compare takes models with one input; {model.name!r} has {len(graph.inputs)}")
    recorder = _Recorder(training, keras, perturb, data_layout(model))
    dtype = graph.inputs[0].dtype or "float32"
    inp = keras.ops.convert_to_tensor(x, dtype=dtype)
    recorder.source(inp, (INPUT,))
    saved = [to_numpy(v).copy() for v in model.weights] if training else None
    try:
        results = graph._run_through_graph([inp], operation_fn=recorder.wrap)
        for layer, state in recorder.bn_layers:
            state.running_mean_after = to_numpy(layer.moving_mean).copy()
            state.running_var_after = to_numpy(layer.moving_variance).copy()
            if state.renorm:
                state.renorm_after = (to_numpy(layer.renorm_mean).copy(), to_numpy(layer.renorm_stddev).copy())
    finally:
        if saved is not None:
            for v, value in zip(model.weights, saved, strict=True):
                v.assign(value)
    final = _flat_tensors(results, keras)[0]
    producers = recorder.of(final)
    if len(producers) == 1 and producers[0] != INPUT and recorder.output_ids.get(producers[0]) == id(final):
        output = recorder.entries[producers[0]].canonical  # e.g. a model ending in Flatten: C·H·W order
    else:
        output = to_layout(to_numpy(final), recorder.layout, "torch")
    name = str(getattr(final, "dtype", "float32")).removeprefix("torch.")
    try:
        eps = float(np.finfo(np.dtype(name)).eps)
    except TypeError:
        eps = float(np.finfo(np.float32).eps)
    return Trace(
        framework="keras",
        entries=recorder.entries,
        output=np.array(output, copy=True),
        output_producers=producers,
        input_scale=magnitude(x),
        dtype_eps=eps,
        model=model,
    )
