"""``non-finite``: NaN or Inf in the input or in some layer's output.

Values that are not finite cannot be compared (NaN equals nothing, and NaN at the same place on
both sides says nothing about the layers), so compare never reports such models as agreeing. The
cause names where the non-finite values come from: the input, or on each side the first layer
(in execution order) whose output holds them while its inputs did not.
"""

from __future__ import annotations

import numpy as np

from bnkit.diagnose.report import CompareReport
from bnkit.diagnose.trace import Trace

__all__ = ["find", "first_producer"]


def first_producer(trace: Trace):
    """The first entry whose output is not finite while its inputs were, or None."""
    for e in trace.entries:
        if e.nonfinite and e.inputs_finite:
            return e
    return None


def _count(x: np.ndarray) -> int:
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def find(report: CompareReport, ctx, add) -> None:
    """Name the source of non-finite values, if any."""
    x_bad = ctx.trace_a.input_nonfinite
    if x_bad:
        add(
            "non-finite",
            f"the input holds {x_bad:,} NaN/Inf value{'s' if x_bad != 1 else ''}: every layer they reach computes "
            "NaN/Inf on both sides, and values that are not finite cannot be compared. Compare on a finite "
            "input (and find where the NaN/Inf in your data comes from).",
            "input",
            "observed: non-finite values in the input",
        )
        return
    named = False
    for label, trace, partner in (("A", ctx.trace_a, ctx.partner_of_a), ("B", ctx.trace_b, ctx.partner_of_b)):
        entry = first_producer(trace)
        if entry is None:
            continue
        if entry.index in partner:
            ia = entry.index if label == "A" else partner[entry.index]
            layer = report.rows[ctx.row_of_a[ia]].name
        else:
            layer = entry.name
        count = _count(entry.canonical)
        add(
            "non-finite",
            f"{layer}: the {entry.type} of model {label} ({trace.framework}) outputs {count:,} NaN/Inf "
            f"value{'s' if count != 1 else ''} from finite inputs (a negative or zero variance under a "
            "zero eps, a division by zero, an overflow of float range?); from there on the values cannot be "
            "compared.",
            layer,
            "observed: the first layer whose output is not finite while its inputs are",
        )
        named = True
    if not named and report.output_nonfinite:
        add(
            "non-finite",
            "the final output holds NaN/Inf although every traced layer's output is finite: an operation "
            "after the last traced layer produced them.",
            "output",
            "observed: non-finite values in the final output only",
        )
