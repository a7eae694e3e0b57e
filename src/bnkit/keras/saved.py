"""Saved Keras models whose ``BatchNormalization`` has ``synchronized=True``, on any backend.

Keras 3 refuses ``synchronized=True`` on every backend but TensorFlow, so a model trained with a
distribution strategy on TensorFlow cannot even be loaded on the torch backend. bnkit's layer
(:class:`bnkit.keras.BatchNormalization`) takes it there and synchronises over
``torch.distributed``; :func:`routed_to_bnkit` gives a file to load in which such layers name
bnkit's class, everything else left as it is (the weights are the same, in the same order).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["reroute_synchronized", "routed_to_bnkit"]

_KERAS_MODULES = (None, "keras.layers", "keras.src.layers", "keras.src.layers.normalization.batch_normalization")
_REGISTERED = "bnkit>BatchNormalization"


def reroute_synchronized(config, *, legacy: bool = False) -> int:
    """Point every Keras ``BatchNormalization`` with ``synchronized=True`` in ``config`` at bnkit's
    class, in place; returns how many. ``legacy``: a Keras 2 / ``.h5`` config (class names only)."""
    count = 0
    if isinstance(config, list):
        return sum(reroute_synchronized(item, legacy=legacy) for item in config)
    if not isinstance(config, dict):
        return 0
    inner = config.get("config")
    if (
        config.get("class_name") == "BatchNormalization"
        and config.get("module") in _KERAS_MODULES
        and config.get("registered_name") in (None, "BatchNormalization")
        and isinstance(inner, dict)
        and inner.get("synchronized")
    ):
        if legacy:
            config["class_name"] = _REGISTERED
        else:
            config.update(module="bnkit.keras.batchnorm", registered_name=_REGISTERED)
        count += 1
    return count + sum(reroute_synchronized(value, legacy=legacy) for value in config.values())


@contextlib.contextmanager
def routed_to_bnkit(path: Path, config=None) -> Iterator[Path]:
    """``path`` itself, or (where it holds a synchronised Keras batch norm and the backend is not
    TensorFlow) a temporary copy whose config names bnkit's layer for them.

    ``config``: the file's model config (``config.json`` of a ``.keras``, the ``model_config``
    attribute of an ``.h5``) as its reader parsed and checked it; without it, it is read here with
    the same bounds (:mod:`bnkit.formats`). It is changed in place.
    """
    import keras

    import bnkit.keras.batchnorm  # noqa: F401 - registers bnkit>BatchNormalization

    if keras.backend.backend() == "tensorflow":
        yield path
        return
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        yield path
        return
    legacy = suffix != ".keras"
    if config is None:
        config = _read_config(path, legacy)
    if config is None or not reroute_synchronized(config, legacy=legacy):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bnkit-") as folder:
        copy = Path(folder) / path.name
        if legacy:
            import h5py

            shutil.copyfile(path, copy)
            with h5py.File(copy, "r+") as f:
                f.attrs["model_config"] = json.dumps(config)
        else:
            from bnkit.formats.zipfiles import SafeZip

            with SafeZip(path) as source, zipfile.ZipFile(copy, "w") as target:
                for item in source.zip.infolist():
                    if item.filename == "config.json":
                        target.writestr(item, json.dumps(config))
                        continue
                    with source.zip.open(item) as reader, target.open(item, "w") as writer:
                        shutil.copyfileobj(reader, writer)
        yield copy


def _read_config(path: Path, legacy: bool):
    """The model config of a Keras file, read bounded; None where there is none (Keras then says so)."""
    from bnkit.formats.limits import ReadLimits

    budget = ReadLimits().budget()
    if legacy:
        import h5py

        from bnkit.formats.h5_checks import read_json_attribute

        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                return None
            return read_json_attribute(f, "model_config", "the model_config attribute", budget)
    from bnkit.formats.keras_archive import check_archive

    return check_archive(path, budget)
