"""Batch-norm causes, from the paired batch norms' settings, the mode each ran in and (after a
training step) the running statistics they wrote:

``training-mode``, ``keras-frozen-inference``, ``missing-running-stats``, ``eps``,
``momentum-convention``, ``running-variance-estimator``.

:func:`compare_running_stats` also lives here: it decides whether a pair's running statistics
diverge after a training step, by the statistics themselves and by the batch statistics each side
folded in.
"""

from __future__ import annotations

import math

import numpy as np

from bnkit.conventions import KERAS, TORCH
from bnkit.diagnose.report import BatchNormState, CompareReport, LayerDiff
from bnkit.diagnose.tolerance import diff

__all__ = ["find", "compare_running_stats", "folded_batch_stats"]


def compare_running_stats(
    row: LayerDiff,
    a: BatchNormState,
    b: BatchNormState,
    atol: float,
    rtol: float,
    training: bool,
    rounding: tuple[float, float] = (0.0, 0.0),
) -> None:
    """After a training step, compare the updated running statistics of a BN pair.

    ``rounding``: how far float rounding alone may move the running mean and variance (measured
    like the outputs', see :mod:`bnkit.diagnose.tolerance`); allowed on top of ``atol``."""
    if not training:
        return
    if a.tracks_running_stats != b.tracks_running_stats:  # one side keeps none: they cannot agree
        row.running_stats_diverge = True
        return
    if not a.tracks_running_stats:
        return
    if a.running_mean_after is None or b.running_mean_after is None:
        return
    mean_atol, var_atol = (atol + r for r in rounding)
    mean_abs, _, _, mean_div = diff(a.running_mean_after, b.running_mean_after, mean_atol, rtol)
    var_abs, _, _, var_div = diff(a.running_var_after, b.running_var_after, var_atol, rtol)
    row.running_mean_abs_diff = mean_abs
    row.running_var_abs_diff = var_abs
    row.running_stats_diverge = bool(mean_div or var_div)
    if a.renorm_after is not None and b.renorm_after is not None:  # the statistics r and d are taken from
        pairs = zip(a.renorm_after, b.renorm_after, (mean_atol, var_atol), strict=True)
        row.running_stats_diverge |= any(diff(x, y, tol, rtol)[3] for x, y, tol in pairs)
    # One step moves the running statistics by only w (the new-batch weight, 0.01 for Keras'
    # default) times the difference, but they converge to what each side folds in: compare the
    # batch statistics folded in, (after - (1 - w) * before) / w, too.
    folded = [folded_batch_stats(s) for s in (a, b)]
    if folded[0] is not None and folded[1] is not None:
        w = max(a.new_weight, b.new_weight)
        for k in range(2):
            x, y = folded[0][k], folded[1][k]
            # rounding of after/before (float32) is amplified by 1/w, and so is the statistics' own
            slack = 4 * np.finfo(np.float32).eps * max(folded[0][2], folded[1][2]) + rounding[k] / w
            if diff(x, y, atol + slack, rtol)[3]:
                row.running_stats_diverge = True


def folded_batch_stats(s: BatchNormState):
    """(batch mean, batch variance, rounding scale) that a training step folded into the running
    statistics, recovered from the statistics before and after; None when unknown."""
    if s.new_weight is None or not s.new_weight > 0 or s.running_mean_before is None:
        return None
    w = s.new_weight
    arrays = [np.asarray(v, dtype=np.float64) for v in (s.running_mean_before, s.running_mean_after)]
    arrays += [np.asarray(v, dtype=np.float64) for v in (s.running_var_before, s.running_var_after)]
    mean = (arrays[1] - (1 - w) * arrays[0]) / w
    var = (arrays[3] - (1 - w) * arrays[2]) / w
    scale = max(float(np.max(np.abs(v))) for v in arrays) / w if arrays[0].size else 0.0
    return mean, var, scale


def _side(state: BatchNormState, label: str) -> str:
    return f"model {label} ({state.framework})"


def _describe_momentum(s: BatchNormState) -> str:
    if s.momentum is None:
        return "momentum=None (cumulative average)"
    return f"momentum={s.momentum:g} (weight {s.new_weight:g} on the new batch)"


def find(report: CompareReport, ctx, add) -> None:
    """Name the batch-norm causes of every paired batch norm."""
    for pair in report.batch_norms:
        row, a, b = pair.row, pair.a, pair.b
        name = row.name
        output_differs = row.diverges
        if a.uses_batch_stats != b.uses_batch_stats:
            batch, other = (a, b) if a.uses_batch_stats else (b, a)
            batch_label, other_label = ("A", "B") if a.uses_batch_stats else ("B", "A")
            if other.framework == "keras" and ctx.training and not other.trainable:
                add(
                    "keras-frozen-inference",
                    f"{name}: the Keras BatchNormalization of {_side(other, other_label)} has "
                    "trainable=False, so it normalises with its moving statistics even under training=True, "
                    f"while {_side(batch, batch_label)} uses the batch statistics. Set trainable=True on the "
                    "Keras layer, or put the other side's batch norm in inference mode (eval()).",
                    name,
                    "observed: batch statistics on one side only; the Keras layer has trainable=False",
                )
            elif batch.framework == "torch" and not batch.tracks_running_stats and not ctx.training:
                add(
                    "missing-running-stats",
                    f"{name}: the PyTorch batch norm of {_side(batch, batch_label)} was built with "
                    "track_running_stats=False, so it has no running statistics and normalises with the "
                    f"batch statistics even in eval(), while {_side(other, other_label)} uses its running "
                    "statistics. Build it with track_running_stats=True and load the running statistics.",
                    name,
                    "observed: running_mean is None on the PyTorch side",
                )
            else:
                why = (
                    "the module is in train() mode"
                    if batch.framework == "torch" and batch.in_training_mode
                    else "its ONNX BatchNormalization node has training_mode=1 (before opset 14: more than one "
                    "output), which onnxruntime runs with the batch statistics"
                    if batch.framework == "onnx" and not ctx.training
                    else "it was called in training mode"
                )
                other_why = (
                    "stays in eval() mode (its train() is overridden or it was put back in eval())"
                    if other.framework == "torch" and ctx.training
                    else "uses its running statistics"
                )
                fix = (
                    "set training_mode=0 on the ONNX node and keep its one output"
                    if batch.framework == "onnx" and not ctx.training
                    else "call model.eval() on the PyTorch module before inference"
                    if not ctx.training
                    else "make both sides run this batch norm in the same mode"
                )
                add(
                    "training-mode",
                    f"{name}: {_side(batch, batch_label)} normalises with the batch statistics "
                    f"because {why}, "
                    f"while {_side(other, other_label)} {other_why}. Fix: {fix}.",
                    name,
                    "observed: the two layers ran in different modes in this comparison",
                )
        if ctx.training and a.tracks_running_stats != b.tracks_running_stats:
            missing, keeper = (a, b) if not a.tracks_running_stats else (b, a)
            missing_label, keeper_label = ("A", "B") if missing is a else ("B", "A")
            add(
                "missing-running-stats",
                f"{name}: the PyTorch batch norm of {_side(missing, missing_label)} was built with "
                "track_running_stats=False: this training step agrees, but it keeps no running statistics, "
                f"so in eval() it still normalises with batch statistics while {_side(keeper, keeper_label)} "
                "uses the running statistics it updates. Build it with track_running_stats=True.",
                name,
                "observed: running_mean is None on one side only",
            )
        if not math.isclose(a.eps, b.eps, rel_tol=1e-6, abs_tol=0.0):
            below = None if output_differs else ctx.divergence_below(report, row.index)
            if output_differs or below is not None:
                add(
                    "eps",
                    f"{name}: eps is {a.eps:g} in model A ({a.framework}) and {b.eps:g} in model B "
                    f"({b.framework}) (PyTorch's default is {TORCH.eps:g}, Keras' {KERAS.eps:g}); the outputs "
                    "differ by about (eps_a - eps_b) / (2 var) relative. Set the same eps on both sides.",
                    name,
                    "config: eps differs and the layer's outputs differ"
                    if output_differs
                    else f"config: eps differs; the layer's outputs stay within tolerance, but the difference "
                    f"grows past it further on, at {below.name}",
                )
        if ctx.training and a.uses_batch_stats and b.uses_batch_stats and row.running_mean_abs_diff is not None:
            stats_differ = row.running_stats_diverge
            if stats_differ and not _same_weight(a, b):
                same_number = a.momentum is not None and a.momentum == b.momentum
                detail = (
                    f"both say momentum={a.momentum:g}, but it weighs the "
                    f"{a.momentum_weighs} value in model A and the {b.momentum_weighs} value in model B"
                    if same_number and a.momentum_weighs != b.momentum_weighs
                    else f"model A has {_describe_momentum(a)}, model B has {_describe_momentum(b)}"
                )
                add(
                    "momentum-convention",
                    f"{name}: the running statistics move at different speeds: {detail}. PyTorch's momentum "
                    "is the weight of the new batch (run = (1-m)·run + m·batch), Keras', ONNX's and Flax's "
                    "the weight of the old "
                    "value (run = m·run + (1-m)·batch): translate with bnkit.translate_momentum.",
                    name,
                    "observed: the running statistics differ after one training step",
                )
            if stats_differ and a.running_var_estimator != b.running_var_estimator:
                add(
                    "running-variance-estimator",
                    f"{name}: model A folds the {a.running_var_estimator} batch variance into its running "
                    f"variance, model B the {b.running_var_estimator} one (PyTorch: unbiased, n/(n-1) times "
                    "the biased; Keras: biased). The outputs of the training step agree, the running "
                    "variances — and so every later inference — do not. Use a bnkit layer with the other "
                    "side's convention.",
                    name,
                    _estimator_evidence(row, a, b),
                )

        if ctx.training and a.uses_batch_stats and b.uses_batch_stats and row.differs:
            difference = _renorm_difference(a, b)
            if difference:
                add(
                    "renorm",
                    f"{name}: {difference}. In training, batch renormalization multiplies the normalised batch "
                    "by r = s_batch / s_renorm and adds d = (mean_batch - mean_renorm) / s_renorm (clipped by "
                    "renorm_clipping), and keeps its running variance as the square of a moving standard "
                    "deviation; in inference it is plain batch norm. Build both sides alike: Keras' renorm=True "
                    "is bnkit.torch.BatchNorm2d(..., renorm=True, convention='keras') in PyTorch "
                    "(bnkit.convert carries it over).",
                    name,
                    "config: the renorm settings differ and the layer's training output or statistics differ",
                )


def _renorm_difference(a: BatchNormState, b: BatchNormState) -> str:
    """How the two sides' batch renormalization differs, in words; "" where it does not."""
    if a.renorm != b.renorm:
        on, off = ("A", "B") if a.renorm else ("B", "A")
        return f"model {on} uses batch renormalization (renorm=True), model {off} does not"
    if not a.renorm:
        return ""
    if a.renorm_clipping != b.renorm_clipping:
        return f"renorm_clipping is {a.renorm_clipping} in model A and {b.renorm_clipping} in model B"
    same = (a.renorm_new_weight is None and b.renorm_new_weight is None) or (
        a.renorm_new_weight is not None
        and b.renorm_new_weight is not None
        and math.isclose(a.renorm_new_weight, b.renorm_new_weight, rel_tol=1e-6, abs_tol=1e-12)
    )
    if not same:

        def weight(w):
            return "a cumulative average" if w is None else f"weight {w:g} on the new batch"

        return (
            f"the renorm statistics move at different speeds: renorm_momentum gives {weight(a.renorm_new_weight)} "
            f"in model A, {weight(b.renorm_new_weight)} in model B (Keras' renorm_momentum weighs the old value, "
            "PyTorch-convention bnkit layers' the new one)"
        )
    return ""


def _estimator_evidence(row: LayerDiff, a: BatchNormState, b: BatchNormState) -> str:
    """The measured ratio of the batch variances each side folded in, next to n / (n - 1)."""
    text = "observed: the running variances differ after one training step"
    folded_a, folded_b = folded_batch_stats(a), folded_batch_stats(b)
    if folded_a is None or folded_b is None or len(row.shape) < 2:
        return text
    n = int(np.prod(row.shape)) // int(row.shape[1])
    unbiased, biased = (
        (folded_a[1], folded_b[1]) if a.running_var_estimator == "unbiased" else (folded_b[1], folded_a[1])
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.nanmedian(unbiased / biased))
    if n < 2 or not math.isfinite(ratio):
        return text
    return (
        f"{text}; the unbiased side folded in {ratio:.6g} times the biased side's batch variance, "
        f"n/(n-1) = {n / (n - 1):.6g} with n = {n} values per channel"
    )


def _same_weight(a: BatchNormState, b: BatchNormState) -> bool:
    if a.new_weight is None or b.new_weight is None:
        return a.new_weight is None and b.new_weight is None
    return math.isclose(a.new_weight, b.new_weight, rel_tol=1e-6, abs_tol=1e-12)
