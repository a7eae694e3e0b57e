"""``weights`` at the layers where a divergence starts (and what looks like it but is not).

A *source* row differs while every paired layer feeding it agrees. For a convolution or dense
layer there:

* a Keras/PyTorch 2-D kernel that equals the other side's transposed ``(3, 2, 1, 0)`` (spatial
  axes swapped) is ``layout``;
* otherwise an experiment feeds model B's layer model A's input (moved to B's layout and flatten
  order). When it reproduces A's output within the rounding of the layer's own sums, the
  parameters agree: the layers before it, each within tolerance, added up past it — named
  ``unexplained`` with that explanation (loosen the tolerance). When it does not, ``weights``;
* a batch norm there whose mode and eps agree (no batch-norm cause) but whose gamma, beta or
  statistics differ is ``weights`` too.
"""

from __future__ import annotations

import math

import numpy as np

from bnkit.diagnose.causes.layout import flatten_feeding, other_flatten_order
from bnkit.diagnose.report import CompareReport, LayerDiff
from bnkit.diagnose.tolerance import SAFETY, diff, local_terms
from bnkit.diagnose.trace import rerun, to_layout, to_numpy

__all__ = ["find"]

_BN_PARAMETERS = (("gamma", "gamma (weight)"), ("beta", "beta (bias)"), ("mean", "moving/running mean"),
                  ("var", "moving/running variance"))  # fmt: skip


#: How many times its tolerance a layer without parameters must be off, its inputs agreeing, to be
#: called a different function rather than rounding its inputs' small differences grew through.
_FAR = 10.0


def find(report: CompareReport, ctx, add, explained: set[str]) -> None:
    """Name ``weights`` (or what it is instead) at every source row no other cause explains."""
    explained_a = {ctx.pairs[k][0] for k, row in enumerate(report.rows) if row.name in explained}
    for k, row in enumerate(report.rows):
        if not row.diverges or row.nonfinite or row.name in explained or not ctx.is_source(report, k):
            continue
        if explained_a & ctx.ancestors_a(ctx.pairs[k][0]):
            continue  # downstream of a layer another cause names (an eps whose effect grows further on)
        moved = _inputs_differ(ctx, report, k)
        if moved is not None:
            figures, rearranged = moved
            if rearranged:
                add(
                    "layout",
                    f"{row.name}: the {row.type_a} / {row.type_b} receives other values in other places "
                    "although the traced layers feeding it agree: the operations between them, which move "
                    "values without computing (reshape, view, permute, transpose, slice, chunk — a channel "
                    "shuffle), rearrange them differently in the two models.",
                    row.name,
                    f"observed: the layer's inputs as it received them differ ({figures}); on each side every "
                    "value it received is one the layers feeding it produced",
                )
            else:
                add(
                    "unexplained",
                    f"{row.name}: the {row.type_a} / {row.type_b} receives different inputs although the traced "
                    "layers feeding it agree: an operation between them that compare does not trace "
                    "(arithmetic with a number, a layer of a kind it does not know) computes differently in the "
                    "two models.",
                    row.name,
                    f"observed: the layer's inputs as it received them differ ({figures}), and not all of "
                    "them are values the layers feeding it produced",
                )
            continue
        if row.kind in ("conv", "dense", "scale"):
            _conv_or_dense(ctx, k, row, add)
        elif row.kind == "bn":
            _batchnorm(ctx, k, row, add)
        elif row.kind == "ln":
            _layer_norm(ctx, k, row, add)
        elif row.tolerance_ratio >= _FAR:  # no parameters, far beyond rounding: different functions
            add(
                "unexplained",
                f"{row.name}: this {row.type_a} / {row.type_b} gives different outputs although the layers "
                "before it agree, and it has no parameters: the two compute different functions (another "
                "activation, pooling window, stride or padding, another operation).",
                row.name,
                "observed: inputs agree, outputs differ",
            )


def _conv_or_dense(ctx, k: int, row: LayerDiff, add) -> None:
    if row.kind == "conv" and _kernel_axes_swapped(ctx, k):
        add(
            "layout",
            f"{row.name}: the convolution kernel's spatial axes are swapped between the two models: "
            "Keras stores (kh, kw, in, out), PyTorch (out, in, kh, kw), so the port is "
            "kernel.transpose(3, 2, 0, 1); this one was transposed with (3, 2, 1, 0), which also "
            "swaps kh and kw.",
            row.name,
            "weights: the PyTorch kernel equals the Keras kernel transposed (3, 2, 1, 0)",
        )
        return
    replay = _same_input(ctx, k)
    if replay is not None and replay[0]:
        add(
            "unexplained",
            f"{row.name}: fed the same input, the {row.type_a} and the {row.type_b} give the same output up "
            "to float32 rounding of their sums (summed in another order in each framework), so their "
            "parameters agree; with the small differences of the layers before it, that exceeds the "
            "tolerance. Compare with a larger atol/rtol.",
            row.name,
            "experiment: model B's layer fed model A's input reproduces model A's output within the "
            f"rounding of a sum of that many terms ({replay[1]})",
        )
        return
    evidence = "observed: inputs agree, outputs differ"
    if replay is not None:
        evidence = f"experiment: model B's layer fed model A's input does not reproduce model A's output ({replay[1]})"
    detail = _weight_difference(ctx, k)
    add(
        "weights",
        f"{row.name}: this {row.type_a} / {row.type_b} gives different outputs although the layers before it "
        "agree: its parameters (or its padding, strides, activation) differ between the two models"
        + (f"; {detail}" if detail else "")
        + ".",
        row.name,
        evidence,
    )


def _batchnorm(ctx, k: int, row: LayerDiff, add) -> None:
    ea, eb = ctx.entries(k)
    differing = []
    for key, label in _BN_PARAMETERS:
        wa, wb = ea.weights.get(key), eb.weights.get(key)
        if wa is None and wb is None:
            continue
        if wa is None or wb is None:
            differing.append(f"{label} (on one side only)")
            continue
        if wa.shape != wb.shape or not np.allclose(wa, wb, rtol=1e-6, atol=0):
            delta = float(np.max(np.abs(wa.astype(np.float64) - wb))) if wa.shape == wb.shape else math.inf
            differing.append(f"{label} (max difference {delta:.3g})")
    if not differing:
        return
    add(
        "weights",
        f"{row.name}: the batch norms run in the same mode with the same eps, but their "
        f"{', '.join(differing)} differ: copy them over when porting.",
        row.name,
        "weights: the parameters and statistics compared directly",
    )


def _inputs_differ(ctx, report: CompareReport, k: int) -> tuple[str, bool] | None:
    """Where both sides kept the operand a layer received (parametric kinds), and it differs by
    more than the tolerance of the paired layers it came from: (how far, whether on both sides it
    holds only values its producers output — moved, not computed), else None."""
    ea, eb = ctx.entries(k)
    if not ea.input_raw or not eb.input_raw or flatten_feeding(ctx, k) is not None:
        return None
    xa, xb = ea.input_raw[0], eb.input_raw[0]
    if not ea.compared_as_is:  # else: both hold the data in one arrangement (compare.py decided)
        xa = to_layout(xa, ctx.framework_a, "torch", copy=False)
        xb = to_layout(xb, ctx.framework_b, "torch", copy=False)
    if xa.shape != xb.shape:
        return None
    feeding = [report.rows[i] for i in (ctx.input_pairs(k) or []) if i >= 0]
    atol = max((r.atol for r in feeding), default=ctx.atol)
    max_abs, _, _, diverges = diff(xa, xb, atol, ctx.rtol)
    if not diverges:
        return None
    rearranged = _only_moved(ea, ctx.entries_a) and _only_moved(eb, ctx.entries_b)
    return f"max |difference| {max_abs:.3g}, allowed {atol:.3g}", rearranged


def _only_moved(entry, entries) -> bool:
    """Every value the layer received is, bit for bit, one that the traced layers feeding it output."""
    import torch

    producers = entry.producers
    if not producers or any(p < 0 for p in producers):  # the model input is not kept
        return False
    received = torch.from_numpy(np.ascontiguousarray(entry.input_raw[0])).reshape(-1)
    made = torch.cat([torch.from_numpy(np.ascontiguousarray(entries[p].raw)).reshape(-1) for p in producers])
    return bool(torch.isin(received, made).all())


def _layer_norm(ctx, k: int, row: LayerDiff, add) -> None:
    """A layer norm whose inputs agree: its eps, gamma or beta differ (compared directly: both
    frameworks hold them over the normalized axes), or, where they are equal, its axes."""
    ea, eb = ctx.entries(k)
    eps_a, eps_b = (float(e.weights["eps"]) if "eps" in e.weights else None for e in (ea, eb))
    differing = []
    for key, label in (("gamma", "gamma (weight)"), ("beta", "beta (bias)")):
        wa, wb = ea.weights.get(key), eb.weights.get(key)
        if wa is None and wb is None:
            continue
        if wa is None or wb is None:
            differing.append(f"{label} (on one side only)")
        elif wa.size != wb.size or not np.allclose(wa.reshape(-1), wb.reshape(-1), rtol=1e-6, atol=0):
            delta = (
                float(np.max(np.abs(wa.astype(np.float64).reshape(-1) - wb.reshape(-1))))
                if wa.size == wb.size
                else math.inf
            )
            differing.append(f"{label} (max difference {delta:.3g})")
    if eps_a is not None and eps_b is not None and eps_a != eps_b and not differing:
        add(
            "eps",
            f"{row.name}: the layer norms add a different eps to the variance ({eps_a:g} in model A, "
            f"{eps_b:g} in model B): Keras' LayerNormalization(epsilon=...) is nn.LayerNorm(eps=...).",
            row.name,
            "weights: gamma and beta equal, eps compared directly",
        )
        return
    if differing:
        add(
            "weights",
            f"{row.name}: the layer norms' {', '.join(differing)} differ: copy them over when porting.",
            row.name,
            "weights: the parameters compared directly",
        )
        return
    add(
        "weights",
        f"{row.name}: this {row.type_a} / {row.type_b} gives different outputs although the layers before it "
        "agree and its eps, gamma and beta are equal: it normalizes over other axes in the two models.",
        row.name,
        "observed: inputs agree, outputs differ",
    )


def _weight_difference(ctx, k: int) -> str:
    """Where the kernels can be compared directly (not a dense after a flatten, whose rows are
    reordered between the frameworks), how far apart they are."""
    ea, eb = ctx.entries(k)
    if ea.kind == "dense" and ctx.framework_a != ctx.framework_b and flatten_feeding(ctx, k) is not None:
        return ""
    parts = []
    for key, label in (("weight", "kernel"), ("bias", "bias")):
        wa, wb = ea.weights.get(key), eb.weights.get(key)
        if wa is None and wb is None:
            continue
        if (wa is None) != (wb is None):
            parts.append(f"a {label} on one side only")
        elif wa.shape == wb.shape:
            delta = float(np.max(np.abs(wa.astype(np.float64) - wb))) if wa.size else 0.0
            if delta > 0:
                parts.append(f"the {label}s differ by up to {delta:.3g}")
        else:
            parts.append(f"the {label}s have shapes {wa.shape} and {wb.shape}")
    if not parts and "weight" in ea.weights:
        return "the kernels and biases are equal, so its padding, strides or activation differ"
    return ", ".join(parts)


def _kernel_axes_swapped(ctx, k: int) -> bool:
    """True when a Keras/PyTorch 2-D convolution pair's kernels are each other's transpose with
    the spatial axes swapped (the NHWC/NCHW porting slip ``kernel.transpose(3, 2, 1, 0)``)."""
    if {ctx.framework_a, ctx.framework_b} != {"keras", "torch"}:
        return False
    ea, eb = ctx.entries(k)
    layers = {ctx.framework_a: ea.callables[0], ctx.framework_b: eb.callables[0]}
    kernel = getattr(layers["keras"], "kernel", None)
    weight = getattr(layers["torch"], "weight", None)
    if kernel is None or weight is None or len(kernel.shape) != 4:
        return False
    keras_kernel = to_numpy(kernel)
    torch_weight = to_numpy(weight)
    swapped = np.transpose(keras_kernel, (3, 2, 1, 0))
    right = np.transpose(keras_kernel, (3, 2, 0, 1))
    return (
        swapped.shape == torch_weight.shape
        and np.array_equal(swapped, torch_weight)
        and not (right.shape == torch_weight.shape and np.array_equal(right, torch_weight))
    )


def _same_input(ctx, k: int) -> tuple[bool, str] | None:
    """Experiment: model B's layer of row ``k`` fed model A's input (in B's layout and flatten
    order); (reproduces A's output within its own rounding, figures) or None when it cannot run.

    The allowance is the layer's own rounding on both sides, ``2 · SAFETY · ε · sqrt(n) · m``
    (:func:`bnkit.diagnose.tolerance.local_terms`), plus atol: different parameters give
    differences of the outputs' own size."""
    ea, eb = ctx.entries(k)
    fa, fb = ctx.framework_a, ctx.framework_b
    if not ea.input_raw or len(ea.producers) != 1:
        return None
    f = flatten_feeding(ctx, k)
    if fa == fb:
        x = ea.input_raw[0]
    elif ea.compared_as_is:
        x = ea.input_raw[0]  # both work on one arrangement (ConvNeXt's Linear after a permute)
    elif f is not None:
        prev, prev_b = ctx.entries(f)
        if prev.flat_order == "hwc":
            x = prev.raw
        else:
            x = prev.canonical if fb in ("torch", "onnx") else other_flatten_order(prev, "torch")
    else:
        x = to_layout(to_layout(ea.input_raw[0], fa, "torch"), "torch", fb)
    try:
        out = rerun(eb, fb, np.ascontiguousarray(x))
    except Exception:  # noqa: BLE001 - an experiment that cannot run confirms nothing
        return None
    expected = ea.raw if ea.compared_as_is and fa != fb else ea.canonical
    if expected is ea.canonical:
        out = to_layout(out, fb, "torch")
    gain, n, terms = local_terms(ea, fa, max(ea.input_scales or [0.0]))
    rounding = 2 * SAFETY * max(ctx.trace_a.dtype_eps, ctx.trace_b.dtype_eps) * math.sqrt(n) * terms
    max_abs, _, _, diverges = diff(out, expected, ctx.atol + rounding, ctx.rtol)
    return not diverges, f"max |difference| {max_abs:.3g}, allowed {ctx.atol + rounding:.3g} for {n:,} terms"
