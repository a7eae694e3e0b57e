"""``exporter-fold`` (and ``training-mode``) at a conv+BN pair that an ONNX exporter folded into one Conv.

The source's pair is one merged entry (:mod:`bnkit.diagnose.exporter_folds`) holding the folded weights
``W · s``, ``(b - mean) · s + beta`` with ``s = gamma / sqrt(var + eps)`` from the source's batch norm
*now*, and its own kernel ``W``. Where such a row diverges while its inputs agree:

* the source's batch norm normalised with batch statistics (training): the folded Conv is its inference
  form only: ``training-mode``;
* the ONNX kernel is the source kernel scaled per output channel, ``W_onnx[c] = r_c · W[c]`` (least
  squares, the rest within float rounding), by factors other than ``s``: the exporter folded statistics
  (or gamma) of another state — exported before training went on, before the statistics were loaded or
  recalibrated: ``exporter-fold``.

Anything else (a kernel that is no per-channel multiple of the source's) is left to ``weights``.
"""

from __future__ import annotations

import numpy as np

from bnkit.diagnose.exporter_folds import NOTE
from bnkit.diagnose.report import CompareReport

__all__ = ["find", "per_channel_ratio"]

# the ONNX kernel is a per-channel multiple of the source's when the rest is this small relative to it
# (float32 rounding of the fold is ~1e-7)
_MULTIPLE = 1e-5
# ...and the multiple is another than the source's gamma / sqrt(var + eps) beyond this (relative)
_OTHER = 1e-4


def per_channel_ratio(folded: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(``r_c`` minimising ``|folded[c] - r_c · own[c]|``, the largest rest relative to ``max |folded|``),
    or None for kernels of other shapes or an all-zero channel."""
    if folded.shape != own.shape or folded.ndim < 2:
        return None
    f = folded.reshape(folded.shape[0], -1).astype(np.float64)
    w = own.reshape(own.shape[0], -1).astype(np.float64)
    norms = (w * w).sum(axis=1)
    if not np.all(norms > 0):
        return None
    r = (f * w).sum(axis=1) / norms
    rest = float(np.max(np.abs(f - r[:, None] * w))) / max(float(np.max(np.abs(f))), np.finfo(np.float64).tiny)
    return r, rest


def find(report: CompareReport, ctx, add) -> None:
    """Name the causes of every diverging exporter-folded pair whose inputs agree."""
    for k, row in enumerate(report.rows):
        if row.note != NOTE or not row.diverges or row.nonfinite or not ctx.is_source(report, k):
            continue
        ea, eb = ctx.entries(k)
        merged, onnx_entry, label = (ea, eb, "A") if "unfolded_weight" in ea.weights else (eb, ea, "B")
        if "unfolded_weight" not in merged.weights:
            continue
        other = "B" if label == "A" else "A"
        w = merged.weights
        bn_name = merged.name.split("+", 1)[-1]
        if merged.bn is not None and merged.bn.uses_batch_stats:
            add(
                "training-mode",
                f"{row.name}: the batch norm {bn_name} of model {label} ({merged.bn.framework}) normalises with "
                f"the batch statistics (training), while the exporter folded it into the Conv of model {other} "
                "with its running statistics: a folded batch norm is its inference form only. Compare in "
                "inference (eval()), or export with the batch norm kept as a node in training mode.",
                row.name,
                "observed: batch statistics in the source's batch norm; no batch norm left in the ONNX graph",
            )
            continue
        q = onnx_entry.weights.get("weight")
        fit = None if q is None else per_channel_ratio(q, w["unfolded_weight"])
        if fit is None:
            continue
        r, rest = fit
        var = w["bn_var"].astype(np.float64)
        gamma = w["bn_gamma"].astype(np.float64) if "bn_gamma" in w else np.ones_like(var)
        s = gamma / np.sqrt(var + float(w["bn_eps"]))
        off = np.abs(r - s) / np.maximum(np.abs(s), np.finfo(np.float64).tiny)
        if rest > _MULTIPLE or float(off.max()) <= _OTHER:
            continue
        channels = np.flatnonzero(off > _OTHER)
        c = int(np.argmax(off))
        add(
            "exporter-fold",
            f"{row.name}: the Conv of model {other} is model {label}'s convolution folded with a batch norm, "
            f"but not with the batch norm {bn_name} as it is now: its kernel is the source kernel times a "
            "per-channel factor that differs from gamma / sqrt(running_var + eps) in "
            f"{channels.size} of {s.size} channels (channel {c}: {r[c]:.6g} folded, {s[c]:.6g} now). "
            "The model was exported with other statistics (before "
            "training went on, or before its statistics were loaded or recalibrated): export it again.",
            row.name,
            f"weights: the ONNX kernel is a per-channel multiple of the source's (rest {rest:.2g} relative), "
            f"its factors up to {float(off.max()):.3g} relative from the source batch norm's",
        )
