"""Live tf-keras 2 models (``tf_keras.Model``, ``tf.keras`` with ``TF_USE_LEGACY_KERAS=1``) as Keras 3 models.

bnkit's API works on Keras 3 models; :func:`from_tf_keras` turns a functional or ``Sequential``
tf-keras model into the Keras 3 model that computes the same, as bnkit reads a Keras 2 ``.h5`` file:
the model's own config (``model.to_json()``, Keras 2's JSON) translated for Keras 3
(:mod:`bnkit.formats.keras2_config`: names with ``/``, ``TFOpLambda`` arithmetic, ``groups=1``,
``SyncBatchNormalization``...; what cannot be translated exactly is refused by layer), built by
Keras' legacy loader in safe mode, then every variable set from the tf-keras layer it comes from
(:func:`bnkit.formats.keras2_weights.set_weights`: the layers paired by their place in the config,
every variable once, shapes checked). No TensorFlow function of the model is run.

:func:`bnkit.frameworks.accepts_tf_keras` makes bnkit's functions take such models: ``summary``,
``lint``, ``compare``, ``convert.keras_to_torch`` and ``fold_bn`` work on the Keras 3 model (``fold_bn``
returns a Keras 3 model); ``recalibrate`` and ``freeze_bn``, which change their model in place, write
the result back into the tf-keras model (:func:`write_back`) and return it.
"""

from __future__ import annotations

import json

from bnkit.formats import ModelFileError
from bnkit.formats.keras2_archive import legacy_form
from bnkit.formats.keras2_config import Keras2ConfigError, translate
from bnkit.formats.keras2_weights import WeightsMismatch, layer_list, name_slots, set_weights, slots
from bnkit.text import one_line

__all__ = ["SOURCE", "TfKerasModelError", "from_tf_keras", "convert_tf_keras", "write_back"]

SOURCE = "tf-keras 2"  # what a summary says the Keras 3 model was read from (ModelSummary.source)


class TfKerasModelError(ValueError):
    """A tf-keras model bnkit cannot turn into Keras 3 exactly; the message names the model and the layer."""


def from_tf_keras(model):
    """The Keras 3 model (functional or Sequential, on bnkit's Keras backend) that computes what the
    tf-keras 2 ``model`` computes, with its weights, batch-norm statistics and ``trainable`` flags.

    ``model``: a built functional or ``Sequential`` ``tf_keras.Model``; a subclassed model (whose
    config does not rebuild it) or a layer Keras 3 cannot compute exactly is refused
    (:class:`TfKerasModelError`, naming the layer). Layers are named as Keras 3 accepts (``/`` becomes
    ``_``); ``model`` is not changed.
    """
    return convert_tf_keras(model)[0]


def convert_tf_keras(model):
    """:func:`from_tf_keras`'s model, and the ``(tf-keras layer, Keras 3 layer)`` pairs it set (:func:`write_back`)."""
    name = getattr(model, "name", None)
    label = f"tf-keras model {one_line(repr(name), 80)}"
    if not getattr(model, "built", False):
        raise TfKerasModelError(f"{label} is not built: call it on a batch, or give it an Input, first")
    if not getattr(model, "_is_graph_network", False) and type(model).__name__ != "Sequential":
        raise TfKerasModelError(
            f"{label} is a subclassed model ({type(model).__name__}): its config does not rebuild it; bnkit takes "
            "functional and Sequential tf-keras models"
        )
    try:
        config = json.loads(model.to_json())  # Keras 2's own JSON of the config (tuples, shapes, dtypes)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise TfKerasModelError(f"{label}: its config cannot be written ({type(e).__name__}: {one_line(e)})") from e
    found = slots(config, _names)
    tf_layers = {}
    _tf_layers(model, found, tf_layers)
    _mark_unfused(config, found, tf_layers)
    try:
        translated = translate(legacy_form(config))
        name_slots(found, translated)
        from bnkit.formats._keras_loading import build_keras2_model

        converted = build_keras2_model(label, translated)
        pairs = set_weights(converted, found, lambda slot, count: tf_layers[id(slot)].get_weights(), label)
    except Keras2ConfigError as e:
        raise TfKerasModelError(f"{label}: {e}") from e
    except (ModelFileError, WeightsMismatch) as e:
        raise TfKerasModelError(str(e)) from e
    converted._bnkit_source = SOURCE
    return converted, [(tf_layers[id(slot)], layer) for slot, layer in pairs]


def _names(layers: list, parent: str) -> list[str]:
    """Each layer's name in the tf-keras model (the key :func:`_tf_layers` finds it by)."""
    names = []
    for layer in layers:
        inner = layer.get("config") if isinstance(layer, dict) else None
        name = inner.get("name") if isinstance(inner, dict) else None
        names.append(name if isinstance(name, str) else layer.get("name", "") if isinstance(layer, dict) else "")
    return names


def _tf_layers(model, found, into: dict) -> None:
    for slot in found:
        if slot.class_name == "InputLayer":
            continue
        layer = model.get_layer(slot.key)
        into[id(slot)] = layer
        if slot.nested is not None:
            _tf_layers(layer, slot.nested, into)


def _mark_unfused(config: dict, found, tf_layers: dict) -> None:
    """``"fused": false`` in the config of every batch norm that tf-keras runs unfused on a 4-D or 5-D input
    with the channels first or last (built with ``fused=False``): tf-keras' config does not say so, and
    bnkit would read it as fused there (:mod:`bnkit.formats.keras2_fused`)."""
    layers = layer_list(config) or []
    for slot in found:
        layer = layers[slot.index] if slot.index < len(layers) else None
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            continue
        live = tf_layers.get(id(slot))
        if slot.class_name == "BatchNormalization" and getattr(live, "fused", None) is False:
            rank = getattr(getattr(live, "input_spec", None), "ndim", None)
            axis = getattr(live, "axis", None)
            axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
            if rank in (4, 5) and isinstance(axis, int) and axis % rank in (1, rank - 1):
                layer["config"]["fused"] = False
        if slot.nested is not None:
            _mark_unfused(layer, slot.nested, tf_layers)


def write_back(pairs, label: str) -> None:
    """Copy each Keras 3 layer's variables and ``trainable`` flag into its tf-keras layer (after a
    function that changed the Keras 3 model in place: recalibrated statistics, frozen batch norms).

    tf-keras holds ``trainable`` per layer, not per variable: a Keras 3 variable made non-trainable
    in a trainable layer (``freeze_bn(convention="torch", freeze_stats=False)``) has no tf-keras form
    and is refused before anything is written.
    """
    from keras import ops

    for _, layer in pairs:
        created_trainable = {id(v) for v in layer._trainable_variables}
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            if variable.trainable != (id(variable) in created_trainable and layer.trainable):
                raise TfKerasModelError(
                    f"{label}: layer {layer.name!r}: variable {variable.name!r} would be "
                    f"{'trainable' if variable.trainable else 'frozen'} while its layer is not: tf-keras holds "
                    "trainable per layer; use the Keras 3 model (bnkit.keras.from_tf_keras(model))"
                )
    for tf_layer, layer in pairs:
        values = [ops.convert_to_numpy(v) for v in layer._trainable_variables + layer._non_trainable_variables]
        if values:
            tf_layer.set_weights(values)
        if tf_layer.trainable != layer.trainable:
            tf_layer.trainable = layer.trainable
