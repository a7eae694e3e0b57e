"""The tables of layer kinds (bnkit.diagnose.kinds) match the installed frameworks."""

from __future__ import annotations

import keras as keras_package

from bnkit.diagnose.kinds import (
    KERAS_LAYERS,
    KERAS_RANDOM_CUSTOM_LAYERS,
    KERAS_RANDOM_LAYERS,
    KINDS,
    TORCH_FUNCTIONS,
    TORCH_MODULES,
    kind_of,
)
from bnkit.diagnose.trace_torch import _FOREIGN, _resolve, _tables


def _keras_class_names() -> set[str]:
    """Class names of Keras layers, of the operations of a functional model (``x * y``), of
    keras.applications' own layers (ConvNeXt's LayerScale, StochasticDepth) and of bnkit's."""
    import inspect

    from keras.src.applications import convnext
    from keras.src.ops import image as keras_image_ops
    from keras.src.ops import numpy as keras_numpy_ops

    from bnkit.convert import keras_layers

    names: set[str] = set()
    for module in (keras_package.layers, keras_numpy_ops, keras_image_ops, convnext, keras_layers):
        for obj in vars(module).values():
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
        if path in _FOREIGN:
            continue
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
    # rows of other packages (torchvision's frozen batch norm) are matched by name, never imported to trace
    assert len(modules) == len(TORCH_MODULES) - len(_FOREIGN)
    assert "torchvision.ops.misc.FrozenBatchNorm2d" in _FOREIGN
    for path, kind, check in TORCH_FUNCTIONS:  # aliases of one function hold every row's kind
        assert (kind, check) in functions[_resolve(path)], path


def test_keras_rows_name_classes_of_this_keras():
    names = _keras_class_names()
    missing = [name for name, _ in KERAS_LAYERS if name not in names]
    missing += [name for name in (*KERAS_RANDOM_LAYERS, *KERAS_RANDOM_CUSTOM_LAYERS) if name not in names]
    assert missing == []


def test_every_kind_is_documented_with_its_tolerance():
    """docs/compare.md's table of kinds has a row per kind of the table the tracers read."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "compare.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")}
    assert set(KINDS) <= rows, set(KINDS) - rows
