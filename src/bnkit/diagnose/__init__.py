"""Diagnosis of batch normalization problems: :func:`lint` (one model) and ``compare`` (two models)."""

from __future__ import annotations

import importlib

from bnkit.diagnose.lint import Finding, lint

__all__ = ["lint", "Finding", "compare"]


def __getattr__(name: str):
    if name == "compare":
        return importlib.import_module("bnkit.diagnose.compare").compare
    raise AttributeError(f"module 'bnkit.diagnose' has no attribute {name!r}")
