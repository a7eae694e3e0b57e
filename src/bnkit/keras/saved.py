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
def routed_to_bnkit(path: Path) -> Iterator[Path]:
    """``path`` itself, or (where it holds a synchronised Keras batch norm and the backend is not
    TensorFlow) a temporary copy whose config names bnkit's layer for them."""
    import keras

    import bnkit.keras.batchnorm  # noqa: F401 - registers bnkit>BatchNormalization

    if keras.backend.backend() == "tensorflow":
        yield path
        return
    suffix = path.suffix.lower()
    if suffix == ".keras":
        with zipfile.ZipFile(path) as archive:
            try:
                config = json.loads(archive.read("config.json"))
            except (KeyError, ValueError):
                config = None  # not a model archive: Keras says so
        if config is None or not reroute_synchronized(config):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="bnkit-") as folder:
            copy = Path(folder) / path.name
            with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
                for item in source.infolist():
                    if item.filename == "config.json":
                        target.writestr(item, json.dumps(config))
                        continue
                    with source.open(item) as reader, target.open(item, "w") as writer:
                        shutil.copyfileobj(reader, writer)
            yield copy
        return
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        try:
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else None
        except ValueError:
            config = None
        if config is None or not reroute_synchronized(config, legacy=True):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="bnkit-") as folder:
            copy = Path(folder) / path.name
            shutil.copyfile(path, copy)
            with h5py.File(copy, "r+") as f:
                f.attrs["model_config"] = json.dumps(config)
            yield copy
        return
    yield path
