"""``.keras``: a Keras 3 archive (a zip of ``config.json``, ``metadata.json`` and the weights),
loaded by Keras in safe mode (no ``Lambda`` or other code from the file runs)."""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats._keras_loading import load_with_keras
from bnkit.formats.atomic import atomic_path
from bnkit.formats.limits import Budget
from bnkit.formats.zipfiles import is_zip

__all__ = ["read", "write"]


def read(path: Path, budget: Budget):
    # Keras answers "File not found" for a .keras file that is not a zip archive: say what is wrong
    if not is_zip(path):
        raise ModelFileError(f"{path}: not a Keras .keras archive (not a zip file: truncated, or another format?)")
    return load_with_keras(path)


def write(model, path: Path, *, force: bool = False, input_shape=None) -> None:
    with atomic_path(path, force) as tmp:
        model.save(tmp)
