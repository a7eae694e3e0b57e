"""What a Keras model's config makes Keras allocate before it reads a single weight: the variables.

Keras builds the model from its config, every layer's variables created with their initial values,
and only then reads the weights: a ``Dense(units=10**9)`` in a 5 KB config takes gigabytes (or
fails in the allocator) whatever the weights file holds. :func:`charge_variables` builds the model
once more inside ``keras.StatelessScope(initialize_variables=False)``, where a variable gets its
shape and dtype but no value, charges the variables' bytes to the budget, and drops that model.
Keras then builds the real one. The price is a second build of the model from its config (a
quarter to a third of the time of loading it).
"""

from __future__ import annotations

import copy
import math

from bnkit.formats.limits import TENSOR_OVERHEAD, Budget, format_bytes

__all__ = ["charge_variables"]


def charge_variables(config: dict, budget: Budget, *, legacy: bool) -> None:
    """Charge the variables the model of ``config`` declares (see the module doc).

    ``legacy``: an ``.h5`` model config (Keras 2 style), built as Keras' legacy loader builds it.
    Whatever the build raises goes to the caller: Keras' own build would raise it too.
    """
    import keras
    from keras.src.backend.common import global_state
    from keras.src.utils.dtype_utils import dtype_size

    config = copy.deepcopy(config)  # the builders change it in place
    # variables created without a value are also listed for a later initialize_all_variables():
    # this model's must not be initialised by whoever calls it next
    pending = list(global_state.get_global_attribute("uninitialized_variables", None) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = _build(config, legacy)
        variables = list({id(v): v for v in model.variables}.values())
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
    nbytes = sum(math.prod(v.shape) * dtype_size(v.dtype) // 8 for v in variables)
    budget.charge(
        nbytes + len(variables) * TENSOR_OVERHEAD,
        f"the model's {len(variables)} variables ({format_bytes(nbytes)}, as its config declares them)",
    )


def _build(config: dict, legacy: bool):
    from keras.src.saving import serialization_lib

    if legacy:
        from keras.src.legacy.saving import saving_options, saving_utils

        with saving_options.keras_option_scope(use_legacy_config=True), serialization_lib.SafeModeScope(True):
            return saving_utils.model_from_config(config)
    config["compile_config"] = None  # as keras.models.load_model(compile=False)
    with serialization_lib.ObjectSharingScope():
        return serialization_lib.deserialize_keras_object(config, safe_mode=True)
