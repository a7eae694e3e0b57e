r"""Fold batch normalization into the preceding layer for inference.

In inference a batch norm is a per-channel affine map of its input ``z``:

.. math::

    y = \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta = z \cdot s + t,\qquad
    s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}},\quad t = \beta - \mu s

with the running (moving) statistics ``mu``, ``sigma^2``. When ``z = W x + b`` is the output of a
convolution, transposed convolution or dense layer and nothing else reads ``z``, the batch norm
disappears into that layer: ``W' = s W`` (per output channel) and ``b' = s b + t``. Every other
batch norm becomes a :class:`~bnkit.torch.ChannelAffine` (PyTorch) or a ``bnkit>ChannelAffine``
layer (Keras). ``s`` and ``t`` are computed in float64 and rounded once to the layer's dtype.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import NamedTuple

from bnkit.frameworks import accepts_tf_keras, framework_of

if "keras" in sys.modules:  # so that Keras files holding bnkit>ChannelAffine load (bnkit.io imports us)
    import bnkit.lifecycle.keras_layers  # noqa: F401

__all__ = ["fold_bn", "FoldDecision", "FoldResult"]


@dataclass(frozen=True)
class FoldDecision:
    """What became of one batch norm.

    ``outcome`` is ``"folded"`` (into the layers named in ``into``, its place taken by an
    identity), ``"affine"`` (replaced by a per-channel ``ChannelAffine``) or ``"kept"`` (left as
    it is); ``reason`` says why it was not folded (empty when it was).
    """

    name: str
    type: str
    outcome: str
    into: tuple[str, ...] = ()
    reason: str = ""

    @property
    def folded(self) -> bool:
        return self.outcome == "folded"

    def to_dict(self) -> dict:
        return {**asdict(self), "into": list(self.into)}


class FoldResult(NamedTuple):
    """``fold_bn(model, report=True)``: the folded model and one :class:`FoldDecision` per batch norm."""

    model: object
    decisions: list[FoldDecision]


@accepts_tf_keras("model")
def fold_bn(model, *, example_inputs=None, report: bool = False):
    """A new inference model with every batch norm folded away; ``model`` is left untouched.

    With ``report=True`` the result is a :class:`FoldResult` ``(model, decisions)``: for every
    batch norm, whether it was folded and into what, or why not (``"its input is the output of
    ReLU '1', not of a Conv/ConvTranspose/Linear"``, ``"the output of Conv2d 'conv' is also used
    by ..."``, ``"Conv2D 'conv' applies activation='relu' before the batch norm"``...).

    PyTorch: ``model`` is deep-copied, put in ``eval()`` and traced with ``torch.fx``; a batch
    norm (``torch.nn`` or bnkit, either convention) whose input is, at every call, the only use
    of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` output is folded into that
    layer (a bias is created where it had none) and replaced by ``nn.Identity``; the others
    become ``ChannelAffine`` modules (also when ``forward`` reads the layer's weight directly,
    the layer has a parametrization such as ``weight_norm`` or a forward hook, or it is a
    ``Linear`` before a ``BatchNorm2d/3d``). A batch norm whose tensors
    ``forward`` reads directly (``F.batch_norm(x, self.bn.running_mean, ...)``) is left as it
    is, with a warning. The result is the deep copy, of the model's own class
    with its own ``forward``: the graph only decides what folds. If the model cannot be traced,
    a warning says so and only batch norms that directly follow such a layer inside an
    ``nn.Sequential`` are folded.

    ``example_inputs`` (a tuple of tensors, PyTorch only) lets the shapes be checked: a
    ``Linear`` is then folded only when its output is 2-D ``(N, C)``. Without it a
    ``BatchNorm1d`` after a ``Linear`` with as many outputs as the batch norm has channels is
    taken to normalise those outputs, which is what ``nn.Linear`` + ``nn.BatchNorm1d`` on
    ``(N, C)`` batches do; the batch norm's place then holds a ``FoldedIntoLinear`` identity that
    raises ``ValueError`` on any other rank instead of returning wrong values.

    Keras: a new functional model (``keras.models.clone_model``) in which each
    ``BatchNormalization`` whose input is the only use of a ``Conv1D/2D/3D``,
    ``Conv1D/2D/3DTranspose`` or ``Dense`` output with a linear activation, normalising that
    layer's channel axis, is folded into its kernel and bias and replaced by an ``Identity``
    layer (in functional and ``Sequential`` models alike); the others become ``ChannelAffine``
    layers. A live tf-keras 2 model is folded as the Keras 3 model bnkit reads it as
    (:mod:`bnkit.keras.from_tf_keras`): the result is a Keras 3 model.

    ONNX (an ``onnx.ModelProto``, as ``bnkit.io.load_model("m.onnx")`` reads it): a copy in which
    each inference ``BatchNormalization`` whose input is the only use of a ``Conv``, ``ConvTranspose``
    or ``Gemm`` output is folded into that node's weights (float64, cast back); the others are left
    as they are, with the reason. The copy is run against the original by onnxruntime on a random
    input before it is returned (:mod:`bnkit.lifecycle._fold_onnx`).

    A batch norm without running statistics (``track_running_stats=False``) normalises with
    batch statistics even in inference, so it cannot be folded: ``ValueError`` naming it.
    """
    framework = framework_of(model, "fold_bn")
    if framework == "onnx":  # an onnx.ModelProto: bnkit.lifecycle._fold_onnx, checked with onnxruntime
        if example_inputs is not None:
            raise ValueError("example_inputs is for PyTorch models; an ONNX model's inputs are in its graph")
        from bnkit.lifecycle._fold_onnx import fold_onnx

        folded, decisions, _ = fold_onnx(model)
        return FoldResult(folded, decisions) if report else folded
    if framework == "keras":
        if example_inputs is not None:
            raise ValueError("example_inputs is for PyTorch models; Keras models know their shapes")
        from bnkit.lifecycle._fold_keras import fold_keras

        folded, decisions = fold_keras(model)
    else:
        from bnkit.lifecycle._fold_torch import fold_torch

        folded, decisions = fold_torch(model, example_inputs=example_inputs)
    return FoldResult(folded, decisions) if report else folded
