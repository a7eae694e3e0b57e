"""The semantic knobs on which PyTorch and Keras batch normalization differ.

A :class:`Convention` names every choice that is not fixed by the shared formula
``y = gamma * (x - mean) / sqrt(var + eps) + beta``:

* the default ``eps``;
* the default ``momentum`` and what it weighs: the *new* batch statistic (PyTorch,
  ``run = (1 - m) * run + m * batch``) or the *old* running value (Keras,
  ``run = m * run + (1 - m) * batch``);
* whether ``momentum=None`` means a cumulative average (PyTorch only);
* the variance estimator folded into the running variance (PyTorch: unbiased,
  ``n / (n - 1)`` times the biased batch variance; Keras: biased);
* the channel axis of the framework's default layout (1 for NCHW, -1 for NHWC).

Both frameworks normalise with the *biased* batch variance in training.

Besides :data:`TORCH` and :data:`KERAS`, more named conventions: :data:`TF_KERAS_FUSED`
(``"tf_keras_fused"``), tf-keras 2's ``BatchNormalization`` where it runs its fused kernel;
:data:`ONNX` (``"onnx"``), the ONNX operator ``BatchNormalization``; :data:`FLAX` (``"flax"``),
Flax's ``linen.BatchNorm`` / ``nnx.BatchNorm``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "Convention",
    "TORCH",
    "KERAS",
    "TF_KERAS_FUSED",
    "ONNX",
    "FLAX",
    "get_convention",
    "translate_momentum",
    "translate_settings",
    "biased_to_unbiased",
    "unbiased_to_biased",
]


@dataclass(frozen=True)
class Convention:
    """One framework's batch-normalization semantics."""

    name: str
    eps: float
    momentum: float
    momentum_weighs: Literal["new", "old"]
    cumulative_average_when_none: bool
    running_var_estimator: Literal["unbiased", "biased"]
    channel_axis: int

    def __post_init__(self) -> None:
        if self.momentum_weighs not in ("new", "old"):
            raise ValueError(f"momentum_weighs must be 'new' or 'old', got {self.momentum_weighs!r}")
        if self.running_var_estimator not in ("unbiased", "biased"):
            raise ValueError(
                f"running_var_estimator must be 'unbiased' or 'biased', got {self.running_var_estimator!r}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if self.momentum is None:
            raise ValueError("a convention's default momentum must be a float in [0, 1], got None")
        self.check_momentum(self.momentum)

    def check_momentum(self, momentum: float | None) -> None:
        """Raise ``ValueError`` unless ``momentum`` is meaningful in this convention."""
        if momentum is None:
            if not self.cumulative_average_when_none:
                raise ValueError(
                    f"momentum=None (a cumulative average) is not part of the {self.name} convention; "
                    f"give a float in [0, 1] (its default is {self.momentum})"
                )
            return
        # numbers.Real also admits NumPy scalars (np.float32 is not a Python float)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__} {momentum!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")

    def weights(self, momentum: float | None, num_batches_tracked: int = 1) -> tuple[float, float]:
        """``(old, new)``: the weights of the running value and of the batch statistic.

        ``num_batches_tracked`` counts the batches so far, this one included; it matters
        only for the cumulative average (``momentum=None``), whose new weight is ``1 / count``.
        Each framework's own expression is kept (``1 - m`` is computed, ``m`` is not), so
        the update rounds as the framework's does. Like the frameworks, no range is enforced
        (a momentum outside [0, 1] extrapolates; ``bnkit lint`` flags it).
        """
        if momentum is None:
            self.check_momentum(None)  # refused where None is not a cumulative average
            new = 1.0 / max(int(num_batches_tracked), 1)
            return 1.0 - new, new
        m = float(momentum)
        return (1.0 - m, m) if self.momentum_weighs == "new" else (m, 1.0 - m)

    def new_weight(self, momentum: float | None, num_batches_tracked: int = 1) -> float:
        """Weight of the new batch statistic in the running-statistics update."""
        return self.weights(momentum, num_batches_tracked)[1]

    @property
    def unbiased_running_var(self) -> bool:
        return self.running_var_estimator == "unbiased"


TORCH = Convention(
    name="torch",
    eps=1e-5,
    momentum=0.1,
    momentum_weighs="new",
    cumulative_average_when_none=True,
    running_var_estimator="unbiased",
    channel_axis=1,
)

KERAS = Convention(
    name="keras",
    eps=1e-3,
    momentum=0.99,
    momentum_weighs="old",
    cumulative_average_when_none=False,
    running_var_estimator="biased",
    channel_axis=-1,
)

TF_KERAS_FUSED = replace(KERAS, name="tf_keras_fused", running_var_estimator="unbiased")  # Keras', but unbiased
"""tf-keras 2's (``tf.keras`` of TensorFlow 2.x) ``BatchNormalization`` where it runs fused.

tf-keras 2 runs its fused kernel (``tf.compat.v1.nn.fused_batch_norm``) when ``fused`` is ``None``
(its default; its configs do not record ``fused``) or ``True``, the input is 4-D or 5-D, the channel
axis is 1 or the last, and there is no ``renorm``, ``virtual_batch_size``, ``adjustment`` or
``synchronized``, in a float16, bfloat16 or float32 compute dtype. In training the kernel normalises
with the batch mean and the *biased* batch variance, as Keras does, but updates the moving statistics
with the *unbiased* one, ``momentum`` weighing the old value (its ``exponential_avg_factor`` is
``1 - momentum``), over ``n`` values per channel::

    moving_mean     = momentum * moving_mean     + (1 - momentum) * mean
    moving_variance = momentum * moving_variance + (1 - momentum) * var * n / (n - 1)

Measured with tf-keras 2.21 (``tests/formats/keras2/make_files.py``). Unfused (``fused=False``, 2-D or
3-D inputs, another axis), tf-keras 2's layer updates with the biased variance, as :data:`KERAS`. The
moving update is PyTorch's with ``momentum_torch = 1 - momentum``, without its cumulative average.
Defaults as tf-keras': ``epsilon=1e-3``, ``momentum=0.99``, channels last.
"""

ONNX = Convention(
    name="onnx",
    eps=1e-5,
    momentum=0.9,
    momentum_weighs="old",
    cumulative_average_when_none=False,
    running_var_estimator="biased",
    channel_axis=1,
)
"""The ONNX operator ``BatchNormalization`` (opset 15; the same formulas since opset 9), on ``(N, C, ...)``.

Training (``training_mode=1``, opset 14 and later), per channel over every axis but 1, with the
*population* (biased) batch variance both to normalise and in the running update::

    y            = scale * (x - mean) / sqrt(var + epsilon) + B
    running_mean = input_mean * momentum + mean * (1 - momentum)
    running_var  = input_var  * momentum + var  * (1 - momentum)

``momentum`` weighs the *old* statistic, as Keras'; defaults ``epsilon=1e-5``, ``momentum=0.9``
(read from the operator specification and ``onnx/reference/ops/op_batch_normalization.py``, checked
against onnxruntime 1.32's CPU kernel in ``tests/test_conventions_onnx_flax.py``). No cumulative
average. A momentum of PyTorch's meaning ``m`` is ONNX's ``1 - m``.
"""

FLAX = Convention(
    name="flax",
    eps=1e-5,
    momentum=0.99,
    momentum_weighs="old",
    cumulative_average_when_none=False,
    running_var_estimator="biased",
    channel_axis=-1,
)
"""Flax's ``linen.BatchNorm`` and ``nnx.BatchNorm`` (flax 0.12, ``flax/linen/normalization.py``).

``momentum=0.99`` weighs the *old* value, ``epsilon=1e-5``, features on the last axis, biased
variance, statistics in at least float32; ``use_running_average=True`` is inference::

    ra_mean = momentum * ra_mean + (1 - momentum) * mean
    ra_var  = momentum * ra_var  + (1 - momentum) * var

Flax's ``use_fast_variance=True`` (its default) computes the batch variance as
``max(E[x^2] - E[x]^2, 0)`` in one pass; ``use_fast_variance=False`` as ``E[(x - E[x])^2]``. The two
agree up to rounding, which for the fast formula grows with ``mean^2 / var`` (catastrophic
cancellation: float32 data with mean 1e4 and std 1e-3 gets a variance of 0 or noise). This
convention describes the *semantics*, not the rounding: bnkit's layers with ``convention="flax"``
compute the variance in two passes, as Flax does with ``use_fast_variance=False``, and never use
the naive formula for their statistics. Only the NumPy reference reproduces Flax's fast variance,
and only when asked: ``bnkit.reference.batch_stats(x, axis, fast_variance=True)``.
"""

_BY_NAME = {
    "torch": TORCH,
    "pytorch": TORCH,
    "keras": KERAS,
    "tf_keras_fused": TF_KERAS_FUSED,
    "onnx": ONNX,
    "flax": FLAX,
}
NAMED = (TORCH, KERAS, TF_KERAS_FUSED, ONNX, FLAX)  # the conventions a name stands for (``get_config`` writes it)


def get_convention(convention: str | Convention) -> Convention:
    """The :class:`Convention` of a name (``"torch"``, ``"keras"``, ``"tf_keras_fused"``, ``"onnx"``, ``"flax"``)."""
    if isinstance(convention, Convention):
        return convention
    if isinstance(convention, str) and convention.lower() in _BY_NAME:
        return _BY_NAME[convention.lower()]
    names = ", ".join(repr(named.name) for named in NAMED)
    raise ValueError(f"convention must be one of {names} or a bnkit.Convention, got {convention!r}")


def translate_momentum(
    momentum: float | None, source: str | Convention, target: str | Convention
) -> float | None:
    """The momentum that gives the same running-statistics weights in ``target``.

    Keras ``momentum=0.99`` is PyTorch ``momentum=0.01`` and back. ``None`` (PyTorch's
    cumulative average) has no equivalent in a convention without it: ``ValueError``. A momentum
    outside [0, 1] translates too (both frameworks accept one; ``bnkit lint`` flags it), and so
    does a 0-d tensor, as ``torch.nn`` takes it.
    """
    src, dst = get_convention(source), get_convention(target)
    if momentum is None:
        src.check_momentum(None)
        if not dst.cumulative_average_when_none:  # said in both conventions' terms: 0.99 alone misleads
            default = translate_momentum(dst.momentum, dst, src)
            raise ValueError(
                f"momentum=None (a cumulative average in the {src.name} convention) has no equivalent in the "
                f"{dst.name} convention, whose momentum weighs the {dst.momentum_weighs} value (its default, "
                f"{dst.momentum:g}, is momentum={default:g} in the {src.name} convention)"
            )
        return None
    if isinstance(momentum, (bool, str, bytes)) or not hasattr(momentum, "__float__"):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__} {momentum!r}")
    momentum = float(momentum)
    if src.momentum_weighs == dst.momentum_weighs:
        return float(momentum)
    # 1 - m is exact only where m is; round-trip the complement through a string-free
    # subtraction so that 0.99 -> 0.01 prints as 0.01 and not 0.010000000000000009.
    return round(1.0 - float(momentum), 15)


def translate_settings(
    source: str | Convention,
    target: str | Convention,
    *,
    eps: float | None = None,
    momentum: float | None | Literal["default"] = "default",
) -> dict:
    """Translate a layer's ``eps`` and ``momentum`` from one convention to another.

    Omitted values take the *source* convention's defaults, so the result is the
    target-convention setting of the layer as the source framework would build it.
    The running-variance estimator cannot be set per layer in either framework; the
    returned ``running_var_factor`` says how the target's running variance relates to
    the source's after one batch of ``n`` values per channel: multiply by
    ``n / (n - 1)`` (biased → unbiased) or ``(n - 1) / n`` (unbiased → biased), or 1.
    """
    src, dst = get_convention(source), get_convention(target)
    if eps is None:
        eps = src.eps
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__} {eps!r}")
    elif not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    eps = float(eps)
    momentum = src.momentum if momentum == "default" else momentum
    factor = "1"
    if src.running_var_estimator != dst.running_var_estimator:
        factor = "n/(n-1)" if dst.unbiased_running_var else "(n-1)/n"
    return {
        "eps": eps,
        "momentum": translate_momentum(momentum, src, dst),
        "running_var_factor": factor,
    }


def biased_to_unbiased(var, n: int):
    """Unbiased variance from the biased one over ``n`` values: ``var * n / (n - 1)``."""
    if n < 2:
        raise ValueError(f"the unbiased variance needs at least 2 values per channel, got n={n}")
    return var * (n / (n - 1))


def unbiased_to_biased(var, n: int):
    """Biased variance from the unbiased one over ``n`` values: ``var * (n - 1) / n``."""
    if n < 1:
        raise ValueError(f"n must be positive, got n={n}")
    return var * ((n - 1) / n)


def with_overrides(convention: Convention, **changes) -> Convention:
    """A copy of ``convention`` with some knobs changed (a custom convention)."""
    return replace(convention, **changes)
