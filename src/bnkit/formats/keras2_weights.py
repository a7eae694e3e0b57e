"""Setting a Keras 3 model's variables from a Keras 2 (tf-keras) model's weights, layer by layer.

A Keras 2 model config (a tf-keras ``.keras`` archive's ``config.json``, a live ``tf_keras`` model's
``to_json()``) is translated for Keras 3 (:mod:`bnkit.formats.keras2_config`) and built by Keras;
the weights are then set here as data. Each layer of the config is a :class:`Slot`: where its
values are in the source (a group of the archive's weights file, a live layer's name) and, once
translated, the name of the Keras 3 layer they go to (translation renames layers, ``/`` becomes
``_``, and changes classes, but keeps the layers' order, which pairs the two).

A layer's values are taken in the order tf-keras saves them (the variables it created as
trainable, then the others: ``Layer.save_own_variables``), which is the order in which Keras 3
creates the same layer's variables. :func:`set_weights` checks that every value has the shape of
its variable, that no variable is set twice and that every variable of the model is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bnkit.text import one_line

__all__ = ["Slot", "WeightsMismatch", "slots", "name_slots", "set_weights", "is_nested_model", "layer_list"]

_MODELS = ("Functional", "Sequential", "Model")


class WeightsMismatch(ValueError):
    """Weights that do not fit the model built from the config; the message names the layer."""


@dataclass
class Slot:
    """One layer of a Keras 2 config: ``key`` finds its values in the source, ``name`` is the Keras 3
    layer's name (after translation), ``nested`` the slots of a nested model's layers."""

    key: str
    class_name: str
    name: str | None = None
    nested: list[Slot] | None = None
    index: int = field(default=0, repr=False)


def is_nested_model(layer) -> bool:
    return isinstance(layer, dict) and layer.get("class_name") in _MODELS and layer_list(layer) is not None


def layer_list(model) -> list | None:
    """The ``layers`` list of a model config (``{"class_name": ..., "config": {"layers": [...]}}``), or None."""
    inner = model.get("config") if isinstance(model, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    return layers if isinstance(layers, list) else None


def slots(model_config: dict, keys: Callable[[list, str], list[str]], parent: str = "") -> list[Slot]:
    """A slot for each layer of ``model_config`` (the untranslated Keras 2 config), nested models'
    layers included; ``keys(layers, parent)`` says where the values of each of a model's ``layers``
    are in the source (``parent``: the key of the model, "" at the top)."""
    layers = layer_list(model_config) or []
    found = []
    for index, (layer, key) in enumerate(zip(layers, keys(layers, parent), strict=True)):
        class_name = layer.get("class_name") if isinstance(layer, dict) else None
        slot = Slot(key, class_name if isinstance(class_name, str) else "", index=index)
        found.append(slot)
        if is_nested_model(layer):
            slot.nested = slots(layer, keys, key)
    return found


def name_slots(found: list[Slot], translated: dict) -> None:
    """Give each slot the name its layer has in ``translated`` (the same config, translated)."""
    layers = layer_list(translated) or []
    for slot in found:
        layer = layers[slot.index] if slot.index < len(layers) else None
        if isinstance(layer, dict):
            inner = layer.get("config") if isinstance(layer.get("config"), dict) else {}
            slot.name = inner.get("name", layer.get("name"))
            if slot.nested is not None:
                name_slots(slot.nested, layer)


def set_weights(model, found: list[Slot], values: Callable[[Slot, int], Sequence], shown: str) -> list[tuple]:
    """Set every variable of the Keras 3 ``model`` from ``values(slot, count)``: the values of the
    slot's layer, in tf-keras' order (``count``: how many its Keras 3 layer has; arrays or h5py
    datasets, read one at a time). Returns the ``(slot, Keras 3 layer)`` pairs of the leaf layers.
    Raises :class:`WeightsMismatch` naming ``shown`` and the layer."""
    import numpy as np

    done: dict[int, str] = {}  # id(variable) -> the layer that set it
    pairs = _pairs(model, found, shown)
    for slot, layer in pairs:
        variables = list(layer._trainable_variables) + list(layer._non_trainable_variables)
        got = values(slot, len(variables))
        what = f"{shown}: layer {layer.name!r} ({type(layer).__name__})"
        if len(got) != len(variables):
            raise WeightsMismatch(
                f"{what}: has {len(variables)} variable(s), the weights hold {len(got)} value(s) for it ({slot.key})"
            )
        for variable, value in zip(variables, got, strict=True):
            if tuple(value.shape) != tuple(variable.shape):
                raise WeightsMismatch(
                    f"{what}: variable {variable.name!r} has shape {tuple(variable.shape)}, its value in the "
                    f"weights {tuple(value.shape)} ({slot.key})"
                )
            if id(variable) in done:
                raise WeightsMismatch(f"{what}: variable {variable.name!r} is set twice (also by {done[id(variable)]})")
            array = value if isinstance(value, np.ndarray) else np.asarray(value[()])  # an h5py dataset: read here
            if array.dtype.kind not in "fiub":
                raise WeightsMismatch(f"{what}: the value of {variable.name!r} is {array.dtype}, not numbers")
            variable.assign(array)
            done[id(variable)] = repr(layer.name)
    missing = [v for v in model.weights if id(v) not in done]
    if missing:
        names = ", ".join(repr(v.path) for v in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsMismatch(
            f"{shown}: the weights hold no value for the variable(s) {names}{more} (bnkit sets the variables of "
            "the model's layers and nested models, not those of a layer inside a layer: TimeDistributed, "
            "Bidirectional)"
        )
    return pairs


def _pairs(model, found: list[Slot], shown: str) -> list[tuple]:
    """``(slot, Keras 3 layer)`` for each leaf layer of ``found`` (input layers hold no weights)."""
    pairs = []
    for slot in found:
        if slot.class_name == "InputLayer":
            continue
        try:
            layer = model.get_layer(slot.name)
        except ValueError as e:  # Keras: no such layer (a config whose layers do not pair)
            raise WeightsMismatch(f"{shown}: the model has no layer {one_line(repr(slot.name), 120)}") from e
        if slot.nested is not None:
            pairs.extend(_pairs(layer, slot.nested, shown))
        else:
            pairs.append((slot, layer))
    return pairs
