"""Why two models disagree: each rule names a cause (:data:`~bnkit.diagnose.report.CAUSES`) from the
aligned rows, the batch norms' settings and modes, and experiments on the traced layers.

One module per rule or small family of rules:

* :mod:`.nonfinite` — ``non-finite``: the first layer that produced NaN/Inf;
* :mod:`.batchnorm` — ``training-mode``, ``keras-frozen-inference``, ``missing-running-stats``,
  ``eps``, ``momentum-convention``, ``running-variance-estimator``;
* :mod:`.exporter` — ``exporter-fold`` (and ``training-mode``) at a conv+BN pair an ONNX exporter folded;
* :mod:`.layout` — ``layout``: a Dense after Flatten in the other framework's order;
* :mod:`.resize` — ``resize``: a resize layer whose interpolation (mode, align_corners) differs;
* :mod:`.weights` — ``weights`` (and ``layout`` for a convolution kernel with swapped axes, and the
  ``unexplained`` of a layer whose own rounding exceeds the tolerance) at the layers where the
  divergence starts.

:func:`find_causes` runs them in that order; ``unexplained`` is named when none applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnkit.diagnose.report import CAUSES, Cause, CompareReport, LayerDiff
from bnkit.diagnose.trace import INPUT, Entry, Trace

__all__ = ["Context", "find_causes"]


@dataclass
class Context:
    """What the rules may look at beyond the report: both traces and the pairing."""

    trace_a: Trace
    trace_b: Trace
    pairs: list[tuple[int, int]]  # pairs[k] is report.rows[k]
    atol: float
    rtol: float
    training: bool

    def __post_init__(self) -> None:
        self.row_of_a = {ia: k for k, (ia, _) in enumerate(self.pairs)}
        self.partner_of_a = dict(self.pairs)
        self.partner_of_b = {ib: ia for ia, ib in self.pairs}

    @property
    def framework_a(self) -> str:
        return self.trace_a.framework

    @property
    def framework_b(self) -> str:
        return self.trace_b.framework

    @property
    def entries_a(self) -> list[Entry]:
        return self.trace_a.entries

    @property
    def entries_b(self) -> list[Entry]:
        return self.trace_b.entries

    def entries(self, k: int) -> tuple[Entry, Entry]:
        ia, ib = self.pairs[k]
        return self.entries_a[ia], self.entries_b[ib]

    def input_pairs(self, k: int) -> list[int] | None:
        """The rows of the paired layers feeding row ``k`` (looking through unpaired layers in A),
        ``-1`` for the model input; ``None`` when some input has no partner on the way up."""
        found: list[int] = []
        stack = list(self.entries_a[self.pairs[k][0]].producers)
        seen: set[int] = set()
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            if p == INPUT:
                found.append(-1)
            elif p in self.row_of_a:
                found.append(self.row_of_a[p])
            else:
                producers = self.entries_a[p].producers
                if not producers:
                    return None
                stack.extend(producers)
        return sorted(set(found))

    def ancestors_a(self, ia: int) -> set[int]:
        """Every traced layer of A that feeds ``ia``, directly or not."""
        memo = self.__dict__.setdefault("_ancestors", {})
        if ia not in memo:
            found: set[int] = set()
            stack = list(self.entries_a[ia].producers)
            while stack:
                p = stack.pop()
                if p >= 0 and p not in found:
                    found.add(p)
                    stack.extend(self.entries_a[p].producers)
            memo[ia] = found
        return memo[ia]

    def divergence_below(self, report: CompareReport, k: int) -> LayerDiff | None:
        """The first row fed (directly or not) by row ``k`` whose outputs diverge, or None."""
        ia = self.pairs[k][0]
        for j in range(k + 1, len(report.rows)):
            if report.rows[j].diverges and ia in self.ancestors_a(self.pairs[j][0]):
                return report.rows[j]
        return None

    def is_source(self, report: CompareReport, k: int) -> bool:
        """Row ``k`` differs while every paired layer feeding it agrees."""
        inputs = self.input_pairs(k)
        return inputs is not None and not any(i >= 0 and report.rows[i].differs for i in inputs)


def find_causes(report: CompareReport, ctx: Context) -> list[Cause]:
    from bnkit.diagnose.causes import batchnorm, exporter, layout, nonfinite, resize, weights

    found: dict[str, Cause] = {}

    def add(code: str, explanation: str, layer: str, evidence: str = "") -> None:
        cause = found.setdefault(code, Cause(code, explanation, [], evidence))
        if layer not in cause.layers:
            cause.layers.append(layer)

    nonfinite.find(report, ctx, add)
    batchnorm.find(report, ctx, add)
    exporter.find(report, ctx, add)
    layout.find(report, ctx, add)
    resize.find(report, ctx, add)
    explained = {name for cause in found.values() for name in cause.layers}
    weights.find(report, ctx, add, explained)
    if not found:
        first: LayerDiff | None = report.first_divergence
        add(
            "unexplained",
            "the models disagree but none of the known causes applies"
            + (f"; the first divergence is at {first.name}" if first else "; only the final outputs differ"),
            first.name if first else "output",
        )
    order = list(CAUSES)
    return sorted(found.values(), key=lambda c: order.index(c.code))
