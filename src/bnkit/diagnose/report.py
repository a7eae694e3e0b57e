"""The data of a comparison: per-layer rows, batch-norm states, causes and the report that holds them.

Rendering lives elsewhere (:mod:`bnkit.diagnose.render` for the terminal, :mod:`bnkit.diagnose.report_html`
for the HTML page); this module only holds data and its JSON form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CAUSES", "BatchNormState", "LayerDiff", "Cause", "BatchNormPair", "CompareReport", "json_float"]

#: Stable cause codes, in the order they are reported, with a one-line meaning.
CAUSES: dict[str, str] = {
    "non-finite": "a layer produced NaN or Inf (or the input holds them): values that cannot be compared",
    "training-mode": "a batch norm runs in training mode (batch statistics) on one side only",
    "keras-frozen-inference": "a Keras BatchNormalization with trainable=False runs in inference mode "
    "even when called with training=True",
    "missing-running-stats": "a PyTorch batch norm with track_running_stats=False uses batch statistics in eval() too",
    "eps": "the two sides add a different eps to the variance",
    "momentum-convention": "the running statistics are updated with different weights (PyTorch's momentum "
    "weighs the new batch, Keras' weighs the old value)",
    "running-variance-estimator": "one side folds the unbiased batch variance into the running variance, "
    "the other the biased one",
    "renorm": "batch renormalization differs: one side corrects its training output by r and d (renorm=True) "
    "and the other does not, or their renorm_clipping or renorm_momentum differ",
    "layout": "a Dense/Linear after Flatten expects the other framework's flatten order "
    "(H·W·C vs C·H·W): its weights were not permuted; or a convolution kernel ported NHWC/NCHW "
    "with its spatial axes swapped; or the reshapes/permutations between two layers (a channel shuffle) differ",
    "resize": "a resize/upsampling layer interpolates differently on the two sides (mode, align_corners, "
    "antialias; Keras resizes with half-pixel centres and its 'nearest' is PyTorch's 'nearest-exact')",
    "exporter-fold": "an exporter folded a batch norm into the convolution before it (ONNX) with other statistics "
    "than the source model's batch norm holds now, or the source's batch norm uses batch statistics",
    "weights": "a layer gives different outputs from matching inputs: its parameters differ",
    "unexplained": "the models disagree for a reason bnkit could not identify",
}


def json_float(x: float | None):
    """A float for JSON: ``None`` stays, NaN and infinities become strings."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


@dataclass
class BatchNormState:
    """What one side's batch norm did in the run, in framework-neutral terms."""

    framework: str
    eps: float
    momentum: float | None
    momentum_weighs: str  # "new" or "old": what ``momentum`` is the weight of
    new_weight: float | None  # weight of the batch statistic in the running update; None: cumulative
    running_var_estimator: str  # "unbiased" or "biased"
    tracks_running_stats: bool
    uses_batch_stats: bool  # observed in this run
    in_training_mode: bool  # torch: module.training; keras: called with training=True
    trainable: bool
    running_mean_before: np.ndarray | None = None
    running_var_before: np.ndarray | None = None
    running_mean_after: np.ndarray | None = None
    running_var_after: np.ndarray | None = None
    renorm: bool = False  # batch renormalization (Keras renorm=True, bnkit's renorm layers)
    renorm_clipping: dict = field(default_factory=dict)
    renorm_new_weight: float | None = None  # weight of the batch statistic in the renorm update; None: cumulative
    renorm_after: tuple[np.ndarray, np.ndarray] | None = None  # renorm mean and stddev after a training step

    def to_dict(self) -> dict:
        return {
            "framework": self.framework,
            "eps": self.eps,
            "momentum": self.momentum,
            "momentum_weighs": self.momentum_weighs,
            "new_weight": self.new_weight,
            "running_var_estimator": self.running_var_estimator,
            "tracks_running_stats": self.tracks_running_stats,
            "uses_batch_stats": self.uses_batch_stats,
            "in_training_mode": self.in_training_mode,
            "trainable": self.trainable,
            "renorm": self.renorm,
            "renorm_clipping": dict(self.renorm_clipping) if self.renorm else None,
            "renorm_new_weight": self.renorm_new_weight if self.renorm else None,
        }


@dataclass
class LayerDiff:
    """One pair of corresponding layers, how far apart their outputs are and what was allowed.

    A pair diverges where ``|a - b| > atol + rtol * max(|a|, |b|)`` for some element, ``atol``
    being this layer's own: the comparison's ``atol`` plus ``rounding``, the float rounding that
    its computation and the layers before it may have accumulated (see
    :mod:`bnkit.diagnose.tolerance`). ``tolerance_ratio`` is the largest ``|a - b|`` over the
    allowed difference at that element: the figure the verdict is made from (over 1: diverges).
    """

    index: int
    name_a: str
    name_b: str
    type_a: str
    type_b: str
    kind: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    diverges: bool  # the outputs differ beyond tolerance
    running_mean_abs_diff: float | None = None  # after a training step (training=True), BN only
    running_var_abs_diff: float | None = None
    running_stats_diverge: bool = False
    atol: float = 0.0  # the absolute tolerance this layer was held to (rounding included)
    rtol: float = 0.0
    rounding: float = 0.0  # the part of atol allowed for float rounding
    reduction_length: int = 1  # terms each output value of this layer sums
    tolerance_ratio: float = 0.0
    nonfinite: bool = False  # NaN or Inf in either side's output
    note: str = ""  # "folded by the exporter": one side's conv+BN pair is the other's one convolution

    @property
    def differs(self) -> bool:
        """The outputs or (after a training step) the running statistics differ, or are not finite."""
        return self.diverges or self.running_stats_diverge or self.nonfinite

    @property
    def name(self) -> str:
        return self.name_a if self.name_a == self.name_b else f"{self.name_a} / {self.name_b}"

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name_a": self.name_a,
            "name_b": self.name_b,
            "type_a": self.type_a,
            "type_b": self.type_b,
            "kind": self.kind,
            "shape": list(self.shape),
            "max_abs_diff": json_float(self.max_abs_diff),
            "max_rel_diff": json_float(self.max_rel_diff),
            "diverges": self.diverges,
            "tolerance": {
                "atol": json_float(self.atol),
                "rtol": json_float(self.rtol),
                "rounding": json_float(self.rounding),
                "reduction_length": int(self.reduction_length),
            },
            "tolerance_ratio": json_float(self.tolerance_ratio),
            "nonfinite": self.nonfinite,
            "running_mean_abs_diff": json_float(self.running_mean_abs_diff),
            "running_var_abs_diff": json_float(self.running_var_abs_diff),
            "running_stats_diverge": self.running_stats_diverge,
            "note": self.note,
        }


@dataclass(eq=False)
class Cause:
    """One reason for the disagreement: a stable ``code``, an explanation and the layers.

    A cause equals (and hashes as) its code, so ``"eps" in report.causes`` and
    ``set(report.causes) == {"eps"}`` read as the list of codes they stand for.
    """

    code: str
    explanation: str
    layers: list[str] = field(default_factory=list)
    evidence: str = ""

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.code == other
        if isinstance(other, Cause):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.code)

    def __lt__(self, other) -> bool:
        return self.code < (other.code if isinstance(other, Cause) else other)

    def __str__(self) -> str:
        return self.code

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "explanation": self.explanation,
            "layers": list(self.layers),
            "evidence": self.evidence,
        }


@dataclass
class BatchNormPair:
    """A paired batch norm's settings and behaviour on both sides."""

    row: LayerDiff
    a: BatchNormState
    b: BatchNormState


@dataclass
class CompareReport:
    """The result of :func:`bnkit.compare`: rows first, causes, then renderings."""

    framework_a: str
    framework_b: str
    name_a: str
    name_b: str
    input_shape: tuple[int, ...]
    training: bool
    atol: float
    rtol: float
    rows: list[LayerDiff]
    output_max_abs_diff: float
    output_max_rel_diff: float
    output_diverges: bool
    causes: list[Cause]
    unmatched_a: list[str]
    unmatched_b: list[str]
    batch_norms: list[BatchNormPair] = field(default_factory=list, repr=False)
    output_atol: float | None = None  # the absolute tolerance the final outputs were held to
    output_nonfinite: bool = False
    output_max_abs: float | None = None  # the largest finite |value| of model A's output

    @property
    def below_atol(self) -> bool:
        """Model A's outputs are all smaller than ``atol``: any difference that small passes (``atol``
        is absolute), so an agreement says little; a smaller ``atol`` compares such a network."""
        return self.output_max_abs is not None and self.output_max_abs < self.atol

    @property
    def atol_note(self) -> str | None:
        """What :attr:`below_atol` means for the reader, or None."""
        if not self.below_atol:
            return None
        return (
            f"model A's outputs are at most {self.output_max_abs:.3g}, below atol {self.atol:g}: differences "
            "that small pass unseen. Compare again with an atol well below the values (the measured "
            "rounding is still added)."
        )
    rounding_measured: bool = True  # False: every layer was within atol alone, rounding not measured
    keras_backend: str | None = None  # the Keras backend that ran the Keras model(s), None if neither is Keras

    @property
    def agree(self) -> bool:
        """True when every paired layer, the outputs and (training) the running statistics agree
        and every value is finite."""
        return not self.output_diverges and not self.output_nonfinite and not any(r.differs for r in self.rows)

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first paired layer (in model A's order) over tolerance (outputs or running statistics)."""
        return next((r for r in self.rows if r.differs), None)

    @property
    def cause_codes(self) -> list[str]:
        return [c.code for c in self.causes]

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {
            "agree": self.agree,
            "model_a": {"name": self.name_a, "framework": self.framework_a},
            "model_b": {"name": self.name_b, "framework": self.framework_b},
            "keras_backend": self.keras_backend,
            "input_shape": list(self.input_shape),
            "training": self.training,
            "tolerance": {"atol": self.atol, "rtol": self.rtol, "rounding_measured": self.rounding_measured},
            "output": {
                "max_abs_diff": json_float(self.output_max_abs_diff),
                "max_rel_diff": json_float(self.output_max_rel_diff),
                "diverges": self.output_diverges,
                "atol": json_float(self.output_atol if self.output_atol is not None else self.atol),
                "nonfinite": self.output_nonfinite,
                "max_abs": json_float(self.output_max_abs),
                "below_atol": self.below_atol,
            },
            "first_divergence": first.to_dict() if first else None,
            "causes": [c.to_dict() for c in self.causes],
            "layers": [r.to_dict() for r in self.rows],
            "batch_norms": [
                {"name_a": p.row.name_a, "name_b": p.row.name_b, "a": p.a.to_dict(), "b": p.b.to_dict()}
                for p in self.batch_norms
            ],
            "unmatched_a": list(self.unmatched_a),
            "unmatched_b": list(self.unmatched_b),
        }

    def to_html(self, path, *, force: bool = False) -> str:
        """Write a self-contained HTML page (inline SVG chart, no external assets); return the path.

        Refuses to replace an existing file unless ``force=True``; writes atomically.
        """
        from bnkit.diagnose.report_html import write_html

        return write_html(self, path, force=force)

    def render(self, console=None, *, all_rows: bool = False) -> None:
        """Print the report with ``rich``: the per-layer table, the outputs, the causes.

        A network with many layers shows the rows around each divergence (or, when the models
        agree, the rows closest to their tolerance); ``all_rows=True`` shows every row.
        """
        from bnkit.diagnose.render import render_rich

        render_rich(self, console, all_rows=all_rows)

    def __str__(self) -> str:
        verdict = "agree" if self.agree else "DISAGREE"
        lines = [
            f"compare {self.name_a} ({self.framework_a}) vs {self.name_b} ({self.framework_b}): {verdict}",
            f"  output max abs diff {self.output_max_abs_diff:.3g}, max rel diff {self.output_max_rel_diff:.3g}",
        ]
        first = self.first_divergence
        if first is not None:
            lines.append(f"  first divergence: {first.name} ({first.type_a} / {first.type_b})")
        for c in self.causes:
            lines.append(f"  [{c.code}] {c.explanation}")
        return "\n".join(lines)
