"""Numerical helpers the reference tests share."""

from __future__ import annotations

import numpy as np


def finite_difference(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f at every entry of a (float64; error ~h^2)."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (f(plus) - f(minus)) / (2 * h)
    return grad
