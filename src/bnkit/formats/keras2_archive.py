"""``.keras`` archives written by tf-keras 2 (``tf.keras`` of TensorFlow 2.13 to 2.15, tf-keras 2.x).

They are zips like Keras 3's (``config.json``, ``metadata.json``, ``model.weights.h5``) but hold a
Keras 2 model: Keras 3 refuses their config (``Functional`` of ``tf_keras.src.engine.functional``,
and the layers Keras 2 has and Keras 3 has not), and their weights file is laid out by tf-keras'
classes. :mod:`bnkit.formats.keras_archive` checks the archive as data as for any ``.keras`` file;
what is different is here:

* which archive is one: ``metadata.json``'s ``keras_version`` starts with ``2.``;
* the config: written as Keras 2's serializer writes it in a ``.keras`` archive (``module``,
  ``registered_name`` and ``build_config`` beside each layer's ``class_name``), which
  :func:`legacy_form` turns into the ``model_config`` form of a Keras 2 ``.h5`` file (the
  registered name is the class name there: ``Custom>CustomScaleLayer``); then
  :func:`bnkit.formats.keras2_config.translate` makes it what Keras 3 reads, and Keras' legacy
  loader builds the model in safe mode, as for an ``.h5``;
* the weights: tf-keras stores a layer's variables under ``layers/<snake_case class name>/vars/<i>``
  (``_1``, ``_2``... for the second and third layer of a class in the same model; a nested model's
  layers under its own group), in its order of ``model.layers``; they are read as data with h5py,
  a layer at a time, and set by :func:`bnkit.formats.keras2_weights.set_weights` (every variable
  once, shapes checked). What tf-keras saved of the training state (``optimizer/``, ``metrics/``)
  is not read; any other value the model does not take is refused.
"""

from __future__ import annotations

import re

from bnkit.formats import ModelFileError
from bnkit.formats.keras2_config import Keras2ConfigError, translate
from bnkit.formats.keras2_weights import Slot, WeightsMismatch, name_slots, set_weights, slots
from bnkit.text import one_line

__all__ = ["is_keras2", "legacy_form", "prepare", "load"]

# what tf-keras saves beside the layers of a compiled model, which loading without compiling ignores
TRAINING_STATE = ("optimizer", "metrics")
_SERIALIZER_KEYS = ("module", "registered_name", "build_config", "compile_config")


def is_keras2(metadata) -> bool:
    """Whether ``metadata.json`` (parsed) says a Keras 2 (tf.keras, tf-keras) wrote the archive."""
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return isinstance(version, str) and version.startswith("2.")


def legacy_form(config):
    """A Keras 2 ``.keras`` model config in the form of a Keras 2 ``.h5`` ``model_config``: the model and
    its layers (nested models' too) without ``module``, ``registered_name`` and ``build_config``,
    named by their registered name; what is inside a layer's config (initializers, a wrapped layer,
    a dtype policy) is written the same way in both and kept."""
    if not isinstance(config, dict):
        return config
    out = {k: v for k, v in config.items() if k not in _SERIALIZER_KEYS}
    if isinstance(config.get("registered_name"), str):
        out["class_name"] = config["registered_name"]  # what Keras 2 registered the class as
    inner = out.get("config")
    if isinstance(inner, dict) and isinstance(inner.get("layers"), list):
        out["config"] = {**inner, "layers": [legacy_form(layer) for layer in inner["layers"]]}
    return out


def snake_case(name: str) -> str:
    """tf-keras' ``generic_utils.to_snake_case``: how its weights file names a layer's group."""
    intermediate = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    insecure = re.sub("([a-z])([A-Z])", r"\1_\2", intermediate).lower()
    return insecure if not insecure.startswith("_") else "private" + insecure


def _groups(layers: list, parent: str) -> list[str]:
    """The weights file's group of each of a model's ``layers`` (tf-keras' ``_save_container_state``)."""
    used: dict[str, int] = {}
    groups = []
    for layer in layers:
        class_name = layer.get("class_name") if isinstance(layer, dict) else None
        name = snake_case(class_name) if isinstance(class_name, str) and class_name else "?"
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        groups.append(f"{parent}/layers/{name}" if parent else f"layers/{name}")
    return groups


def prepare(config: dict, shown: str) -> tuple[dict, list[Slot]]:
    """The archive's ``config.json`` (parsed) as Keras 3 builds it, and where each layer's weights are."""
    found = slots(config, _groups)
    try:
        translated = translate(legacy_form(config))
    except Keras2ConfigError as e:
        raise ModelFileError(f"{shown}: {e}") from e
    name_slots(found, translated)
    return translated, found


def load(shown: str, config: dict, found: list[Slot], weights):
    """The Keras 3 model of ``config`` (from :func:`prepare`), its variables set from ``weights``
    (the archive's ``model.weights.h5``, open with h5py, checked and charged)."""
    import h5py

    from bnkit.formats._keras_loading import build_keras2_model

    model = build_keras2_model(shown, config)
    used: set[str] = set()

    def values(slot: Slot, count: int):
        group = weights.get(f"{slot.key}/vars")
        if group is None:
            return []
        if not isinstance(group, h5py.Group) or set(group) - {str(i) for i in range(len(group))}:
            raise WeightsMismatch(f"{shown}: {slot.key}/vars is not a list of numbered values")
        found_values = [group[str(i)] for i in range(len(group))]
        if any(not isinstance(v, h5py.Dataset) for v in found_values):
            raise WeightsMismatch(f"{shown}: {slot.key}/vars holds a group, not values")
        used.update(v.name for v in found_values)
        return found_values

    try:
        set_weights(model, found, values, shown)
    except WeightsMismatch as e:
        raise ModelFileError(str(e)) from e
    unused = []
    weights.visititems(
        lambda name, obj: unused.append(name)
        if isinstance(obj, h5py.Dataset) and "/" + name not in used and name.split("/")[0] not in TRAINING_STATE
        else None
    )
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise ModelFileError(
            f"{shown}: the weights hold {one_line(repr(unused[0]), 120)}{more}, which no layer of the config "
            "takes: the weights and the config do not belong together"
        )
    return model
