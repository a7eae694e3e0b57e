"""Batch normalization pitfalls in one model, found without running it (unless given a shape).

:func:`lint` returns :class:`Finding` records with stable codes:

``bn-training-mode`` (error for inference, warning otherwise)
    A PyTorch BN in ``train()`` mode inside a model in ``eval()`` mode, or, with
    ``for_inference=True``, a model still in ``train()`` mode: the BN normalises with each
    batch's statistics and overwrites its running statistics on every call.
``bn-no-running-stats`` (warning for inference, info otherwise)
    ``track_running_stats=False``: batch statistics even in ``eval()``.
``conv-bias-before-bn`` (warning)
    A convolution or linear layer with a bias feeding a BN directly. The BN subtracts the
    per-channel mean, so ``BN(Wx + b) = BN(Wx)`` in training: the bias is cancelled and its
    gradient is zero.
``batch-of-one`` (error when a channel gets one value, warning otherwise)
    ``batch_size=1`` with a BN that uses batch statistics: in training (``model.train()``
    or ``fit()``) every BN but one deliberately kept in ``eval()``; with
    ``for_inference=True``, a PyTorch BN in ``train()`` mode or without running
    statistics. With one value per channel
    PyTorch raises and Keras outputs ``beta`` for every input; with one sample the
    statistics are that sample's own (noisy running statistics).
``frozen-bn-still-updating`` (warning)
    A PyTorch BN whose ``weight`` and ``bias`` have ``requires_grad=False`` but which is in
    ``train()`` mode: its running statistics keep updating. Keras' ``trainable=False`` would
    also have switched it to inference; in PyTorch call ``.eval()`` on the BN.
``keras-frozen-inference`` (info)
    A Keras BN with ``trainable=False``: fine, but it runs in inference mode even inside
    ``fit()`` (``training and self.trainable``), with its moving statistics, never updating them.
``momentum-literal-port`` (warning)
    A momentum that gives the *new* batch half or more of the weight (PyTorch ``momentum >=
    0.5``, Keras ``momentum <= 0.5``): most likely the other framework's value copied
    literally. PyTorch's ``m`` is Keras' ``1 - m`` (:func:`bnkit.translate_momentum`).
    Not for bnkit's layers that declare the other framework's convention (what
    ``bnkit.convert`` produces to keep the source's semantics): their number is meant that way.
``eps-not-positive`` (error)
    ``eps <= 0`` (or not a number): PyTorch refuses a training forward pass ("eps must be
    positive during training") and, in ``eval()``, divides by zero for a channel whose running
    variance is 0; Keras gives NaN for a channel with zero batch variance (a constant or dead
    channel). Both frameworks build such a layer without complaint.
``momentum-out-of-range`` (error)
    A momentum outside [0, 1]: one of the two update weights is negative, so the running
    statistics extrapolate instead of averaging (and diverge once a weight's magnitude passes 1).
    Both frameworks accept it.
``eps-mismatch`` (info)
    BN layers of one model with different ``eps``: often a half-finished port (PyTorch's
    default is 1e-5, Keras' 1e-3).
``renorm-momentum`` (warning; error outside [0, 1])
    Batch renormalization whose ``renorm_momentum`` gives the new batch half or more of the
    weight (Keras ``renorm_momentum <= 0.5``, bnkit's torch convention ``>= 0.5``): the renorm
    statistics follow the last batch, so ``r`` stays near 1 and ``d`` near 0 and renorm does
    nothing (most likely the other framework's value copied literally); outside [0, 1] they
    extrapolate.
``renorm-unclipped`` (info)
    ``renorm=True`` without ``rmax``/``dmax`` in ``renorm_clipping`` (Keras' default): ``r`` and
    ``d`` are unbounded, so early in training, while the renorm statistics are still their initial
    0 and 1, the layer barely normalises. Ioffe (2017) starts at ``rmax=1, dmax=0`` and relaxes
    them to 3 and 5 (assign ``layer.renorm_clipping`` between steps, in either framework).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bnkit.conventions import get_convention
from bnkit.frameworks import accepts_tf_keras

__all__ = ["Finding", "lint", "SEVERITIES"]

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One pitfall: a stable ``code``, the ``layer`` it is about, a ``message`` saying what
    happens and how to fix it, and a ``severity`` ("error", "warning" or "info")."""

    code: str
    layer: str
    message: str
    severity: str

    def to_dict(self) -> dict:
        return asdict(self)


@accepts_tf_keras("model")
def lint(model, *, for_inference: bool = False, batch_size: int | None = None, input_shape=None):
    """Batch normalization pitfalls in a ``torch.nn.Module`` or a ``keras.Model`` (or an ``onnx.ModelProto``:
    :mod:`bnkit.diagnose.lint_onnx`, whose codes are listed there).

    ``for_inference=True`` says the model is about to be used for inference, so any BN
    still in training mode is an error. ``batch_size`` is the training batch size (the
    serving one with ``for_inference=True``); with ``input_shape`` (PyTorch only: without the
    batch dimension, in the model's layout) ``batch-of-one`` can tell how many values each
    channel's statistics are computed from. Returns a list of :class:`Finding`, errors first.
    A live tf-keras 2 model is linted as the Keras 3 model bnkit reads it as (layer names with
    ``/`` then have ``_``: :mod:`bnkit.keras.from_tf_keras`).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    from bnkit.frameworks import is_onnx_model
    from bnkit.summarize import is_keras_model

    if is_keras_model(model):
        from bnkit.diagnose.lint_keras import lint_keras

        findings = lint_keras(model, for_inference, batch_size, input_shape)
    elif is_onnx_model(model):  # an onnx.ModelProto: its own codes and messages (lint_onnx.py)
        from bnkit.diagnose.lint_onnx import lint_onnx

        return lint_onnx(model, for_inference=for_inference, batch_size=batch_size, input_shape=input_shape)
    else:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"lint() takes a torch.nn.Module or a keras.Model (or an onnx.ModelProto), got {type(model).__name__}"
            )
        from bnkit.diagnose.lint_torch import lint_torch

        findings = lint_torch(model, for_inference, batch_size, input_shape)
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


# --------------------------------------------------------------------------- shared messages


def _bias_finding(producer_name, producer_type, bn_name, bn_description, bias_size, fix) -> Finding:
    return Finding(
        "conv-bias-before-bn",
        producer_name,
        f"{producer_type} {producer_name!r} has a bias and feeds {bn_description} {bn_name!r} directly: "
        f"the batch norm subtracts the per-channel mean, which cancels the bias ({bias_size:,} params "
        f"that get zero gradient). Build it with {fix}.",
        "warning",
    )


def _batch_of_one(name, description, values_per_channel, *, keras: bool) -> Finding:
    if values_per_channel == 1:
        consequence = (
            "Keras does not complain: the batch variance is 0 and the layer outputs beta for every input"
            if keras
            else "PyTorch raises 'Expected more than 1 value per channel when training'"
        )
        return Finding(
            "batch-of-one",
            name,
            f"{description} gets one value per channel at batch size 1 in training: {consequence}. "
            "Use a batch of 2 or more, or put the layer in inference mode.",
            "error",
        )
    known = "" if values_per_channel is None else f" ({values_per_channel:,} values per channel)"
    return Finding(
        "batch-of-one",
        name,
        f"{description} normalises each channel over a single sample at batch size 1{known}: the "
        "statistics are that sample's own (instance normalization in effect) and the running "
        "statistics get noisy. Use a larger batch, freeze the layer, or use GroupNorm."
        + ("" if values_per_channel is not None or keras else " Pass input_shape to check for one value per channel."),
        "warning",
    )


_FRAMEWORK = {"torch": "PyTorch", "keras": "Keras"}


def _momentum_finding(name, description, momentum, new_weight, weighs_new) -> Finding:
    if weighs_new:
        meaning = f"in PyTorch's convention momentum={momentum:g} gives each new batch {new_weight:.0%}"
        source, target = "keras", "torch"
    else:
        meaning = f"in Keras' convention momentum={momentum:g} gives each new batch {new_weight:.0%}"
        source, target = "torch", "keras"
    return Finding(
        "momentum-literal-port",
        name,
        f"{description}: {meaning} of the weight, so the running statistics follow the last few "
        f"batches. Is it a {_FRAMEWORK[source]} momentum copied literally? The {_FRAMEWORK[target]} "
        f"equivalent is {1 - momentum:g} (bnkit.translate_momentum({momentum:g}, {source!r}, {target!r})).",
        "warning",
    )


def _eps_mismatch(named_eps) -> list[Finding]:
    by_eps: dict[float, list[str]] = {}
    for name, eps in named_eps:
        by_eps.setdefault(float(eps), []).append(name)
    if len(by_eps) < 2:
        return []
    groups = "; ".join(
        f"eps={eps:g}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for eps, names in by_eps.items()
    )
    return [
        Finding(
            "eps-mismatch",
            "(model)",
            f"batch norm layers use different eps ({groups}). A half-finished port? PyTorch's default "
            "is 1e-5, Keras' 1e-3; bnkit.translate_settings carries them over.",
            "info",
        )
    ]


# --------------------------------------------------------------------------- settings both frameworks accept


def _number(value) -> float | None:
    """``value`` as a float (a 0-d tensor, a NumPy scalar, a numeric string), or None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _in_unit_interval(momentum) -> bool:
    m = _number(momentum)
    return m is not None and 0.0 <= m <= 1.0


def _settings_findings(layers, *, keras: bool) -> list[Finding]:
    """``eps-not-positive`` and ``momentum-out-of-range`` for ``(name, description, eps, momentum)``."""
    findings = []
    for name, description, eps, momentum in layers:
        value = _number(eps)
        if value is None or not value > 0:
            shown = f"{eps!r}" if value is None else f"{value:g}"
            consequence = (
                "a channel whose batch variance is 0 (a constant or dead channel) normalises to NaN"
                if keras
                else "PyTorch refuses every training forward pass (eps must be positive during training), "
                "and in eval() a channel whose running variance is 0 divides by zero"
            )
            default = "1e-3 (Keras' default)" if keras else "1e-5 (PyTorch's default)"
            findings.append(
                Finding(
                    "eps-not-positive",
                    name,
                    f"{description} has eps={shown}, which the framework accepts when building the layer: "
                    f"{consequence}. Use a small positive eps such as {default}.",
                    "error",
                )
            )
        if momentum is None:
            continue
        m = _number(momentum)
        if m is None or not 0.0 <= m <= 1.0:
            shown = f"{momentum!r}" if m is None else f"{m:g}"
            findings.append(
                Finding(
                    "momentum-out-of-range",
                    name,
                    f"{description} has momentum={shown}, outside [0, 1]: one of the running-statistics "
                    "update weights (momentum and 1 - momentum) is negative, so the running mean and "
                    "variance extrapolate instead of averaging (a negative variance is possible) and diverge "
                    "once a weight's magnitude passes 1. Both frameworks accept it without complaint.",
                    "error",
                )
            )
    return findings


# --------------------------------------------------------------------------- batch renormalization


def _renorm_findings(layers) -> list[Finding]:
    """``renorm-momentum`` and ``renorm-unclipped`` for ``(name, description, layer)`` of either framework."""
    findings = []
    for name, description, bn in layers:
        if getattr(bn, "renorm", False) is not True:
            continue
        convention = getattr(bn, "convention", None)
        weighs_new = convention is not None and get_convention(convention).momentum_weighs == "new"
        momentum = bn.renorm_momentum
        m = _number(momentum) if momentum is not None else None
        if momentum is not None and (m is None or not 0.0 <= m <= 1.0):
            shown = f"{momentum!r}" if m is None else f"{m:g}"
            findings.append(
                Finding(
                    "renorm-momentum",
                    name,
                    f"{description} has renorm_momentum={shown}, outside [0, 1]: one of the renorm statistics' "
                    "update weights is negative, so the statistics r and d are taken from extrapolate.",
                    "error",
                )
            )
        elif m is not None and (m if weighs_new else 1 - m) >= 0.5:
            new_weight = m if weighs_new else 1 - m
            reading = "PyTorch's" if weighs_new else "Keras'"
            findings.append(
                Finding(
                    "renorm-momentum",
                    name,
                    f"{description}: in {reading} convention renorm_momentum={m:g} gives each new batch "
                    f"{new_weight:.0%} of the weight, so the renorm statistics follow the last batch, r stays "
                    f"near 1 and d near 0, and batch renormalization does little. Is it the other framework's "
                    f"value copied literally? The equivalent is {1 - m:g}.",
                    "warning",
                )
            )
        clipping = bn.renorm_clipping or {}
        if clipping.get("rmax") is None or clipping.get("dmax") is None:
            findings.append(
                Finding(
                    "renorm-unclipped",
                    name,
                    f"{description} has renorm=True with renorm_clipping={dict(clipping)!r}: r and d are "
                    "unbounded (no rmax or dmax), so the training output is (x - renorm_mean) / renorm_stddev, "
                    "and early in training, with the renorm statistics still near their initial 0 and 1, the "
                    "input is hardly normalised. Ioffe (2017) starts at rmax=1, dmax=0 and relaxes them to 3 "
                    "and 5; assign layer.renorm_clipping between steps.",
                    "info",
                )
            )
    return findings
