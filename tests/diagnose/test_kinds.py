"""The tables of layer kinds (bnkit.diagnose.kinds) match the installed frameworks."""

from __future__ import annotations

import keras as keras_package

from bnkit.diagnose.kinds import KERAS_LAYERS, KERAS_RANDOM_LAYERS, KINDS, TORCH_FUNCTIONS, TORCH_MODULES, kind_of
from bnkit.diagnose.trace_torch import _resolve, _tables


def _keras_class_names() -> set[str]:
    import inspect

    names: set[str] = set()
    for obj in vars(keras_package.layers).values():
        if inspect.isclass(obj):
            names.update(c.__name__ for c in obj.__mro__)
    return names


def test_every_row_names_a_known_kind():
    used = {k for _, k in TORCH_MODULES} | {k for _, k, _ in TORCH_FUNCTIONS} | {k for _, k in KERAS_LAYERS}
    assert used <= set(KINDS)
    assert kind_of("no-such-kind").name == "no-such-kind"  # a new kind works with the defaults


def test_torch_rows_resolve_in_this_torch():
    missing = []
    for path, _ in TORCH_MODULES:
        try:
            _resolve(path)
        except (AttributeError, ImportError):
            missing.append(path)
    for path, _, _ in TORCH_FUNCTIONS:
        try:
            _resolve(path)
        except (AttributeError, ImportError, RuntimeError):
            missing.append(path)
    assert missing == []
    modules, functions = _tables()
    assert len(modules) == len(TORCH_MODULES)
    assert len(functions) >= len(TORCH_FUNCTIONS) - 5  # a few names are aliases of one function


def test_keras_rows_name_classes_of_this_keras():
    names = _keras_class_names()
    missing = [name for name, _ in KERAS_LAYERS if name not in names]
    missing += [name for name in KERAS_RANDOM_LAYERS if name not in names]
    assert missing == []
