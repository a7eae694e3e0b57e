"""Batch renormalization settings shared by bnkit's PyTorch and Keras layers (framework-free).

Batch renormalization (Ioffe 2017, ``renorm=True`` in Keras 3) corrects the batch-normalised
value by ``r`` and ``d``, the batch's standard deviation and mean relative to moving *renorm*
statistics, clipped by ``renorm_clipping`` (keys ``"rmin"``, ``"rmax"``, ``"dmax"``; a missing
or None bound does not clip). The formulas are in :mod:`bnkit.reference`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from bnkit.conventions import KERAS, Convention, translate_momentum

__all__ = [
    "CLIPPING_KEYS",
    "KERAS_RENORM_MOMENTUM",
    "STATE_NAMES",
    "check_clipping",
    "default_renorm_momentum",
    "read_momentum",
]

CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# bnkit.torch buffer -> Keras weight, for the state renorm adds (in Keras' weight order)
STATE_NAMES = {"running_stddev": "moving_stddev", "renorm_mean": "renorm_mean", "renorm_stddev": "renorm_stddev"}
KERAS_RENORM_MOMENTUM = 0.99  # keras.layers.BatchNormalization's default renorm_momentum


def default_renorm_momentum(convention: Convention) -> float:
    """Keras' default ``renorm_momentum=0.99`` read in ``convention`` (0.01 in PyTorch's)."""
    return translate_momentum(KERAS_RENORM_MOMENTUM, KERAS, convention)


def check_clipping(clipping, where: str = "") -> dict:
    """``renorm_clipping`` as a new dict of float (or None) bounds; refused as Keras refuses it, and more.

    ``None`` is ``{}`` (no clipping). Keys other than ``rmax``, ``rmin``, ``dmax``, bounds that
    are not numbers, ``rmax < rmin``, a negative ``dmax`` and NaN bounds raise ``ValueError``
    (``TypeError`` for a clipping that is not a mapping) quoting the bad value.
    """
    prefix = f"{where}: " if where else ""
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(
            f"{prefix}renorm_clipping must be a dict with the optional keys 'rmax', 'rmin', 'dmax', "
            f"got {type(clipping).__name__} {clipping!r}"
        )
    unknown = sorted(set(clipping) - set(CLIPPING_KEYS), key=str)
    if unknown:
        raise ValueError(
            # Keras' own words first: code written against Keras matches on them
            f"{prefix}Received invalid keys for `renorm_clipping` argument: {dict(clipping)!r} (unknown: "
            f"{', '.join(map(repr, unknown))}). Supported values: ['rmax', 'rmin', 'dmax']."
        )
    bounds = {}
    for key in CLIPPING_KEYS:
        if key not in clipping:
            continue
        value = clipping[key]
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"{prefix}renorm_clipping[{key!r}] must be a float or None, got {type(value).__name__} {value!r}"
                )
            value = float(value)
            if math.isnan(value):
                raise ValueError(f"{prefix}renorm_clipping[{key!r}] must not be NaN")
        bounds[key] = value
    rmin, rmax, dmax = (bounds.get(key) for key in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            f"{prefix}rmax should be greater than rmin in the `renorm_clipping` argument (as Keras says; equal "
            f"is fine). Received: rmax={rmax!r}, rmin={rmin!r}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"{prefix}dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax!r}."
        )
    return bounds


def read_momentum(value, convention: Convention, where: str = ""):
    """``renorm_momentum`` as a float, or None where the convention has a cumulative average."""
    prefix = f"{where}: " if where else ""
    if value is None:
        if convention.cumulative_average_when_none:
            return None
        raise ValueError(
            f"{prefix}renorm_momentum=None (a cumulative average) is not part of the {convention.name} "
            f"convention; give a float (its default is {default_renorm_momentum(convention)})"
        )
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{prefix}renorm_momentum must be a float, got {type(value).__name__} {value!r}")
    return float(value)
