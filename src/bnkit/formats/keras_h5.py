"""``.h5``/``.hdf5``: a legacy Keras (TF 2.x) model file, loaded by Keras in safe mode."""

from __future__ import annotations

from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats._keras_loading import load_with_keras
from bnkit.formats.limits import Budget

__all__ = ["read"]


def read(path: Path, budget: Budget):
    import h5py

    if not h5py.is_hdf5(path):
        raise ModelFileError(f"{path}: not a legacy Keras .h5 model (not an HDF5 file: truncated, or another format?)")
    return load_with_keras(path)
