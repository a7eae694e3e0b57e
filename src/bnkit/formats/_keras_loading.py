"""Loading a Keras model (``.keras``, ``.h5``, a tf-keras 2 SavedModel's config) with Keras itself, in safe mode,
once its reader has checked it."""

from __future__ import annotations

import re
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats.keras_variables import register_bnkit_keras_layers
from bnkit.text import has_control_characters, one_line, printable

__all__ = ["build_keras2_model", "keras_cause", "load_legacy_h5", "load_with_keras"]


def load_with_keras(path: Path, config: dict):
    """``keras.models.load_model(path)`` in safe mode, once its reader has checked the file and charged
    what Keras takes; ``config`` is the file's model config as the reader parsed it (bounded): the
    synchronised batch norms are rerouted from it, not from a second read."""
    from bnkit.keras import keras
    from bnkit.keras.saved import routed_to_bnkit

    register_bnkit_keras_layers()
    try:
        # a BatchNormalization with synchronized=True, which Keras refuses off TensorFlow, loads as bnkit's
        with routed_to_bnkit(path, config) as routed:
            model = keras.models.load_model(routed, safe_mode=True, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelFileError(f"{path}: not a readable Keras model ({keras_cause(e)})") from e
    _check_names(model, path)
    return model


def build_keras2_model(path: Path, config: dict, *, keras2: bool = True):
    """A Keras 3 model built from ``config``, a Keras 2 model config as its reader parsed, checked and
    translated it (:mod:`bnkit.formats.keras2_config`), as Keras' legacy loader builds one (safe mode,
    the legacy config scope), the batch norms tf-keras 2 runs fused made bnkit's in the convention that
    trains as they do (:mod:`bnkit.formats.keras2_fused`); its weights are the initial ones. Shared by
    the Keras 2 readers (``.h5``, tf-keras ``.keras``, SavedModel, live tf-keras models), which then set
    the weights each from its own source. ``keras2=False``: a legacy ``.h5`` that Keras 3 wrote (its
    batch norms are Keras 3's, never fused)."""
    from bnkit.keras import keras  # noqa: F401 - the backend bnkit chooses, before Keras' modules

    # isort: split
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    from bnkit.formats.keras2_config import keras2_custom_objects
    from bnkit.formats.keras2_fused import adopt_fused
    from bnkit.keras.saved import reroute_synchronized

    register_bnkit_keras_layers()
    reroute_synchronized(config, legacy=True)  # synchronized=True loads as bnkit's layer off TensorFlow
    try:
        with saving_options.keras_option_scope(use_legacy_config=True), serialization_lib.SafeModeScope(True):
            model = saving_utils.model_from_config(config, custom_objects=keras2_custom_objects())
    except Exception as e:  # Keras raises many types for a bad config
        raise ModelFileError(f"{path}: not a readable Keras model ({keras_cause(e)})") from e
    _check_names(model, path)
    if keras2:
        adopt_fused(model)  # the batch norms tf-keras 2 runs fused train as it trains them
    return model


def load_legacy_h5(path: Path, config: dict, h5file):
    """A legacy ``.h5`` model: built from ``config`` (:func:`build_keras2_model`; Keras 3's own ``.h5``,
    ``keras_version`` 3 or later, as Keras 3's), the weights read from the open ``h5file`` by layer order,
    as Keras reads them."""
    from keras.src.legacy.saving import legacy_h5_format

    from bnkit.formats.keras2_fused import written_by_keras2

    model = build_keras2_model(path, config, keras2=written_by_keras2(h5file.attrs.get("keras_version")))
    try:
        legacy_h5_format.load_weights_from_hdf5_group(h5file["model_weights"], model)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelFileError(f"{path}: not a readable Keras model ({keras_cause(e)})") from e
    return model


_DESERIALIZING = re.compile(
    r"(?:Error when deserializing class '(?P<cls>[^']+)'|(?P<qual><class '[^']+'>) could not be deserialized"
    r" properly).*?config=(?P<config>.*)Exception encountered: (?P<cause>.*)",
    re.S,
)


def keras_cause(error: Exception, limit: int = 300) -> str:
    """Keras' error in one line, its cause first: Keras puts the whole layer config before the cause
    ("Error when deserializing class 'X' using config={...}. Exception encountered: ..."), which a
    one-line message would cut inside the config. Then: "layer 'name' (X): the cause"."""
    text = str(error)
    match = _DESERIALIZING.search(text)
    if match is None:
        return f"{type(error).__name__}: {one_line(text, limit)}"
    cls = match["cls"] or match["qual"].split("'")[1].rsplit(".", 1)[-1]
    name = re.search(r"""['"]name['"]: ['"]([^'"]*)['"]""", match["config"])
    layer = f"layer {name[1]!r} ({cls})" if name else f"a {cls} layer"
    return f"{type(error).__name__}: {layer}: {one_line(match['cause'], limit)}"


def _check_names(model, path: Path) -> None:
    """Refuse a layer name with control characters: tables and messages would print it (rich passes ESC on)."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if has_control_characters(layer.name):
            raise ModelFileError(
                f"{printable(str(path))}: the {type(layer).__name__} layer named {one_line(repr(layer.name), 120)} "
                "has control characters in its name (terminal escape sequences?); refused"
            )
