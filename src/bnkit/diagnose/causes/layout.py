"""``layout``: a Dense/Linear after Flatten whose weights are in the other framework's flatten order.

Keras flattens ``H·W·C`` (NHWC), PyTorch ``C·H·W`` (NCHW): a port that copies the dense kernel
without reordering its rows gives a layer whose inputs agree (compare lines the flatten outputs up
in one order) and whose outputs do not. The experiment: each side's dense layer, fed its flatten's
output in the other order, reproduces the other side's output.
"""

from __future__ import annotations

import numpy as np

from bnkit.diagnose.report import CompareReport
from bnkit.diagnose.tolerance import diff
from bnkit.diagnose.trace import Entry, rerun

__all__ = ["find", "other_flatten_order", "flatten_feeding"]


def other_flatten_order(entry: Entry, framework: str) -> np.ndarray:
    """A flatten entry's output in the other flatten order (H·W·C ⇄ C·H·W), in its own framework."""
    if framework == "keras":
        return entry.canonical  # Keras flattens H·W·C; canonical is C·H·W
    shape = entry.pre_flatten_shape
    if shape is None or len(shape) < 3:
        return entry.raw
    full = entry.raw.reshape((entry.raw.shape[0], *shape[1:]))
    # C·H·W flattened data -> H·W·C, or (a port that permuted to channels-last first) back
    moved = np.moveaxis(full, 1, -1) if entry.flat_order == "own" else np.moveaxis(full, -1, 1)
    return np.ascontiguousarray(moved).reshape(entry.raw.shape)


def flatten_feeding(ctx, k: int) -> int | None:
    """The row of the paired flatten that alone feeds row ``k`` on both sides, or None."""
    ea, eb = ctx.entries(k)
    if len(ea.producers) != 1 or len(eb.producers) != 1:
        return None
    pa, pb = ea.producers[0], eb.producers[0]
    if ctx.partner_of_a.get(pa) != pb or ctx.entries_a[pa].kind != "flatten":
        return None
    return ctx.row_of_a[pa]


def find(report: CompareReport, ctx, add) -> None:
    """Flatten → Dense pairs whose flatten outputs agree but whose dense outputs do not."""
    if ctx.framework_a == ctx.framework_b:
        return
    for k, dense_row in enumerate(report.rows):
        if dense_row.kind != "dense" or not dense_row.diverges:
            continue
        f = flatten_feeding(ctx, k)
        if f is None or report.rows[f].differs:
            continue
        flat_row = report.rows[f]
        fa, fb = ctx.entries(f)
        da, db = ctx.entries(k)
        # the flatten outputs agree in one order: does a dense layer expect the other order?
        try:
            alt_b = rerun(db, ctx.framework_b, other_flatten_order(fb, ctx.framework_b))
            alt_a = rerun(da, ctx.framework_a, other_flatten_order(fa, ctx.framework_a))
            confirmed = (
                not diff(alt_b, da.raw, dense_row.atol, ctx.rtol)[3]
                or not diff(alt_a, db.raw, dense_row.atol, ctx.rtol)[3]
            )
        except Exception:  # noqa: BLE001 - an experiment that cannot run confirms nothing
            confirmed = False
        if confirmed:
            keras_side = "A" if ctx.framework_a == "keras" else "B"
            add(
                "layout",
                f"{dense_row.name}: the {dense_row.type_a} / {dense_row.type_b} after Flatten "
                f"({flat_row.name}) has weights in the other framework's flatten order: Keras flattens "
                "H·W·C (NHWC), PyTorch C·H·W (NCHW). The flatten outputs agree; the dense outputs agree only "
                f"when its input is reordered. Permute the weight rows when porting (model {keras_side} is "
                "the Keras side).",
                dense_row.name,
                "experiment: the dense layer fed the other framework's flatten order reproduces the other "
                "side's output",
            )
