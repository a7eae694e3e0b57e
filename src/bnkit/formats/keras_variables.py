"""What a Keras model's config makes Keras allocate before it reads a single weight: the variables.

Keras builds the model from its config, every layer's variables created with their initial values,
and only then reads the weights: a ``Dense(units=10**9)`` in a 5 KB config takes gigabytes (or
fails in the allocator) whatever the weights file holds. :func:`charge_variables` builds the model
once more inside ``keras.StatelessScope(initialize_variables=False)``, where a variable gets its
shape and dtype but no value, charges the variables' bytes to the budget, and drops that model.
Keras then builds the real one. The price is a second build of the model from its config (a
quarter to a third of the time of loading it).

The variables also bound the weights: a file Keras loads holds a value of the same shape for each
of them, so :func:`check_weights_cover` refuses a config that declares far more than the weights
file holds (within the budget, Keras would still allocate them all before the first mismatch),
and :func:`bnkit.formats.h5_checks.check_h5` a dataset that declares more than all the variables.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math

from bnkit.formats import ModelFileError
from bnkit.formats.limits import TENSOR_OVERHEAD, Budget, LimitExceeded, format_bytes

__all__ = ["charge_variables", "check_weights_cover", "register_bnkit_keras_layers"]

UNSAVED_SLACK = 2**20  # variables Keras creates but does not save (a random seed's state: 16 bytes)


def charge_variables(config: dict, budget: Budget, shown: str, *, legacy: bool) -> int:
    """Charge the variables the model of ``config`` declares (see the module doc); return their bytes.

    ``legacy``: an ``.h5`` model config (Keras 2 style), built as Keras' legacy loader builds it.
    A build that fails is a :class:`ModelFileError` naming ``shown`` (Keras' own would fail too).
    """
    from bnkit.keras import keras  # the backend bnkit chooses, before anything of Keras is imported

    # isort: split
    from keras.src.backend.common import global_state
    from keras.src.utils.dtype_utils import dtype_size

    from bnkit.formats._keras_loading import keras_cause
    from bnkit.keras.saved import reroute_synchronized

    config = copy.deepcopy(config)  # the builders change it in place
    reroute_synchronized(config, legacy=legacy)  # as bnkit loads it (bnkit.keras.saved)
    register_bnkit_keras_layers()
    # variables created without a value are also listed for a later initialize_all_variables():
    # this model's must not be initialised by whoever calls it next
    pending = list(global_state.get_global_attribute("uninitialized_variables", None) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = _build(config, legacy)
        variables = list({id(v): v for v in model.variables}.values())
    except LimitExceeded:
        raise
    except Exception as e:  # Keras raises many types for a bad config
        raise ModelFileError(f"{shown}: not a readable Keras model ({keras_cause(e)})") from e
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
    nbytes = sum(math.prod(v.shape) * dtype_size(v.dtype) // 8 for v in variables)
    budget.charge(
        nbytes + len(variables) * TENSOR_OVERHEAD,
        f"the model's {len(variables)} variables ({format_bytes(nbytes)}, as its config declares them)",
    )
    return nbytes


def check_weights_cover(variables: int, weights: int, shown: str) -> None:
    """Refuse a config that declares far more variables than the weights file holds values for.

    Keras would allocate them all, then fail on the first weight whose shape does not match; a
    file Keras loads holds a value for every variable (at least half as wide: float16 values of
    float32 variables), but a random seed's state.
    """
    if variables > 2 * weights + UNSAVED_SLACK:
        raise ModelFileError(
            f"{shown}: the config declares {format_bytes(variables)} of variables, the weights hold "
            f"{format_bytes(weights)}: they do not belong together (refused before Keras allocates them)"
        )


def _build(config: dict, legacy: bool):
    from keras.src.saving import serialization_lib

    if legacy:
        from keras.src.legacy.saving import saving_options, saving_utils

        with saving_options.keras_option_scope(use_legacy_config=True), serialization_lib.SafeModeScope(True):
            from bnkit.formats.keras2_config import keras2_custom_objects

            return saving_utils.model_from_config(config, custom_objects=keras2_custom_objects())
    config["compile_config"] = None  # as keras.models.load_model(compile=False)
    with serialization_lib.ObjectSharingScope():
        return serialization_lib.deserialize_keras_object(config, safe_mode=True)


def register_bnkit_keras_layers() -> None:
    """Import bnkit's Keras layers so that files that use them deserialize."""
    for name in ("bnkit.keras.batchnorm", "bnkit.lifecycle.keras_layers", "bnkit.convert.keras_layers"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
