"""``.h5``/``.hdf5``: a legacy Keras (TF 2.x) model file, loaded by Keras in safe mode.

Before Keras opens it, bnkit checks the whole file (:mod:`bnkit.formats.h5_checks`: global heaps
HDF5 would loop on, then with h5py: no link or storage outside the file, no filter plugin) and charges to the
budget what Keras will take: the ``model_config`` attribute (bounded, parsed with a size and depth
limit), the variables it declares (:mod:`bnkit.formats.keras_variables`) and the datasets under
``model_weights``. The ``training_config`` attribute and the ``optimizer_weights`` group are
checked but not charged: Keras reads neither without compiling.

:func:`write` writes a Keras 3 model as tf-keras 2 writes one (``model.save("model.h5")``), so that
tf-keras 2 and Keras 3 both load it: the config translated by :mod:`bnkit.formats.keras2_write`, the
weights laid out as tf-keras 2's ``save_model_to_hdf5`` lays them out. No TensorFlow is needed.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats._keras_loading import load_legacy_h5
from bnkit.formats.atomic import atomic_path
from bnkit.formats.h5_checks import (
    H5FileError,
    check_global_heaps,
    check_h5,
    no_filter_plugins,
    read_json_attribute,
)
from bnkit.formats.keras2_config import Keras2ConfigError, translate
from bnkit.formats.keras_variables import charge_variables, check_weights_cover
from bnkit.formats.limits import Budget, ReadLimits
from bnkit.formats.quiet import captured
from bnkit.text import one_line, printable

__all__ = ["read", "write", "RoundTrip", "KERAS_VERSION", "ROUND_TRIP_TOLERANCE"]

WEIGHTS_GROUP = "model_weights"


def read(path: Path, budget: Budget):
    import h5py

    if not h5py.is_hdf5(path):
        raise ModelFileError(f"{path}: not a legacy Keras .h5 model (not an HDF5 file: truncated, or another format?)")
    shown = printable(str(path))
    with no_filter_plugins():
        try:
            with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
                check_global_heaps(data, 0, len(data), "the file")
            with h5py.File(path, "r") as f:
                if "model_config" not in f.attrs:
                    raise ModelFileError(
                        f"{shown}: holds no model_config attribute: not a Keras model file (weights only, "
                        "from save_weights?)"
                    )
                config = read_json_attribute(f, "model_config", "the model_config attribute", budget)
                if not isinstance(config, dict):
                    raise ModelFileError(f"{shown}: the model_config attribute is not a JSON object")
                config = translate(config)  # what Keras 2 wrote and Keras 3 cannot read (bnkit.formats.keras2_config)
                variables = charge_variables(config, budget, shown, legacy=True)
                weights = check_h5(f, budget, "the file", variables, charge_under=WEIGHTS_GROUP)
                check_weights_cover(variables, weights, shown)
                return load_legacy_h5(shown, config, f)
        except Keras2ConfigError as e:
            raise ModelFileError(f"{shown}: {e}") from e
        except H5FileError as e:
            raise ModelFileError(f"{shown}: {e}") from e
        except OSError as e:  # HDF5's own error for a damaged file
            raise ModelFileError(f"{shown}: not a readable HDF5 file ({one_line(e)})") from e
        except ValueError as e:  # parse_json: not JSON (LimitExceeded, also a ValueError, goes on to the caller)
            if type(e) is not ValueError:
                raise
            raise ModelFileError(f"{shown}: {e}") from e


# ------------------------------------------------------------------------------------------ writing

# the keras_version attribute: the tf-keras version whose loader this layout was checked against
# (readers compare it with "1" only, for Keras 1's kernel layouts)
KERAS_VERSION = "2.21.0"
# the file, read back by bnkit, against the model written: the same Keras layers on the same backend,
# but built anew (bnkit's batch norm may come back as Keras', an operation as a layer); a
# misplaced weight is off by far more
ROUND_TRIP_TOLERANCE = 1e-5
_HDF5_OBJECT_HEADER_LIMIT = 64512  # bytes in one attribute (tf-keras' own limit, for old HDF5 readers)


@dataclass(frozen=True)
class RoundTrip:
    """The written file read back by bnkit, against the model, on a random batch in inference:
    ``difference`` is max |file - model| over the outputs, ``largest`` max |model output|."""

    difference: float
    largest: float

    @property
    def relative(self) -> float:
        return self.difference / self.largest if self.largest > 0 else self.difference

    @classmethod
    def between(cls, expected, got) -> RoundTrip:
        """Max |got − expected| and max |expected| over paired outputs (NumPy arrays of equal shapes)."""
        import numpy as np

        difference = largest = 0.0
        for a, b in zip(expected, got, strict=True):
            if a.size:
                difference = max(difference, float(np.max(np.abs(a - b))))
                largest = max(largest, float(np.max(np.abs(a))))
        return cls(difference, largest)


def write(model, path: Path, *, force: bool = False, input_shape=None) -> RoundTrip:
    """Write the Keras model ``model`` to ``path`` as a Keras 2 ``.h5`` (see the module doc), atomically;
    the temporary file is read back with :func:`read` and run against ``model`` before it is renamed.

    A layer tf-keras 2 could not load as exactly that layer is refused by name before anything is
    written (:class:`ModelFileError`). ``input_shape`` (without the batch, in PyTorch's layout:
    ``C,H,W``) sizes the check's batch where the model leaves a dimension open (else 32).
    """
    from bnkit.formats.keras2_write import NotWritable, keras2_model

    shown = printable(str(path))
    try:
        translated = keras2_model(model)
    except NotWritable as e:
        raise ModelFileError(f"{shown}: not written: tf-keras 2 could not load it exactly: {e}") from e
    batch = _check_batch(model, input_shape, shown)
    with atomic_path(path, force) as tmp:
        _write_h5(translated, tmp)
        result = _read_back(model, tmp, batch, shown)
    return result


def _write_h5(translated, path: Path) -> None:
    """tf-keras 2's ``save_model_to_hdf5`` layout: the config and version attributes at the root,
    ``model_weights/<layer>/<layer>/<variable>:0`` datasets, ``layer_names`` and ``weight_names`` lists."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = KERAS_VERSION.encode()
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(translated.config, default=_json_value).encode("utf8")
        weights = f.create_group(WEIGHTS_GROUP)
        _save_list(weights, "layer_names", [layer.name.encode("utf8") for layer in translated.layers])
        weights.attrs["backend"] = b"tensorflow"
        weights.attrs["keras_version"] = KERAS_VERSION.encode()
        for layer in translated.layers:
            group = weights.create_group(layer.name)
            names = [f"{layer.name}/{name}:0" for name, _ in layer.weights]
            _save_list(group, "weight_names", [name.encode("utf8") for name in names])
            for name, (_, value) in zip(names, layer.weights, strict=True):
                dataset = group.create_dataset(name, value.shape, dtype=value.dtype)
                if value.shape:
                    dataset[:] = value
                else:
                    dataset[()] = value


def _save_list(group, name: str, items: list[bytes]) -> None:
    """A list attribute as tf-keras writes it: split into ``name0``, ``name1``... where it would not
    fit in one object header."""
    import numpy as np

    data = np.asarray(items)
    if data.nbytes <= _HDF5_OBJECT_HEADER_LIMIT:
        group.attrs[name] = data
        return
    chunks = 2
    while any(c.nbytes > _HDF5_OBJECT_HEADER_LIMIT for c in np.array_split(data, chunks)):
        chunks += 1
    for index, chunk in enumerate(np.array_split(data, chunks)):
        group.attrs[f"{name}{index}"] = chunk


def _json_value(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _check_batch(model, input_shape, shown: str) -> list:
    """A random batch of 2 for each of the model's inputs (NumPy, float32, the model's layout)."""
    import numpy as np

    rng = np.random.default_rng(0)
    given = None
    if input_shape is not None:
        given = tuple(input_shape)
        given = given if len(given) <= 1 else (*given[1:], given[0])  # C,H,W -> H,W,C
    batch = []
    for tensor in model.inputs:
        shape = list(tensor.shape[1:])
        if any(d is None for d in shape):
            if given is not None and len(given) == len(shape):
                shape = [g if d is None else d for d, g in zip(shape, given, strict=True)]
            else:
                shape = [32 if d is None else d for d in shape]
        batch.append(rng.normal(size=(2, *shape)).astype("float32"))
    return batch


def _read_back(model, tmp: Path, batch: list, shown: str, read_with=None, what: str = "file") -> RoundTrip:
    """Read ``tmp`` with ``read_with`` (default :func:`read`; the SavedModel writer passes its reader, and
    ``what`` it wrote) and compare its outputs with ``model``'s (see :class:`RoundTrip`)."""
    import numpy as np

    from bnkit.keras import keras

    try:
        with captured():  # what Keras warns reading a Keras 2 config ("alpha is deprecated") is no news here
            written = (read_with or read)(tmp, ReadLimits().budget())
    except ModelFileError as e:
        cause = str(e).split(": ", 1)[-1]
        raise ModelFileError(f"{shown}: not written: the {what} bnkit wrote does not read back ({cause})") from e
    inputs = batch[0] if len(batch) == 1 else batch
    try:
        expected, got = model(inputs, training=False), written(inputs, training=False)
    except Exception as e:  # a shape the model does not take, typically
        raise ModelFileError(
            f"{shown}: not written: could not run the model on the check's batch of shapes "
            f"{[b.shape for b in batch]} ({type(e).__name__}: {one_line(e, 200)}); give input_shape"
        ) from e
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    got = got if isinstance(got, (list, tuple)) else [got]
    def as_numpy(outputs):
        return [np.asarray(keras.ops.convert_to_numpy(t)) for t in outputs]

    result = RoundTrip.between(as_numpy(expected), as_numpy(got))
    if not result.relative <= ROUND_TRIP_TOLERANCE:
        raise ModelFileError(
            f"{shown}: not written: the {what}, read back, disagrees with the model: max |difference| "
            f"{result.difference:.3g} is {result.relative:.3g} of the largest output {result.largest:.3g} "
            f"(tolerance {ROUND_TRIP_TOLERANCE:g}) on a random batch"
        )
    return result
