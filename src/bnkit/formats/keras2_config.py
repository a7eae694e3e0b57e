"""Keras 2 model configs (``.h5`` files of tf.keras / tf-keras 2.x), translated into what Keras 3 reads.

Keras 3's legacy loader reads most of a Keras 2 ``model_config``; what it cannot read, bnkit rewrites
in the parsed config before Keras builds the model, with one small translator per layer class
(:data:`TRANSLATORS`), and refuses by layer name what it cannot translate exactly. The weights are
then read as Keras 2 wrote them (by layer order, so renaming a layer changes nothing there).

* ``groups`` of ``DepthwiseConv2D`` / ``SeparableConv2D`` (and 1-D): Keras 2 writes ``groups=1``,
  an argument Keras 3's classes do not have; dropped where it is 1, refused otherwise.
* Layer names holding ``/`` (DenseNet's ``conv1/conv``, MobileNetV3's ``Conv/BatchNorm``): Keras 3
  refuses them; ``/`` becomes ``_`` (made unique), in the layer and every reference to it.
* ``BatchNormalization(virtual_batch_size=N)`` (ghost batch norm): refused by name, it is not
  approximated; ``virtual_batch_size=None`` is dropped.
* ``BatchNormalization``'s ``fused``: dropped; where it is ``false`` the layer becomes bnkit's in the Keras
  convention (Keras' own computation). One that tf-keras 2 runs fused (``fused`` None or True, a 4-D or
  5-D input, ...) updates its moving variance with the unbiased batch variance: it is made bnkit's
  ``BatchNormalization`` in the ``"tf_keras_fused"`` convention once the model is built
  (:mod:`bnkit.formats.keras2_fused`).
* ``LeakyReLU``'s ``alpha``: ``negative_slope``, the same slope under Keras 3's name.
* ``SyncBatchNormalization`` (``tf.keras.layers.experimental``): ``BatchNormalization`` with
  ``synchronized=True`` (bnkit's layer off TensorFlow, :mod:`bnkit.keras.saved`).
* ``LayerScale`` (ConvNeXt) and ``Custom>CustomScaleLayer`` (InceptionResNetV2): Keras 3's own
  classes of ``keras.applications``, which compute the same.
* ``TFOpLambda`` (a TensorFlow function recorded in a functional model, ``x + 3.0``, ``a + b``):
  ``add`` / ``subtract`` / ``multiply`` with a number become a ``Rescaling`` (``x·1 + c`` and
  ``x·c + 0``, exact), with another tensor ``Add`` / ``Subtract`` / ``Multiply``; any other
  function is refused by name.
* A single input or output listed as a list of one (``[["input_1", 0, 0]]``): the reference itself,
  as Keras 3 writes it.
* A mixed-precision ``Policy`` (``{"class_name": "Policy", "config": {"name": "mixed_float16"}}``):
  its name, which Keras 3 reads as the same policy.
* Tuples Keras 2 wrote as ``{"class_name": "__tuple__", ...}``, decoded as Keras' JSON decoder does.
"""

from __future__ import annotations

from collections.abc import Callable

from bnkit.formats.keras2_fused import unfused

__all__ = ["Keras2ConfigError", "TRANSLATORS", "keras2_custom_objects", "translate"]


class Keras2ConfigError(ValueError):
    """A Keras 2 layer that bnkit cannot translate exactly: the message names the layer."""


TRANSLATORS: dict[str, Callable[[dict], None]] = {}  # class name -> translator (the layer, in place)


def translates(*class_names: str):
    def register(function):
        for name in class_names:
            TRANSLATORS[name] = function
        return function

    return register


def keras2_custom_objects() -> dict:
    """Keras 3's classes for the Keras 2 class names they take the place of (unregistered in Keras 3)."""
    from keras.src.applications.convnext import LayerScale
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    return {"LayerScale": LayerScale, "Custom>CustomScaleLayer": CustomScaleLayer}


def translate(config):
    """``config`` (a parsed ``model_config``), translated in place for Keras 3; returns it."""
    config = _decode_tuples(config)
    _translate_model(config)
    return config


def _shown(layer: dict) -> str:
    inner = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    return f"layer {inner.get('name', layer.get('name'))!r} ({layer.get('class_name')})"


# ------------------------------------------------------------------------------- models and names


def _translate_model(model) -> None:
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        return
    layers = model["config"].get("layers")
    if not isinstance(layers, list):
        return
    _rename_slashes(model["config"], layers)
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        _dtype_policy(layer)
        translator = TRANSLATORS.get(layer.get("class_name"))
        if translator is not None:
            translator(layer)
        _translate_model(layer)  # a nested Functional or Sequential
    _skip_first_nodes(model["config"], layers)
    for key in ("input_layers", "output_layers"):
        # Keras 2 lists a single input or output ([["input_1", 0, 0]]); Keras 3 writes the reference
        # itself, and a model built from a list of one warns on every call with a tensor
        value = model["config"].get(key)
        if isinstance(value, list) and len(value) == 1 and _is_reference(value[0]):
            model["config"][key] = value[0]


def _dtype_policy(layer: dict) -> None:
    """Mixed precision: Keras 2 writes ``"dtype": {"class_name": "Policy", "config": {"name": "mixed_float16"}}``,
    which Keras 3's legacy loader fails on; it takes the policy's name, the same policy."""
    inner = layer.get("config")
    dtype = inner.get("dtype") if isinstance(inner, dict) else None
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy" and isinstance(dtype.get("config"), dict):
        name = dtype["config"].get("name")
        if isinstance(name, str):
            inner["dtype"] = name


def _skip_first_nodes(model_config: dict, layers: list) -> None:
    """A Keras 2 nested model built on inputs of its own (a ``Functional``, or a ``Sequential`` built on
    an ``InputLayer``: ConvNeXt's stem) has a first node of its own, so the model that calls it refers
    to its node 1 (tf-keras' ``_should_skip_first_node``); Keras 3's has none: node 0."""
    nested = {_layer_name(layer) for layer in layers if isinstance(layer, dict) and _has_own_first_node(layer)}
    if not nested:
        return

    def shift(name, node):
        return name, node - 1 if name in nested and node > 0 else node

    for layer in layers:
        if isinstance(layer, dict) and "inbound_nodes" in layer:
            layer["inbound_nodes"] = _map_references(layer["inbound_nodes"], shift)
    if "output_layers" in model_config:
        model_config["output_layers"] = _map_references(model_config["output_layers"], shift)


def _has_own_first_node(layer: dict) -> bool:
    inner = layer.get("config")
    if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list) or not inner["layers"]:
        return False
    if layer.get("class_name") in ("Functional", "Model"):
        return True
    first = inner["layers"][0]
    return (
        layer.get("class_name") == "Sequential" and isinstance(first, dict) and first.get("class_name") == "InputLayer"
    )


def _rename_slashes(model_config: dict, layers: list) -> None:
    """Names with ``/`` get ``_``, unique among the model's layers, here and in every reference."""
    names = {_layer_name(layer) for layer in layers if isinstance(layer, dict)}
    renamed: dict[str, str] = {}
    for name in sorted(n for n in names if isinstance(n, str) and "/" in n):
        new = base = name.replace("/", "_")
        count = 1
        while new in names:
            count += 1
            new = f"{base}_{count}"
        names.add(new)
        renamed[name] = new
    if not renamed:
        return

    def rename(name, node):
        return renamed.get(name, name), node

    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("name") in renamed:
            layer["name"] = renamed[layer["name"]]
        inner = layer.get("config")
        if isinstance(inner, dict) and inner.get("name") in renamed:
            inner["name"] = renamed[inner["name"]]
        if "inbound_nodes" in layer:
            layer["inbound_nodes"] = _map_references(layer["inbound_nodes"], rename)
    for key in ("input_layers", "output_layers"):
        if key in model_config:
            model_config[key] = _map_references(model_config[key], rename)


def _layer_name(layer: dict):
    inner = layer.get("config")
    return layer.get("name", inner.get("name") if isinstance(inner, dict) else None)


def _is_reference(value) -> bool:
    """``[layer_name, node_index, tensor_index, ...]``, as Keras 2 refers to a layer's output."""
    return (
        isinstance(value, list)
        and len(value) >= 3
        and isinstance(value[0], str)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value[1:3])
    )


def _map_references(value, change):
    """``value`` with every layer reference in it (kwargs' included) replaced by ``change(name, node)``'s
    ``(name, node)``."""
    if _is_reference(value):
        name, node = change(value[0], value[1])
        return [name, node, *(_map_references(v, change) for v in value[2:])]
    if isinstance(value, list):
        return [_map_references(v, change) for v in value]
    if isinstance(value, dict):
        return {k: _map_references(v, change) for k, v in value.items()}
    return value


def _decode_tuples(value):
    if isinstance(value, dict):
        if value.get("class_name") == "__tuple__" and isinstance(value.get("items"), list):
            return tuple(_decode_tuples(v) for v in value["items"])
        if value.get("class_name") == "__ellipsis__":
            return Ellipsis
        return {k: _decode_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_tuples(v) for v in value]
    return value


# ---------------------------------------------------------------------------------- translators


@translates("DepthwiseConv2D", "SeparableConv2D", "DepthwiseConv1D", "SeparableConv1D")
def _groups(layer: dict) -> None:
    inner = layer["config"]
    if "groups" not in inner:
        return
    if inner["groups"] != 1:
        raise Keras2ConfigError(f"{_shown(layer)}: groups={inner['groups']!r}, an argument Keras 3's class lacks")
    del inner["groups"]
    if layer["class_name"].startswith("Separable"):
        # Keras 2's separable convolutions inherit these from Conv and never use them (their kernels
        # are depthwise_* and pointwise_*); Keras 3's do not take them
        for key in ("kernel_initializer", "kernel_regularizer", "kernel_constraint"):
            inner.pop(key, None)


@translates("BatchNormalization")
def _batch_norm(layer: dict) -> None:
    inner = layer["config"]
    if inner.get("virtual_batch_size") is not None:
        raise Keras2ConfigError(
            f"{_shown(layer)}: virtual_batch_size={inner['virtual_batch_size']!r} (ghost batch norm), which "
            "Keras 3 and bnkit do not have; refused rather than read as a plain batch norm"
        )
    inner.pop("virtual_batch_size", None)
    # fused: the same inference, but not the same moving variance in training (bnkit.formats.keras2_fused)
    unfused(layer)


@translates("SyncBatchNormalization")
def _sync_batch_norm(layer: dict) -> None:
    layer["class_name"] = "BatchNormalization"
    layer["config"].pop("fused", None)  # never fused
    _batch_norm(layer)
    layer["config"]["synchronized"] = True


@translates("LeakyReLU")
def _leaky_relu(layer: dict) -> None:
    """Keras 2's ``alpha`` is Keras 3's ``negative_slope`` (Keras 3 takes ``alpha`` with a deprecation warning)."""
    inner = layer["config"]
    if "alpha" in inner:
        inner["negative_slope"] = inner.pop("alpha")


_TF_FUNCTIONS = {
    "__operators__.add": "add",
    "math.add": "add",
    "math.subtract": "subtract",
    "math.multiply": "multiply",
}
_MERGE_LAYERS = {"add": "Add", "subtract": "Subtract", "multiply": "Multiply"}


@translates("TFOpLambda")
def _tf_op_lambda(layer: dict) -> None:
    inner = layer["config"]
    function = inner.get("function")
    what = f"{_shown(layer)}, the TensorFlow function tf.{function}"
    operation = _TF_FUNCTIONS.get(function)
    if operation is None:
        raise Keras2ConfigError(
            f"{what}: recorded by tf.keras; bnkit translates only {', '.join(sorted(_TF_FUNCTIONS))} "
            "of a tensor and a number or another tensor"
        )
    nodes = layer.get("inbound_nodes")
    if not isinstance(nodes, list) or len(nodes) != 1:
        calls = len(nodes) if isinstance(nodes, list) else "an unknown number of"
        raise Keras2ConfigError(f"{what}: called {calls} times")
    node = nodes[0]
    if _is_reference(node):  # one positional tensor, the rest in its keyword arguments
        first, kwargs = node[:3], node[3] if len(node) > 3 else {}
    elif isinstance(node, list) and len(node) == 1 and _is_reference(node[0]):
        first, kwargs = node[0][:3], node[0][3] if len(node[0]) > 3 else {}
    else:
        raise Keras2ConfigError(f"{what}: its call is not one tensor and a keyword argument y")
    if not isinstance(kwargs, dict) or set(kwargs) - {"y", "name"} or kwargs.get("name") is not None:
        arguments = sorted(kwargs) if isinstance(kwargs, dict) else kwargs
        raise Keras2ConfigError(f"{what}: called with arguments {arguments!r}")
    other = kwargs.get("y")
    common = {"name": inner.get("name"), "trainable": inner.get("trainable", True), "dtype": inner.get("dtype")}
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        scale, offset = {"add": (1.0, other), "subtract": (1.0, -other), "multiply": (other, 0.0)}[operation]
        layer["class_name"] = "Rescaling"
        layer["config"] = {**common, "scale": float(scale), "offset": float(offset)}
        layer["inbound_nodes"] = [[[*first, {}]]]
    elif _is_reference(other):
        layer["class_name"] = _MERGE_LAYERS[operation]
        layer["config"] = common
        layer["inbound_nodes"] = [[[*first, {}], [*other[:3], {}]]]
    else:
        raise Keras2ConfigError(f"{what}: y is {type(other).__name__}, not a number or a tensor")
