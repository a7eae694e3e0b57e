"""Diagnosis of batch-norm problems: compare two models, lint one."""

from __future__ import annotations

import importlib

from bnkit.diagnose.lint import lint

__all__ = ["lint", "compare"]


def __getattr__(name: str):
    if name == "compare":
        return importlib.import_module("bnkit.diagnose.compare").compare
    raise AttributeError(f"module 'bnkit.diagnose' has no attribute {name!r}")
