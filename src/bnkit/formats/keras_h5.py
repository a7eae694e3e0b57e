"""``.h5``/``.hdf5``: a legacy Keras (TF 2.x) model file, loaded by Keras in safe mode.

Before Keras opens it, bnkit checks the whole file (:mod:`bnkit.formats.h5_checks`: global heaps
HDF5 would loop on, then with h5py: no link or storage outside the file, no filter plugin) and charges to the
budget what Keras will take: the ``model_config`` attribute (bounded, parsed with a size and depth
limit), the variables it declares (:mod:`bnkit.formats.keras_variables`) and the datasets under
``model_weights``. The ``training_config`` attribute and the ``optimizer_weights`` group are
checked but not charged: Keras reads neither without compiling.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.formats._keras_loading import load_legacy_h5
from bnkit.formats.h5_checks import (
    H5FileError,
    check_global_heaps,
    check_h5,
    no_filter_plugins,
    read_json_attribute,
)
from bnkit.formats.keras2_config import Keras2ConfigError, translate
from bnkit.formats.keras_variables import charge_variables, check_weights_cover
from bnkit.formats.limits import Budget
from bnkit.text import one_line, printable

__all__ = ["read"]

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
