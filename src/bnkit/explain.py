"""What one batch-norm layer means in PyTorch and in Keras, as data.

:func:`explain` takes a layer as written in one framework (Keras ``BatchNormalization`` or
``torch.nn.BatchNorm2d``) and returns an :class:`Explanation`: plain dataclasses that the
``bnkit explain`` command renders and ``--json`` prints.

ONNX's ``BatchNormalization`` and Flax's ``BatchNorm`` are explained against PyTorch the same way.

* ``settings``: the layer as given, its equivalent in the other framework (translated with
  :mod:`bnkit.conventions`), and a *literal* copy of its numbers into the other framework (the
  seed bug: Keras ``momentum=0.15`` copied into ``nn.BatchNorm2d(momentum=0.15)``).
* ``counts``: the parameter count each framework reports for the layer, and why they differ.
* ``differences``: one training step then one inference step of the three layers on the same
  random batch, and the largest differences of outputs and running statistics, each with its
  reason. The layers really run (all as :class:`bnkit.torch.BatchNorm2d`, whose Keras convention
  reproduces Keras 3), so Keras need not be installed.

With ``renorm=True`` (Keras' batch renormalization, ``source="keras"`` only: ``torch.nn`` has none)
the equivalent is bnkit's PyTorch renorm layer and the literal copy a ``torch.nn.BatchNorm2d``
without it; the counts include the three renorm statistics.

The random batch has per-channel means and spreads, as activations have, so that eps, momentum
and the variance estimator all show: ``x[:, c] ~ N(mu_c, sigma_c^2)`` with ``mu_c`` uniform in
``[-2, 2]`` and ``log sigma_c`` uniform in ``[log 0.1, log 3]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from bnkit.conventions import KERAS, TORCH, get_convention, translate_momentum

__all__ = ["LayerSettings", "ParamCount", "Difference", "Explanation", "explain", "random_batch"]

Framework = Literal["keras", "torch", "onnx", "flax"]
_NAMES = {"keras": "Keras", "torch": "PyTorch", "onnx": "ONNX", "flax": "Flax"}

BATCH_DESCRIPTION = (
    "x[:, c] ~ N(mu_c, sigma_c^2), mu_c uniform in [-2, 2], log sigma_c uniform in [log 0.1, log 3]"
)


@dataclass(frozen=True)
class LayerSettings:
    """One layer in one framework's terms.

    ``momentum`` is in ``framework``'s meaning; ``new_weight`` / ``old_weight`` are what it means:
    the weights of the batch statistic and of the running value in the running update.
    """

    role: Literal["given", "equivalent", "literal copy"]
    framework: Framework
    code: str  # how the layer is written in its framework
    bnkit_code: str  # the bnkit.torch layer with these semantics
    eps: float
    momentum: float
    new_weight: float
    old_weight: float
    scale: bool  # learnable gamma (Keras scale=, PyTorch affine= / weight)
    center: bool  # learnable beta (Keras center=, PyTorch affine= / bias)
    track_running_stats: bool
    running_var_estimator: Literal["unbiased", "biased"]
    layout: str
    same_as_given: bool  # does it compute what the given layer computes?
    renorm: bool = False  # batch renormalization (Keras renorm=True; in PyTorch only bnkit's layers)


@dataclass(frozen=True)
class ParamCount:
    """The parameter count a framework reports for the layer, and what it leaves out."""

    framework: Framework
    reported_by: str
    total: int
    trainable: int
    non_trainable: int
    not_counted: int  # state that exists but is not reported as parameters (PyTorch buffers)
    weights: list[tuple[str, int, str]]  # (name, size, kind): "trainable", "non-trainable", "buffer", ...
    why: str


@dataclass(frozen=True)
class Difference:
    """Largest difference of one quantity between the given layer and another one."""

    quantity: Literal["training output", "running mean", "running variance", "inference output"]
    against: Literal["equivalent", "literal copy"]
    max_abs: float
    relative: float  # max_abs / the largest |value| of either layer
    why: str


@dataclass(frozen=True)
class Explanation:
    source: Framework
    channels: int
    input_shape: tuple[int, ...]  # NCHW, as the layers ran
    values_per_channel: int  # n = N * H * W
    seed: int
    batch: str
    settings: list[LayerSettings]
    counts: list[ParamCount]
    differences: list[Difference]
    notes: list[str] = field(default_factory=list)

    @property
    def given(self) -> LayerSettings:
        return self.settings[0]

    def setting(self, role: str) -> LayerSettings:
        return next(s for s in self.settings if s.role == role)

    def difference(self, quantity: str, against: str) -> Difference:
        return next(d for d in self.differences if d.quantity == quantity and d.against == against)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- settings


def _fmt(value: float) -> str:
    """A float as a user would type it: 0.85, 0.001, 1e-05."""
    return repr(float(value))


def _keras_code(channels: int, eps: float | None, momentum: float, center: bool, scale: bool,
                renorm: bool = False) -> str:
    args = ["axis=-1", f"momentum={_fmt(momentum)}"]
    if eps is not None:
        args.append(f"epsilon={_fmt(eps)}")
    if not center:
        args.append("center=False")
    if not scale:
        args.append("scale=False")
    if renorm:
        args.append("renorm=True")
    return f"keras.layers.BatchNormalization({', '.join(args)})"


def _torch_code(
    channels: int, eps: float | None, momentum: float, center: bool, scale: bool, track: bool
) -> str:
    args = [str(channels)]
    if eps is not None:
        args.append(f"eps={_fmt(eps)}")
    args.append(f"momentum={_fmt(momentum)}")
    affine = center or scale
    if not affine:
        args.append("affine=False")
    elif not center:
        args.append("bias=False")
    if not track:
        args.append("track_running_stats=False")
    code = f"torch.nn.BatchNorm2d({', '.join(args)})"
    if affine and not scale:  # PyTorch cannot drop gamma alone: keep it at 1, frozen
        code += "; bn.weight.requires_grad_(False)"
    return code


def _onnx_code(eps: float | None, momentum: float) -> str:
    attrs = "" if eps is None else f", epsilon={_fmt(eps)}"
    return ('onnx.helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"], '
            f'["Y"]{attrs}, momentum={_fmt(momentum)})')


def _flax_code(eps: float | None, momentum: float, center: bool, scale: bool) -> str:
    args = [f"momentum={_fmt(momentum)}"]
    if eps is not None:
        args.append(f"epsilon={_fmt(eps)}")
    if not center:
        args.append("use_bias=False")
    if not scale:
        args.append("use_scale=False")
    return f"flax.linen.BatchNorm({', '.join(args)})"


def _bnkit_code(channels: int, framework: Framework, eps: float, momentum: float, center: bool, scale: bool,
                track: bool, renorm: bool = False) -> str:
    args = [str(channels), f"eps={_fmt(eps)}", f"momentum={_fmt(momentum)}"]
    if not (center or scale):
        args.append("affine=False")
    elif not center:
        args.append("bias=False")
    if not track:
        args.append("track_running_stats=False")
    args.append(f"convention={framework!r}")
    if renorm:
        args.append("renorm=True")
    return f"bnkit.torch.BatchNorm2d({', '.join(args)})"


def _layer_settings(
    role, framework: Framework, channels: int, eps: float | None, momentum: float, center: bool, scale: bool,
    track: bool, same_as_given: bool, renorm: bool = False,
) -> LayerSettings:
    conv = get_convention(framework)
    old, new = conv.weights(momentum)
    eps_value = conv.eps if eps is None else float(eps)
    bnkit_code = _bnkit_code(channels, framework, eps_value, momentum, center, scale, track, renorm)
    if framework == "keras":
        code = _keras_code(channels, eps, momentum, center, scale, renorm)
        layout = "NHWC, axis=-1 (axis=1 on NCHW)"
    elif framework == "onnx":
        code = _onnx_code(eps, momentum)
        layout = "NCHW, channel axis 1"
    elif framework == "flax":
        code = _flax_code(eps, momentum, center, scale)
        layout = "NHWC, axis=-1 (features last)"
    else:  # torch.nn has no batch renormalization: bnkit's layer is the PyTorch one
        code = bnkit_code if renorm else _torch_code(channels, eps, momentum, center, scale, track)
        layout = "NCHW, channel axis 1"
    return LayerSettings(
        role=role,
        framework=framework,
        code=code,
        bnkit_code=bnkit_code,
        eps=eps_value,
        momentum=float(momentum),
        new_weight=new,
        old_weight=old,
        scale=scale,
        center=center,
        track_running_stats=track,
        running_var_estimator=conv.running_var_estimator,
        layout=layout,
        same_as_given=same_as_given,
        renorm=renorm,
    )


# --------------------------------------------------------------------------- parameter counts


def _keras_count(s: LayerSettings, channels: int) -> ParamCount:
    # Keras 3 BatchNormalization.build(): gamma if scale, beta if center (trainable), and always
    # moving_mean and moving_variance (trainable=False weights), all counted by count_params().
    weights = []
    if s.scale:
        weights.append(("gamma", channels, "trainable"))
    if s.center:
        weights.append(("beta", channels, "trainable"))
    weights += [("moving_mean", channels, "non-trainable"), ("moving_variance", channels, "non-trainable")]
    if s.renorm:  # Keras 3 BatchNormalization.build() with renorm=True
        weights += [(name, channels, "non-trainable") for name in ("moving_stddev", "renorm_mean", "renorm_stddev")]
    trainable = sum(size for _, size, kind in weights if kind == "trainable")
    non_trainable = sum(size for _, size, kind in weights if kind == "non-trainable")
    return ParamCount(
        framework="keras",
        reported_by="model.summary() / layer.count_params()",
        total=trainable + non_trainable,
        trainable=trainable,
        non_trainable=non_trainable,
        not_counted=0,
        weights=weights,
        why=(
            ("Keras keeps the moving mean and variance (and, with renorm, the moving stddev and the renorm "
             "mean and stddev) " if s.renorm else "Keras keeps the moving mean and variance ")
            + "as weights with trainable=False: they are saved "
            "and counted like gamma and beta, but the optimizer never touches them (the layer itself "
            f"updates them in training). Hence {trainable + non_trainable} = {trainable} trainable + "
            f"{non_trainable} non-trainable."
        ),
    )


def _onnx_count(s: LayerSettings, channels: int) -> ParamCount:
    # the operator's inputs scale, B, input_mean, input_var: initializers, none marked trainable
    weights = [(name, channels, "initializer") for name in ("scale", "B", "input_mean", "input_var")]
    return ParamCount(
        framework="onnx",
        reported_by="the initializers of the BatchNormalization node",
        total=4 * channels,
        trainable=0,
        non_trainable=4 * channels,
        not_counted=0,
        weights=weights,
        why="An ONNX graph stores tensors, not parameters: scale and B (gamma and beta) and the running "
            "statistics input_mean and input_var are four initializers of the node, all required inputs "
            "(scale 1 and B 0 where the layer had none). Exporters may store tensors with the same values once.",
    )


def _flax_count(s: LayerSettings, channels: int) -> ParamCount:
    # flax.linen.BatchNorm: 'params' scale (use_scale) and bias (use_bias); 'batch_stats' mean and var
    weights = []
    if s.scale:
        weights.append(("params/scale", channels, "trainable"))
    if s.center:
        weights.append(("params/bias", channels, "trainable"))
    weights += [("batch_stats/mean", channels, "batch_stats"), ("batch_stats/var", channels, "batch_stats")]
    trainable = sum(size for _, size, kind in weights if kind == "trainable")
    return ParamCount(
        framework="flax",
        reported_by="the 'params' collection (tabulate / jax.tree counts)",
        total=trainable,
        trainable=trainable,
        non_trainable=0,
        not_counted=2 * channels,
        weights=weights,
        why="Flax keeps the running statistics in the separate 'batch_stats' collection (mean, var: "
            f"{2 * channels} values), outside 'params', which is what counts of trainable parameters read.",
    )


def _torch_count(layer) -> ParamCount:
    weights = [(name, p.numel(), "trainable" if p.requires_grad else "non-trainable")
               for name, p in layer.named_parameters()]
    weights += [(name, b.numel(), "buffer") for name, b in layer.named_buffers()]
    trainable = sum(size for _, size, kind in weights if kind == "trainable")
    frozen = sum(size for _, size, kind in weights if kind == "non-trainable")
    buffers = sum(size for _, size, kind in weights if kind == "buffer")
    statistics = [name for name, _, kind in weights if kind == "buffer" and name != "num_batches_tracked"]
    running = sum(size for name, size, kind in weights if kind == "buffer" and name in statistics)
    if buffers:
        names = " and ".join(statistics) if len(statistics) < 3 else ", ".join(statistics)
        why = (
            f"PyTorch counts only nn.Parameters (what the optimizer trains). {names} "
            f"({running} values) and the num_batches_tracked counter are buffers: saved in the state_dict "
            "but not parameters, so torchinfo and sum(p.numel() for p in m.parameters()) report "
            f"{trainable + frozen}."
        )
    else:
        why = "With track_running_stats=False PyTorch keeps no running statistics at all."
    return ParamCount(
        framework="torch",
        reported_by="sum(p.numel() for p in m.parameters()) / torchinfo",
        total=trainable + frozen,
        trainable=trainable,
        non_trainable=frozen,
        not_counted=buffers,
        weights=weights,
        why=why,
    )


# --------------------------------------------------------------------------- running the layers


def random_batch(shape: tuple[int, ...], seed: int = 0):
    """A float32 NCHW batch with per-channel means and spreads (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    mean = torch.empty(channels, dtype=torch.float64).uniform_(-2.0, 2.0, generator=gen)
    log_std = torch.empty(channels, dtype=torch.float64).uniform_(math.log(0.1), math.log(3.0), generator=gen)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    return (x * log_std.exp().view(view) + mean.view(view)).float()


def _build(s: LayerSettings, channels: int):
    from bnkit.torch import BatchNorm2d

    affine = s.center or s.scale
    layer = BatchNorm2d(
        channels,
        eps=s.eps,
        momentum=s.momentum,
        affine=affine,
        track_running_stats=s.track_running_stats,
        bias=s.center or not affine,
        convention=s.framework,
        renorm=s.renorm,
    )
    if affine and not s.scale:
        layer.weight.requires_grad_(False)  # gamma stays 1, as without Keras' scale
    return layer


def _one_step_each(layer, x) -> dict:
    """Training forward (updates the running statistics), then inference on the same batch."""
    import torch

    with torch.no_grad():
        layer.train()
        train_out = layer(x)
        layer.eval()
        eval_out = layer(x)
    out = {"training output": train_out, "inference output": eval_out}
    if layer.running_mean is not None:
        out["running mean"] = layer.running_mean.clone()
        out["running variance"] = layer.running_var.clone()
    return out


# --------------------------------------------------------------------------- reasons


def _momentum_phrase(s: LayerSettings) -> str:
    weighs = "the new batch" if get_convention(s.framework).momentum_weighs == "new" else "the old value"
    return f"{s.framework} momentum={_fmt(s.momentum)} weighs {weighs}: batch weight {s.new_weight:.4g}"


def _why(quantity: str, given: LayerSettings, other: LayerSettings, n: int, residual: float | None) -> str:
    reasons = []
    same_weights = math.isclose(given.new_weight, other.new_weight, rel_tol=1e-12, abs_tol=1e-15)
    same_eps = given.eps == other.eps
    same_estimator = given.running_var_estimator == other.running_var_estimator
    renorm_differs = given.renorm != other.renorm
    if renorm_differs and quantity == "training output":
        renorm, plain = (given, other) if given.renorm else (other, given)
        text = (
            f"The {renorm.role} layer uses batch renormalization, the {plain.role} one does not: in training it "
            "multiplies the normalised batch by r = sqrt(var + eps) / renorm_stddev and adds d = (mean - "
            "renorm_mean) / renorm_stddev (clipped by renorm_clipping, none here), so from the initial renorm "
            "statistics 0 and 1 its training output is about x itself."
        )
        return text if same_eps else text + f" eps differs too ({_fmt(given.eps)} vs {_fmt(other.eps)})."
    if quantity == "training output":
        if same_eps:
            return ("Training normalises with the batch's own mean and biased variance in both frameworks, "
                    "and eps is the same: equal up to float32 rounding. Momentum plays no part here.")
        return (f"eps differs ({_fmt(given.eps)} vs {_fmt(other.eps)}) in (x - mean) / sqrt(var + eps); "
                "it matters most in channels with a small variance. Momentum plays no part in training "
                "outputs.")
    if quantity in ("running mean", "running variance"):
        if same_weights:
            reasons.append(
                f"same update weights (batch {given.new_weight:.4g}, old value {given.old_weight:.4g})"
            )
        else:
            reasons.append(f"{_momentum_phrase(given)}, {_momentum_phrase(other)}")
        if quantity == "running variance" and not same_estimator:
            unbiased = given if given.running_var_estimator == "unbiased" else other
            reasons.append(
                f"{unbiased.framework} stores the unbiased batch variance, n/(n-1) = {n}/{n - 1} = "
                f"{n / (n - 1):.5f} times the biased one (n = {n} values per channel)"
            )
            if residual is not None and same_weights:
                reasons.append(f"with that factor undone the difference is {residual:.2g}")
        elif quantity == "running variance":
            reasons.append("both store the same (" + given.running_var_estimator + ") batch variance")
        if quantity == "running variance" and renorm_differs:
            reasons.append("and batch renormalization keeps its running variance as the square of a moving "
                           "standard deviation sqrt(var + eps), minus eps, not as a moving variance")
        if same_weights and (quantity == "running mean" or (same_estimator and not renorm_differs)):
            reasons.append("equal up to float32 rounding")
        return "; ".join(reasons) + "."
    # inference output
    if not (given.track_running_stats and other.track_running_stats):
        return "Without running statistics inference uses the batch's, as in training."
    if same_weights and same_estimator and same_eps and not renorm_differs:
        return "Same running statistics and eps: equal up to float32 rounding."
    reasons.append("inference normalises with the running statistics, so it inherits their differences")
    if not same_weights:
        reasons.append("(momentum)")
    if not same_estimator:
        reasons.append(f"(the running variance's {n}/{n - 1} factor)")
    if renorm_differs:
        reasons.append("(batch renormalization's running variance)")
    if not same_eps:
        reasons.append(f"and eps {_fmt(given.eps)} vs {_fmt(other.eps)}")
    return " ".join(reasons).replace(") (", ", ") + "."


# --------------------------------------------------------------------------- explain


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def explain(
    source: Framework = "keras",
    channels: int = 32,
    momentum: float | None = 0.15,
    eps: float | None = None,
    center: bool = True,
    scale: bool = True,
    track_running_stats: bool = True,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    renorm: bool = False,
) -> Explanation:
    """Explain a batch-norm layer written in ``source``'s terms (``"keras"``, ``"torch"``, ``"onnx"``, ``"flax"``).

    An ONNX ``BatchNormalization`` or a Flax ``BatchNorm`` (:data:`bnkit.ONNX`, :data:`bnkit.FLAX`:
    momentum on the old value, biased running variance) is explained against PyTorch, as a Keras one is;
    a PyTorch one against Keras.

    The defaults are the seed example, Keras ``BatchNormalization(momentum=0.15, axis=-1)`` on 32
    channels. ``momentum`` and ``eps`` are read in ``source``'s meaning; ``eps=None`` is its default.
    PyTorch's ``momentum=None`` (a cumulative average) has no Keras equivalent: ``ValueError``.
    For ``source="torch"`` the layer is affine when ``center`` and ``scale`` are both
    true; ``affine=False`` is ``center=False, scale=False``. ``input_shape`` is the NCHW batch the
    layers run on (default ``(8, channels, 8, 8)``); ``seed`` draws it. ``renorm=True``: Keras'
    ``BatchNormalization(renorm=True)`` (``source="keras"`` only; ``torch.nn`` has no renorm).
    """
    if source not in _NAMES:
        raise ValueError(f"source must be 'keras', 'torch', 'onnx' or 'flax', got {source!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    center = _check_flag("center", center)
    scale = _check_flag("scale", scale)
    track = _check_flag("track_running_stats", track_running_stats)
    renorm = _check_flag("renorm", renorm)
    if renorm and source != "keras":
        raise ValueError("renorm=True is Keras' batch renormalization: torch.nn has none (bnkit.torch's layers "
                         "take renorm=True); give source='keras'")
    src = get_convention(source)
    target: Framework = "torch" if source != "torch" else "keras"
    dst = get_convention(target)
    src.check_momentum(momentum)
    if momentum is None:
        raise ValueError("momentum=None (PyTorch's cumulative average) has no Keras equivalent; "
                         "give a float in [0, 1]")
    momentum = float(momentum)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if source != "torch" and not track:
        raise ValueError(f"{_NAMES[source]}'s batch norm always keeps running statistics: "
                         "track_running_stats=False exists only with source='torch'")
    if source == "onnx" and not (center and scale):
        raise ValueError("ONNX's BatchNormalization always has scale and B (required inputs): "
                         "center=False / scale=False are for source='keras' or 'flax'")
    if source == "torch" and center != scale:
        raise ValueError(f"a torch.nn.BatchNorm2d is affine (center and scale) or not; got center={center}, "
                         f"scale={scale}: use source='keras' for one without the other")
    if input_shape is None:
        input_shape = (8, channels, 8, 8)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 4 or input_shape[1] != channels or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (N, {channels}, H, W) with positive sizes, got {input_shape}")
    n = input_shape[0] * input_shape[2] * input_shape[3]
    if n < 2:
        raise ValueError(f"a training step needs at least 2 values per channel (N * H * W), got input_shape "
                         f"{input_shape}")

    translated = translate_momentum(momentum, src, dst)
    given = _layer_settings("given", source, channels, eps, momentum, center, scale, track, True, renorm)
    equivalent = _layer_settings("equivalent", target, channels, given.eps, translated, center, scale,
                                 track, True, renorm)
    # A literal copy: the same numbers typed into the other framework, everything else its default.
    literal = _layer_settings("literal copy", target, channels, eps, momentum, center, scale, track,
                              False)
    literal = _with_same_as_given(literal, given)
    if target == "keras" and not track:
        equivalent = _with_note_no_tracking(equivalent)
        literal = _with_note_no_tracking(literal)

    x = random_batch(input_shape, seed)
    torch_settings = given if source == "torch" else equivalent
    own_count = {"onnx": _onnx_count, "flax": _flax_count}.get(source, _keras_count)
    own = given if source != "torch" else equivalent  # the layer that is not PyTorch's
    counts = [own_count(own, channels), _torch_count(_build(torch_settings, channels))]

    results = {s.role: _one_step_each(_build(s, channels), x) for s in (given, equivalent, literal)}
    differences = []
    for other in (equivalent, literal):
        for quantity in ("training output", "running mean", "running variance", "inference output"):
            a = results["given"].get(quantity)
            b = results[other.role].get(quantity)
            if a is None or b is None:
                continue
            a64, b64 = a.double(), b.double()
            max_abs = float((a64 - b64).abs().max())
            scale_ = max(float(a64.abs().max()), float(b64.abs().max()))
            residual = None
            estimators_differ = given.running_var_estimator != other.running_var_estimator
            if quantity == "running variance" and estimators_differ and not (given.renorm or other.renorm):
                residual = float((_biased_share(a64, given, n) - _biased_share(b64, other, n)).abs().max())
            differences.append(Difference(
                quantity=quantity,
                against=other.role,
                max_abs=max_abs,
                relative=max_abs / scale_ if scale_ else 0.0,
                why=_why(quantity, given, other, n, residual),
            ))
    return Explanation(
        source=source,
        channels=channels,
        input_shape=input_shape,
        values_per_channel=n,
        seed=seed,
        batch=BATCH_DESCRIPTION,
        settings=[given, equivalent, literal],
        counts=counts,
        differences=differences,
        notes=_notes(given, equivalent, literal, n),
    )


def _biased_share(running_var, s: LayerSettings, n: int):
    """The batch's share of a running variance that started at 1, as a biased variance."""
    share = running_var - s.old_weight
    return share * ((n - 1) / n) if s.running_var_estimator == "unbiased" else share


def _with_same_as_given(literal: LayerSettings, given: LayerSettings) -> LayerSettings:
    from dataclasses import replace

    same = (literal.eps == given.eps and math.isclose(literal.new_weight, given.new_weight)
            and literal.running_var_estimator == given.running_var_estimator and literal.renorm == given.renorm)
    return replace(literal, same_as_given=same)


def _with_note_no_tracking(s: LayerSettings) -> LayerSettings:
    from dataclasses import replace

    note = "  # no equivalent of track_running_stats=False: call it with training=True"
    return replace(s, code=s.code + note, same_as_given=False)


def _notes_old_weighing(given: LayerSettings, equivalent: LayerSettings, literal: LayerSettings,
                        n: int) -> list[str]:
    """The notes for an ONNX or Flax layer (momentum on the old value, biased) against PyTorch."""
    name = _NAMES[given.framework]
    conv = get_convention(given.framework)
    notes = [
        f"Momentum means opposite things: {name}'s momentum={_fmt(given.momentum)} is the weight of the old "
        f"running value, PyTorch's momentum={_fmt(equivalent.momentum)} the weight of the new batch; both give "
        f"the batch statistic weight {given.new_weight:.4g}.",
        f"The literal copy {literal.code} weighs the batch {literal.new_weight:.4g} instead of "
        f"{given.new_weight:.4g}: its running statistics, and so its inference outputs, drift apart"
        + (" (its training outputs agree: same eps)." if literal.eps == given.eps
           else f"; eps={_fmt(literal.eps)} instead of {_fmt(given.eps)} also moves its training outputs."),
        f"Default eps: {name} {_fmt(conv.eps)}, PyTorch {_fmt(TORCH.eps)}. Training uses the batch's biased "
        f"variance in both; the running variance is biased in {name} and unbiased (x n/(n-1), here "
        f"{n}/{n - 1}) in PyTorch.",
        f"To keep {name}'s semantics in PyTorch: {given.bnkit_code}",
    ]
    if given.framework == "flax":
        notes.append(
            "Flax's default use_fast_variance=True computes the batch variance as max(E[x^2] - E[x]^2, 0); "
            "bnkit computes it in two passes, as Flax does with use_fast_variance=False. They differ only by "
            "rounding, which grows with mean^2 / variance (float32 data with a large mean and a small spread "
            "can get a variance of 0)."
        )
    return notes


def _notes(given: LayerSettings, equivalent: LayerSettings, literal: LayerSettings, n: int) -> list[str]:
    if given.framework in ("onnx", "flax"):
        return _notes_old_weighing(given, equivalent, literal, n)
    keras = given if given.framework == "keras" else equivalent
    torch_ = given if given.framework == "torch" else equivalent
    if not given.track_running_stats:
        return [
            "Without running statistics (track_running_stats=False) the layer normalises with the batch's "
            "statistics in training and in eval(); momentum plays no part.",
            "Keras has no such option: call its BatchNormalization with training=True to get the same "
            f"outputs; eps={_fmt(literal.eps)} in the literal copy moves them."
            if literal.eps != given.eps else "Keras has no such option: call it with training=True.",
            f"Default eps: Keras {_fmt(KERAS.eps)}, PyTorch {_fmt(TORCH.eps)}.",
            f"The same layer in bnkit's Keras convention: {equivalent.bnkit_code}",
        ]
    notes = [
        f"Momentum means opposite things: Keras' momentum={_fmt(keras.momentum)} is the weight of the "
        f"old running value, PyTorch's momentum={_fmt(torch_.momentum)} the weight of the new batch; both "
        f"give the batch statistic weight {keras.new_weight:.4g}.",
        f"The literal copy {literal.code} weighs the batch {literal.new_weight:.4g} instead of "
        f"{given.new_weight:.4g}: its running statistics, and so its inference outputs, drift apart"
        + (" (its training outputs agree: same eps)." if literal.eps == given.eps
           else f"; eps={_fmt(literal.eps)} instead of {_fmt(given.eps)} also moves its training outputs."),
        f"Default eps: Keras {_fmt(KERAS.eps)}, PyTorch {_fmt(TORCH.eps)}. Training uses the batch's biased "
        f"variance in both; the running variance is biased in Keras and unbiased (x n/(n-1), here "
        f"{n}/{n - 1}) in PyTorch.",
        f"To keep Keras' semantics in PyTorch: {keras.bnkit_code}" if given.framework == "keras" else
        f"The same layer in bnkit's Keras convention: {equivalent.bnkit_code}",
    ]
    if given.renorm:
        notes.append(
            "Batch renormalization has no torch.nn layer: the literal copy drops it. bnkit.torch's layers take "
            "renorm=True, renorm_clipping and renorm_momentum (Keras' default 0.99, PyTorch's reading 0.01) and "
            "keep Keras' moving_stddev, renorm_mean, renorm_stddev as the buffers running_stddev, renorm_mean, "
            "renorm_stddev; bnkit convert carries them over."
        )
    return notes
