"""Keras 3 models as Keras 2 (tf.keras / tf-keras 2.x) writes them: what a legacy ``.h5`` that tf-keras 2
loads must hold, translated from the Keras 3 model (the inverse of :mod:`bnkit.formats.keras2_config`).

Keras 3's own legacy ``.h5`` writer keeps Keras 3's config (``batch_shape``, dtype policy objects,
call nodes as ``{"args": ..., "kwargs": ...}``, bnkit's registered classes), which tf-keras 2 cannot
load. :func:`keras2_model` rebuilds the model's config in Keras 2's format, layer by layer, with one
small translator per class (:data:`TRANSLATORS` for layers, :data:`OPERATIONS` for the Keras
operations a functional model records, such as ``x * 2.0``; the translators are in
:mod:`bnkit.formats.keras2_write_layers`); a class without a translator, or a
setting a translator cannot carry over exactly, is refused by layer name (:class:`NotWritable`).
Exact means: tf-keras 2 computes what the Keras 3 layer computes, in inference and in training
(up to float rounding order).

* Every layer: the dtype policy object becomes its name; initializers, regularizers and constraints
  lose Keras 3's ``module`` / ``registered_name`` and its new arguments at their defaults; Keras
  3-only arguments (``quantization_config``, ``lora_rank``, ...) are dropped at the value that means
  Keras 2's behaviour, refused otherwise; activations by Keras 2's names (``silu`` is ``swish``).
* ``InputLayer``: ``batch_shape`` is ``batch_input_shape``. ``LeakyReLU``: ``negative_slope`` is ``alpha``.
* ``BatchNormalization`` (Keras' and bnkit's, any convention): tf-keras 2's layer updates its moving
  variance with the *unbiased* batch variance when it runs fused (``fused=True``: 4-D or 5-D inputs,
  channel axis last or 1) and with the *biased* one otherwise (``fused=False``), measured with
  tf-keras 2.21; its momentum weighs the old value. So a biased batch norm (Keras') is written with
  ``fused=False``, an unbiased one (PyTorch's, bnkit's ``convention="torch"``) with ``fused=True`` and
  ``momentum = 1 - m``; on a 2-D or 3-D input (``BatchNorm1d``), between two ``Reshape`` layers, to
  ``(N, 1, 1, C)`` or ``(N, L, 1, C)`` and back (the same values per channel). Batch renormalization
  (``renorm=True``, never fused in tf-keras 2) is written as it is where the moving statistics are
  biased (tf-keras 2's and Keras 3's train alike, measured). One that neither can carry
  (``momentum=None``, unbiased with ``renorm`` or ``synchronized``) is refused. bnkit's
  ``num_batches_tracked`` counter is not written (Keras 2 has none; it only matters for ``momentum=None``).
* Operations: ``x + c``, ``x - c``, ``c - x``, ``x * c``, ``-x`` become ``Rescaling`` (``x·s + o``,
  the same float operations), ``x / c`` (c > 0) a ``Normalization`` with mean 0 and variance c²
  (tf-keras divides by ``sqrt(c²)``, which is c exactly in IEEE arithmetic), ``maximum(x, 0)`` a
  ``ReLU``; with two tensors, the merge layers ``Add``, ``Subtract``, ``Multiply``, ``Maximum``, ``Minimum``.
* bnkit's ``ChannelAffine`` (``x·scale + shift`` per channel, left by ``fold_bn``) on a 4-D channels-last
  input: a frozen 1×1 ``DepthwiseConv2D`` with a bias (the same product and sum).
* bnkit's other Keras layers (``ElementwiseConstant``, ``Slice``, ``StochasticDepth``) and Keras 3
  layers tf-keras 2 lacks are refused by name.

The layers are listed in the order tf-keras 2 gives ``model.layers`` for the written graph (its
``_map_graph_network``), because tf-keras 2 loads an ``.h5`` file's weights by that order.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "NotWritable", "Keras2Layer", "Keras2Model", "TRANSLATORS", "OPERATIONS", "DTYPES", "keras2_model", "keras2_dtype",
    "flatten",
]  # fmt: skip


class NotWritable(ValueError):
    """A layer tf-keras 2 cannot load as exactly the layer it is: the message names the layer and what."""


@dataclass
class Ref:
    """A tensor in a call: output ``tensor`` of node ``node`` of layer ``name``."""

    name: str
    node: int
    tensor: int
    shape: tuple | None = None
    dtype: str | None = None


@dataclass
class Call:
    """One call of a layer (a node): its arguments, tensors as :class:`Ref`."""

    args: list
    kwargs: dict

    def refs(self) -> list[Ref]:
        return [a for a in flatten([self.args, list(self.kwargs.values())]) if isinstance(a, Ref)]


@dataclass
class Keras2Layer:
    """One layer on its way from Keras 3 to Keras 2: translators change ``class_name``, ``config``,
    ``calls`` and ``weights`` (``(variable name, value)``, in Keras' loading order) in place."""

    name: str
    class_name: str
    config: dict
    source: object  # the Keras 3 layer or operation
    calls: list[Call] = field(default_factory=list)
    weights: list[tuple[str, np.ndarray]] = field(default_factory=list)
    shown: str = ""

    def refuse(self, what: str) -> NotWritable:
        return NotWritable(f"{self.shown}: {what}")

    # set by a translator: run the layer on its input reshaped to this 4-D shape (without the batch),
    # and reshape its output back (a Reshape layer before and after it)
    as_4d: tuple | None = None

    def input_shape(self) -> tuple | None:
        """The shape of the first input (the batch included, None where unknown)."""
        shapes = [r.shape for call in self.calls for r in call.refs()[:1] if r.shape is not None]
        if shapes:
            return tuple(shapes[0])
        try:  # a Sequential's config holds no calls
            return tuple(self.source.input.shape)
        except (AttributeError, ValueError):
            return None

    def input_rank(self) -> int | None:
        shape = self.input_shape()
        return None if shape is None else len(shape)


@dataclass
class Keras2Model:
    """What a Keras 2 ``.h5`` holds: ``config`` (the ``model_config`` attribute) and ``layers`` in
    tf-keras 2's ``model.layers`` order, each with its weights."""

    config: dict
    layers: list[Keras2Layer]


TRANSLATORS: dict[str, Callable[[Keras2Layer], None]] = {}  # Keras 3 layer class (legacy name) -> translator
OPERATIONS: dict[str, Callable[[Keras2Layer], None]] = {}  # Keras 3 operation class -> translator


def translates(*class_names: str, table: dict | None = None):
    def register(function):
        for name in class_names:
            (TRANSLATORS if table is None else table)[name] = function
        return function

    return register


# ------------------------------------------------------------------------------------------ the model


def keras2_model(model) -> Keras2Model:
    """``model`` (a Keras 3 functional or Sequential model) as Keras 2 writes it; :class:`NotWritable`
    names the first layer that tf-keras 2 could not load as exactly that layer."""
    from bnkit.keras import keras  # noqa: F401 - the backend bnkit chooses, before Keras' modules

    # isort: split
    from keras.src.legacy.saving import saving_options

    from bnkit.formats import keras2_write_layers  # noqa: F401 - registers the translators

    with saving_options.keras_option_scope(use_legacy_config=True):  # class names as Keras 2 spells them
        try:
            config = model.get_config()
        except NotImplementedError:
            config = None
    kind = type(model).__name__
    if kind not in ("Functional", "Sequential") or not isinstance(config, dict) or "layers" not in config:
        raise NotWritable(
            f"the model is a {kind}, not a functional or Sequential model: Keras 2 .h5 files hold only those"
        )
    operations = {op.name: op for op in _operations(model)}
    layers = [_layer(entry, operations) for entry in config["layers"]]
    for layer in layers:
        _translate(layer)
    layers, moved = _reshaped_to_4d(layers)
    names = _tf_names([config["name"]] + [layer.name for layer in layers])
    for layer in layers:
        layer.name = names[layer.name]
        if "name" in layer.config:
            layer.config["name"] = layer.name
        for call in layer.calls:
            for ref in call.refs():
                ref.name = names[ref.name]
    if kind == "Sequential":
        written = [layer for layer in layers if layer.class_name != "InputLayer"]
        entries = [{"class_name": layer.class_name, "config": layer.config} for layer in layers]
        sequential = {"name": names[config["name"]], "layers": entries}
        return Keras2Model({"class_name": "Sequential", "config": sequential}, written)
    inputs = [[names[n], *rest] for n, *rest in _references(config["input_layers"])]
    outputs = [[names[moved.get(n, n)], *rest] for n, *rest in _references(config["output_layers"])]
    order = _tf_keras_order({layer.name: layer for layer in layers}, inputs, outputs)
    entries = [
        {"class_name": layer.class_name, "config": layer.config, "name": layer.name, "inbound_nodes": _nodes(layer)}
        for layer in order
    ]
    functional = {"name": names[config["name"]], "layers": entries, "input_layers": inputs, "output_layers": outputs}
    return Keras2Model({"class_name": "Functional", "config": functional}, order)


def _reshaped_to_4d(layers: list[Keras2Layer]) -> tuple[list[Keras2Layer], dict[str, str]]:
    """``layers`` with a ``Reshape`` before and after each layer a translator set ``as_4d`` on, every use
    of its output now the second ``Reshape``'s; and ``{layer: the Reshape after it}``."""
    taken = {layer.name for layer in layers}

    def unique(base: str) -> str:
        name, count = base, 1
        while name in taken:
            count += 1
            name = f"{base}_{count}"
        taken.add(name)
        return name

    result, moved = [], {}
    for layer in layers:
        if not layer.as_4d:
            result.append(layer)
            continue
        if len(layer.calls) > 1:
            raise layer.refuse(f"called {len(layer.calls)} times (shared), which bnkit writes only called once")
        back = [-1 if d is None else d for d in layer.input_shape()[1:]]
        pair = []
        for suffix, shape in (("4d", list(layer.as_4d)), ("back", back)):
            name = unique(f"{layer.name}_{suffix}")
            config = {"name": name, "trainable": True, "dtype": layer.config.get("dtype"), "target_shape": shape}
            pair.append(Keras2Layer(name, "Reshape", config, None, shown=f"layer {name!r} (Reshape)"))
        before, after = pair
        if layer.calls:  # functional: the calls move to the first Reshape (Sequential: none)
            before.calls, layer.calls = layer.calls, [Call([Ref(before.name, 0, 0)], {})]
            after.calls = [Call([Ref(layer.name, 0, 0)], {})]
        moved[layer.name] = after.name
        result += [before, layer, after]
    for layer in result:
        if layer.name not in moved.values():
            for call in layer.calls:
                for ref in call.refs():
                    ref.name = moved.get(ref.name, ref.name)
    return result, moved


# tf-keras 2 opens a TensorFlow name scope per layer and refuses names that are not scope names
# ("'_0/' is not a valid root scope name"); Keras 3 takes them (bnkit's converter names a
# Sequential's child 0 "_0")
_SCOPE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")


def _tf_names(names: list[str]) -> dict[str, str]:
    """Each name, or where TensorFlow refuses it as a scope name, a valid one (``_0`` -> ``layer_0``),
    unique among ``names``."""
    taken = set(names)
    renamed = {}
    for name in names:
        if _SCOPE_NAME.fullmatch(name):
            renamed[name] = name
            continue
        base = re.sub(r"[^A-Za-z0-9_.>-]", "_", name)
        base = base if _SCOPE_NAME.fullmatch(base) else f"layer{'' if base.startswith('_') else '_'}{base}"
        new, count = base, 1
        while new in taken:
            count += 1
            new = f"{base}_{count}"
        taken.add(new)
        renamed[name] = new
    return renamed


def _operations(model) -> list:
    operations = getattr(model, "operations", None)
    return list(operations) if operations is not None else list(model.layers)


def _layer(entry: dict, operations: dict) -> Keras2Layer:
    from bnkit.keras import keras

    inner = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    name = entry.get("name", inner.get("name"))
    source = operations.get(name)
    class_name = entry["class_name"]
    kind = "layer" if source is None or isinstance(source, keras.layers.Layer) else "operation"
    layer = Keras2Layer(
        name=name,
        class_name=class_name,
        config=copy.deepcopy(inner),
        source=source,
        calls=[_call(node) for node in entry.get("inbound_nodes", [])],
        shown=f"{kind} {name!r} ({class_name})",
    )
    if isinstance(source, keras.Model):
        raise layer.refuse("a model inside the model; bnkit writes flat models to Keras 2 .h5 files")
    if kind == "layer" and source is not None:
        layer.weights = [
            (variable.name, np.asarray(keras.ops.convert_to_numpy(variable)))
            for variable in source.trainable_weights + source.non_trainable_weights
        ]
    return layer


def _call(node) -> Call:
    if not isinstance(node, dict) or "args" not in node:
        raise NotWritable(f"a call node that is not Keras 3's {{'args', 'kwargs'}}: {str(node)[:80]}")
    return Call(_tensors(node["args"]), _tensors(node.get("kwargs") or {}))


def _tensors(value):
    """``value`` with every serialized Keras tensor replaced by its :class:`Ref`."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            inner = value["config"]
            history = inner["keras_history"]
            shape = tuple(inner["shape"]) if inner.get("shape") is not None else None
            return Ref(history[0], history[1], history[2], shape, inner.get("dtype"))
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors(v) for v in value]
    return value


def flatten(value) -> list:
    """The leaves of nested lists, tuples and dicts' values, in order."""
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in flatten(v)]
    if isinstance(value, dict):
        return [item for v in value.values() for item in flatten(v)]
    return [value]


def _references(value) -> list[list]:
    """Keras 3's input/output layers (one reference, or a list of them) as Keras 2's list of references."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str):
        return [list(value)]
    return [list(v) for v in value]


def _nodes(layer: Keras2Layer) -> list:
    """Keras 2's ``inbound_nodes``: per call, ``[name, node, tensor, kwargs]`` for each input tensor."""
    nodes = []
    for call in layer.calls:
        kwargs = {}
        for key, value in call.kwargs.items():
            if value is None or isinstance(value, Ref):
                continue
            if key == "training" and isinstance(value, bool):
                kwargs[key] = value
                continue
            raise layer.refuse(f"called with {key}={value!r}, which bnkit does not write to a Keras 2 call")
        for arg in flatten(call.args):
            if not isinstance(arg, Ref):
                raise layer.refuse(f"called with the constant {arg!r}, which a Keras 2 call cannot hold")
        nodes.append([[r.name, r.node, r.tensor, dict(kwargs)] for r in call.refs()])
    return nodes


def _tf_keras_order(layers: dict[str, Keras2Layer], inputs: list, outputs: list) -> list[Keras2Layer]:
    """The layers in the order tf-keras 2's ``_map_graph_network`` gives ``model.layers``: by depth from
    the outputs, deepest first, ties in the order a depth-first walk from the outputs first meets them."""
    parents = {}
    for layer in layers.values():
        for index, call in enumerate(layer.calls):
            parents[(layer.name, index)] = [(r.name, r.node) for r in call.refs()]
    finished, in_progress, ordered, first_seen = set(), set(), [], {}
    for name, node, _ in outputs:  # tf-keras' _build_map, without recursion (deep networks)
        if (name, node) in finished:
            continue
        first_seen.setdefault(name, len(first_seen))
        in_progress.add((name, node))
        stack = [((name, node), iter(parents.get((name, node), ())))]
        while stack:
            key, pending = stack[-1]
            parent = next(pending, None)
            if parent is None:
                stack.pop()
                in_progress.discard(key)
                finished.add(key)
                ordered.append(key)
            elif parent not in finished:
                if parent in in_progress:
                    raise NotWritable(f"layer {parent[0]!r} is part of a cycle")
                first_seen.setdefault(parent[0], len(first_seen))
                in_progress.add(parent)
                stack.append((parent, iter(parents.get(parent, ()))))
    node_depth: dict = {}
    layer_depth: dict = {}
    for key in reversed(ordered):
        depth = max(node_depth.setdefault(key, 0), layer_depth.get(key[0], 0))
        layer_depth[key[0]] = node_depth[key] = depth
        for parent in parents.get(key, ()):
            node_depth[parent] = max(depth + 1, node_depth.get(parent, 0))
    for name, _, _ in inputs:  # inputs the outputs do not use
        if name not in layer_depth:
            layer_depth[name], first_seen[name] = 0, -1
    names = sorted(layer_depth, key=lambda n: (-layer_depth[n], first_seen[n]))
    return [layers[n] for n in names]


# ------------------------------------------------------------------------------------ every layer


def _translate(layer: Keras2Layer) -> None:
    from bnkit.keras import keras

    is_layer = layer.source is None or isinstance(layer.source, keras.layers.Layer)
    translator = (TRANSLATORS if is_layer else OPERATIONS).get(layer.class_name)
    if translator is None:
        raise layer.refuse(
            f"no Keras 2 translation of this {'layer' if is_layer else 'operation'} class; "
            "bnkit writes to .h5 the layers listed in docs/tensorflow.md"
        )
    if not is_layer and len(layer.calls) != 1:
        raise layer.refuse(f"an operation called {len(layer.calls)} times")
    translator(layer)
    if layer.class_name != "InputLayer":
        config = layer.config
        config["name"] = layer.name
        config.setdefault("trainable", True)
        config["dtype"] = keras2_dtype(layer, config.get("dtype"))
        for key, value in list(config.items()):
            if key.endswith(("_initializer", "_regularizer", "_constraint")) and value is not None:
                config[key] = _keras_object(layer, key, value)
            elif key in _KERAS3_ONLY:
                if value != _KERAS3_ONLY[key]:
                    raise layer.refuse(f"{key}={value!r}, a Keras 3 argument tf-keras 2 does not have")
                del config[key]
        if "activation" in config:
            config["activation"] = _activation(layer, config["activation"])


# Keras 3 arguments tf-keras 2 lacks -> the value that means what tf-keras 2 does
_KERAS3_ONLY = {"quantization_config": None, "lora_rank": None, "lora_alpha": None, "rms_scaling": False}

DTYPES = ("float16", "bfloat16", "float32", "float64")
_MIXED = ("mixed_float16", "mixed_bfloat16")


def keras2_dtype(layer: Keras2Layer, value):
    if value is None or value in DTYPES:
        return value
    if isinstance(value, dict) and value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
        name = (value.get("config") or {}).get("name")
        if name in DTYPES:
            return name
        if name in _MIXED:
            return {"class_name": "Policy", "config": {"name": name}}
    raise layer.refuse(f"the dtype policy {value!r}, which tf-keras 2 does not have")


# initializers, regularizers and constraints tf-keras 2 has, under the same names and arguments;
# Keras 3's extra arguments (at the value that means Keras 2's behaviour) are dropped
_KERAS2_OBJECTS = {
    "_initializer": {
        "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "VarianceScaling",
        "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "LecunNormal", "LecunUniform", "Orthogonal",
        "Identity",
    },
    "_regularizer": {"L1", "L2", "L1L2", "OrthogonalRegularizer"},
    "_constraint": {"MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "RadialConstraint"},
}  # fmt: skip
_KERAS3_OBJECT_ARGUMENTS = {"input_axes": None, "output_axes": None}


def _keras_object(layer: Keras2Layer, key: str, value):
    kind = next(k for k in _KERAS2_OBJECTS if key.endswith(k))
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or value.get("class_name") not in _KERAS2_OBJECTS[kind]:
        shown = value.get("class_name") if isinstance(value, dict) else value
        raise layer.refuse(f"{key} is {shown!r}, which tf-keras 2 does not have under that name")
    config = dict(value.get("config") or {})
    for argument, default in _KERAS3_OBJECT_ARGUMENTS.items():
        if argument in config:
            if config[argument] != default:
                raise layer.refuse(f"{key} has {argument}={config[argument]!r}, a Keras 3 argument")
            del config[argument]
    return {"class_name": value["class_name"], "config": config}


# Keras 3 activation names -> tf-keras 2's names for the same function (tf-keras 2.21 deserializes them)
_ACTIVATIONS = {
    name: name
    for name in (
        "linear", "relu", "relu6", "sigmoid", "tanh", "selu", "softsign", "softplus", "elu", "softmax",
        "exponential", "mish", "gelu", "log_softmax", "leaky_relu", "swish",
    )
} | {"silu": "swish"}  # fmt: skip
_ACTIVATION_REFUSALS = {
    "hard_sigmoid": "Keras 2's hard_sigmoid is another function (0.2·x + 0.5, clipped; Keras 3's is x/6 + 0.5)",
}


def _activation(layer: Keras2Layer, value):
    if isinstance(value, str) and value in _ACTIVATIONS:
        return _ACTIVATIONS[value]
    if isinstance(value, dict):  # a registered function (bnkit's gelu_tanh): named by its class name
        value = value.get("config", value.get("class_name"))
    why = _ACTIVATION_REFUSALS.get(value, "tf-keras 2 has no such activation") if isinstance(value, str) else ""
    raise layer.refuse(f"activation {value!r}: {why or 'not an activation tf-keras 2 has'}")
