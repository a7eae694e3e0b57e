"""Run two models on the same input, layer by layer, and explain why they disagree.

:func:`compare` takes two models of either framework (``torch.nn.Module`` or ``keras.Model``)
and one input in the first model's layout (NCHW for PyTorch, NHWC for Keras; the channel
axis of rank-3/4/5 inputs is moved for the other side). It

1. records the output of every *significant* layer on each side (convolutions, dense/linear,
   batch norms, pooling, flatten, add, concatenate, activations) — PyTorch through forward
   hooks on a copy of the module, Keras through a functional model over the layers' outputs;
   an activation applied right after a convolution or dense layer is folded into it, since
   Keras usually fuses it (``Conv2D(..., activation="relu")``);
2. pairs the layers of both sides in execution order by kind and output shape;
3. compares each pair in one layout (PyTorch's: channel axis 1; a Keras ``Flatten`` output is
   reordered from H·W·C to C·H·W) and marks a pair divergent when
   ``|a - b| > atol + rtol * max(|a|, |b|)`` anywhere;
4. names the causes (:data:`CAUSES`) from the paired batch-norm layers' settings, from the
   mode each one actually ran in, from the running statistics after a training step, and
   from experiments (a dense layer re-run on the other framework's flatten order).

The data comes first (:class:`CompareReport` rows), rendering second
(:meth:`CompareReport.to_dict`, :meth:`CompareReport.to_html`, :meth:`CompareReport.render`).
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from bnkit.conventions import KERAS, TORCH, Convention, get_convention
from bnkit.frameworks import is_keras_model, is_torch_module

__all__ = ["compare", "CompareReport", "LayerDiff", "Cause", "BatchNormPair", "CAUSES"]

#: Stable cause codes, in the order they are reported, with a one-line meaning.
CAUSES: dict[str, str] = {
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
    "with its spatial axes swapped",
    "weights": "a layer gives different outputs from matching inputs: its parameters differ",
    "unexplained": "the models disagree for a reason bnkit could not identify",
}

# Layers that share a kind and output shape are paired; everything else is skipped.
_TORCH_ACTIVATION_MODULE = "torch.nn.modules.activation"
_KERAS_ACTIVATION_CLASSES = {"Activation", "ReLU", "Softmax", "LeakyReLU", "ELU", "PReLU"}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


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
    """One pair of corresponding layers and how far apart their outputs are."""

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

    @property
    def differs(self) -> bool:
        """The outputs or (after a training step) the running statistics differ."""
        return self.diverges or self.running_stats_diverge

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
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "diverges": self.diverges,
            "running_mean_abs_diff": _json_float(self.running_mean_abs_diff),
            "running_var_abs_diff": _json_float(self.running_var_abs_diff),
            "running_stats_diverge": self.running_stats_diverge,
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
    """The result of :func:`compare`: rows first, causes, then renderings."""

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

    @property
    def agree(self) -> bool:
        """True when every paired layer, the outputs and (training) the running statistics agree."""
        return not self.output_diverges and not any(r.differs for r in self.rows)

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
            "input_shape": list(self.input_shape),
            "training": self.training,
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
            "output": {
                "max_abs_diff": _json_float(self.output_max_abs_diff),
                "max_rel_diff": _json_float(self.output_max_rel_diff),
                "diverges": self.output_diverges,
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

    def render(self, console=None) -> None:
        """Print the report with ``rich``: the per-layer table, the outputs, the causes."""
        from bnkit.diagnose.report_html import render_rich

        render_rich(self, console)

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


def _json_float(x: float | None):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)


# --------------------------------------------------------------------------------------------
# framework detection and layouts
# --------------------------------------------------------------------------------------------


def _framework(model) -> str:
    # Keras first: on its torch backend a keras.Model is also a torch.nn.Module
    if is_keras_model(model):
        from bnkit.keras import keras

        if isinstance(model, keras.Model):
            return "keras"
        raise TypeError(
            f"compare needs a keras.Model, got the Keras layer {type(model).__name__}; "
            "wrap it in keras.Sequential([...]) or a functional model"
        )
    if is_torch_module(model):
        return "torch"
    raise TypeError(
        f"compare needs a torch.nn.Module or a keras.Model, got {type(model).__module__}.{type(model).__name__}"
    )


def _to_layout(x: np.ndarray, source: str, target: str) -> np.ndarray:
    """Move the channel axis of a rank-3/4/5 array from ``source``'s layout to ``target``'s."""
    if source == target or x.ndim not in (3, 4, 5):
        return x
    if source == "keras":
        return np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "value") and hasattr(x.value, "detach"):  # a Keras variable on the torch backend
        x = x.value
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    try:
        from bnkit.keras import keras

        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - anything array-like
        return np.asarray(x)


# --------------------------------------------------------------------------------------------
# tracing: one entry per significant layer, in execution order
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    type: str
    kind: str
    raw: np.ndarray  # output in the framework's own layout
    canonical: np.ndarray  # output in PyTorch's layout (and C·H·W flatten order)
    callables: list = field(default_factory=list, repr=False)  # re-runs the entry on a new input
    pre_flatten_shape: tuple[int, ...] | None = None
    bn: BatchNormState | None = None
    flat_order: str = "own"  # "hwc" when a flatten pair agrees in Keras' H·W·C order on both sides

    @property
    def token(self) -> tuple:
        shape = self.canonical.shape[1:]
        if self.kind == "flatten":
            shape = (int(np.prod(shape)),)
        elif self.kind == "gpool":
            shape = tuple(s for s in shape if s != 1) or (1,)
        return (self.kind, tuple(shape))


def _torch_kind(module) -> str | None:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "dense"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) or isinstance(
        module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    ):
        return "gpool"
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        return "pool"
    if isinstance(module, nn.Flatten):
        return "flatten"
    if type(module).__module__ == _TORCH_ACTIVATION_MODULE:
        return "act"
    return None


def _torch_bn_state(module) -> BatchNormState:
    conv = getattr(module, "convention", None)
    conv = conv if isinstance(conv, Convention) else TORCH
    momentum = module.momentum
    tracks = module.running_mean is not None
    if momentum is None:
        new_weight = None
    else:
        new_weight = conv.weights(momentum)[1]
    return BatchNormState(
        framework="torch",
        eps=float(module.eps),
        momentum=None if momentum is None else float(momentum),
        momentum_weighs=conv.momentum_weighs,
        new_weight=new_weight,
        running_var_estimator=conv.running_var_estimator,
        tracks_running_stats=tracks,
        uses_batch_stats=bool(module.training or not tracks),
        in_training_mode=bool(module.training),
        trainable=bool(module.weight is None or module.weight.requires_grad),
        running_mean_before=module.running_mean.detach().cpu().numpy().copy() if tracks else None,
        running_var_before=module.running_var.detach().cpu().numpy().copy() if tracks else None,
        **_renorm_state(module, conv),
    )


def _torch_functional_kind(node, args) -> str | None:
    """The kind of a traced ``call_function``/``call_method`` node (``F.relu``, ``x + y``, ...)."""
    import operator

    import torch
    import torch.nn.functional as F

    activations = {
        torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.softmax,
        F.softmax, F.log_softmax, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.mish, F.softplus,
    }  # fmt: skip
    target = node.target
    if node.op == "call_function":
        if target in activations:
            return "act"
        if target is torch.flatten:
            return "flatten"
        if target in (operator.add, operator.iadd, torch.add):
            return "add" if all(isinstance(a, torch.Tensor) for a in args[:2]) else None
        if target in (torch.cat, torch.concat):
            return "concat"
        return None
    if node.op == "call_method":
        if target in ("relu", "relu_", "sigmoid", "tanh", "softmax"):
            return "act"
        if target == "flatten":
            return "flatten"
        if target in ("view", "reshape") and args and isinstance(args[0], torch.Tensor):
            return "flatten-if-2d"
        if target in ("add", "add_"):
            return "add" if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
    return None


def _functional_rerun(op: str, target, rest: tuple, kwargs: dict):
    """A callable that re-applies a traced functional node to a new first argument."""
    if op == "call_method":
        return lambda t: getattr(t, target)(*rest, **kwargs)
    return lambda t: target(t, *rest, **kwargs)


def _traced(work):
    """``work`` as an ``fx.GraphModule`` sharing its layers, or None when it does not trace."""
    from torch import fx

    if isinstance(work, fx.GraphModule):
        return work
    try:
        from bnkit.torch.tracing import symbolic_trace

        return symbolic_trace(work)
    except Exception:  # noqa: BLE001 - dynamic control flow: fall back to module hooks alone
        return None


def _trace_torch(model, x: np.ndarray, training: bool):
    """Run a copy of ``model`` on ``x`` (NCHW) and record every significant layer's output.

    Layers (modules) are recorded by forward hooks; where the module traces with ``torch.fx``
    the graph is run node by node so that functional activations, ``flatten``, additions and
    concatenations (``F.relu(x)``, ``x + y``, ``torch.cat``) are recorded too.
    """
    import torch
    from torch import fx, nn

    with warnings.catch_warnings():  # programs rebuilt from torch.export warn on deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        work = copy.deepcopy(model)
    if training:
        work.train()
    for m in work.modules():  # random masks cannot agree across frameworks
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    names = {m: n for n, m in work.named_modules()}
    entries: list[_Entry] = []
    last_ptr: list = [None]
    handles = []

    def record(name, type_name, kind, inp, output, callable_):
        out = output.detach().cpu().numpy().copy()
        if (
            kind == "act"
            and entries
            and entries[-1].kind in ("conv", "dense")
            and inp is not None
            and last_ptr[0] == (inp.data_ptr(), tuple(inp.shape))
        ):  # an activation applied to a convolution's or dense layer's output: fold it in
            prev = entries[-1]
            prev.type = f"{prev.type}+{type_name}"
            prev.raw = prev.canonical = out
            prev.callables.append(callable_)
        else:
            entry = _Entry(name, type_name, kind, out, out)
            entry.callables.append(callable_)
            if kind == "flatten" and inp is not None:
                entry.pre_flatten_shape = tuple(inp.shape)
            if kind == "bn":
                entry.bn = callable_._bnkit_compare_state
            entries.append(entry)
        last_ptr[0] = (output.data_ptr(), tuple(output.shape))

    def hook(module, inputs, output):
        kind = _torch_kind(module)
        if kind is None or not isinstance(output, torch.Tensor):
            return
        inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        record(names.get(module, type(module).__name__), type(module).__name__, kind, inp, output, module)

    def pre_hook(module, inputs):
        # record the mode and the statistics *before* the forward pass updates them
        module._bnkit_compare_state = _torch_bn_state(module)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op in ("call_function", "call_method") and isinstance(result, torch.Tensor):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                kind = _torch_functional_kind(n, args)
                if kind == "flatten-if-2d":
                    kind = "flatten" if result.ndim == 2 and args[0].ndim >= 3 else None
                if kind is not None:
                    inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
                    if kind in ("concat",) and args and isinstance(args[0], (list, tuple)):
                        inp = None
                    type_name = getattr(n.target, "__name__", str(n.target))

                    rerun = _functional_rerun(n.op, n.target, tuple(args[1:]), dict(kwargs))
                    record(n.name, type_name, kind, inp, result, rerun)
            return result

    for m in work.modules():
        if _torch_kind(m) is not None and not list(m.children()):
            handles.append(m.register_forward_hook(hook))
            if _torch_kind(m) == "bn":
                handles.append(m.register_forward_pre_hook(pre_hook))
    graph_module = _traced(work)
    try:
        with torch.no_grad():
            if graph_module is not None:
                try:
                    out = Recorder(graph_module).run(torch.from_numpy(x))
                except Exception:  # noqa: BLE001 - the trace did not run: use the module itself
                    entries.clear()
                    out = work(torch.from_numpy(x))
            else:
                out = work(torch.from_numpy(x))
    finally:
        for h in handles:
            h.remove()
    for e in entries:
        if e.bn is not None and e.bn.tracks_running_stats:
            module = e.callables[0]
            e.bn.running_mean_after = module.running_mean.detach().cpu().numpy().copy()
            e.bn.running_var_after = module.running_var.detach().cpu().numpy().copy()
            if e.bn.renorm:
                e.bn.renorm_after = (_to_numpy(module.renorm_mean).copy(), _to_numpy(module.renorm_stddev).copy())
    if isinstance(out, (tuple, list)):
        out = out[0]
    return entries, _to_numpy(out), work


def _keras_class_names(layer) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def _keras_kind(layer) -> str | None:
    names = _keras_class_names(layer)
    if names & {"BaseConv", "BaseDepthwiseConv", "BaseSeparableConv"}:
        return "conv"
    if "Dense" in names:
        return "dense"
    if "BatchNormalization" in names:
        return "bn"
    if names & {"BaseGlobalPooling", "BaseAdaptivePooling"}:
        return "gpool"
    if "BasePooling" in names:
        return "pool"
    if "Flatten" in names:
        return "flatten"
    if "Add" in names:
        return "add"
    if "Concatenate" in names:
        return "concat"
    if names & _KERAS_ACTIVATION_CLASSES:
        act = getattr(layer, "activation", None)
        if "Activation" in names and getattr(act, "__name__", "") == "linear":
            return None
        return "act"
    return None


def _keras_activation_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None)
    return None if name in (None, "linear") else name


def _keras_bn_state(layer, training: bool) -> BatchNormState:
    conv = getattr(layer, "convention", None)
    try:
        conv = get_convention(conv) if conv is not None else KERAS
    except ValueError:
        conv = KERAS
    momentum = None if layer.momentum is None else float(layer.momentum)
    new_weight = None if momentum is None else conv.weights(momentum)[1]
    return BatchNormState(
        framework="keras",
        eps=float(layer.epsilon),
        momentum=momentum,
        momentum_weighs=conv.momentum_weighs,
        new_weight=new_weight,
        running_var_estimator=conv.running_var_estimator,
        tracks_running_stats=True,
        uses_batch_stats=bool(training and layer.trainable),
        in_training_mode=bool(training),
        trainable=bool(layer.trainable),
        running_mean_before=_to_numpy(layer.moving_mean).copy(),
        running_var_before=_to_numpy(layer.moving_variance).copy(),
        **_renorm_state(layer, conv),
    )


def _renorm_state(layer, conv: Convention) -> dict:
    """Either framework's renorm settings, the momentum as the weight of the new batch statistic."""
    if getattr(layer, "renorm", False) is not True:
        return {}
    momentum = layer.renorm_momentum
    return {
        "renorm": True,
        "renorm_clipping": {k: v for k, v in (layer.renorm_clipping or {}).items() if v is not None},
        "renorm_new_weight": None if momentum is None else conv.weights(float(momentum))[1],
    }


def _keras_canonical(out: np.ndarray, kind: str, pre_flatten_shape) -> np.ndarray:
    if kind == "flatten" and pre_flatten_shape is not None and len(pre_flatten_shape) in (3, 4, 5):
        full = out.reshape((out.shape[0], *pre_flatten_shape[1:]))
        return np.ascontiguousarray(np.moveaxis(full, -1, 1)).reshape(out.shape[0], -1)
    return _to_layout(out, "keras", "torch")


def _keras_all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included."""
    found, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def _trace_keras(model, x: np.ndarray, training: bool):
    """Run ``model`` on ``x`` (NHWC) through a functional model over the layers' outputs."""
    from bnkit.keras import keras

    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise ValueError(
            f"the Keras model {model.name!r} has no defined inputs: build it (call it once, or give "
            "keras.Input(shape=...)) before comparing"
        )
    layers = []
    for layer in model.layers:
        kind = _keras_kind(layer)
        if kind is None:
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # a layer used more than once has no single output
            continue
        layers.append((layer, kind, output))

    # fold a separate activation layer into the convolution or dense layer it follows
    groups: list[list] = []
    for layer, kind, output in layers:
        if kind == "act" and groups and groups[-1][1] in ("conv", "dense"):
            prev_layer = groups[-1][0][-1]
            try:
                follows = layer.input is prev_layer.output
            except (AttributeError, ValueError):
                follows = False
            if follows:
                groups[-1][0].append(layer)
                groups[-1][2] = output
                continue
        groups.append([[layer], kind, output])

    flatten_inputs = {}
    for group_layers, kind, _ in groups:
        if kind == "flatten":
            try:
                flatten_inputs[id(group_layers[0])] = group_layers[0].input
            except (AttributeError, ValueError):
                pass
    outputs = [g[2] for g in groups] + list(flatten_inputs.values()) + list(model.outputs[:1])
    probe = keras.Model(model.inputs, outputs)

    bn_layers = [g[0][0] for g in groups if g[1] == "bn"]
    states = {id(layer): _keras_bn_state(layer, training) for layer in bn_layers}
    dropout_rates = []
    if training:  # random masks cannot agree across frameworks
        for layer in _keras_all_layers(model):
            if "Dropout" in _keras_class_names(layer) and hasattr(layer, "rate"):
                dropout_rates.append((layer, layer.rate))
                layer.rate = 0.0
    saved = [_to_numpy(v).copy() for v in model.weights]
    try:
        results = probe([x] if len(model.inputs) == 1 else x, training=training)
        if not isinstance(results, (list, tuple)):
            results = [results]
        results = [_to_numpy(r) for r in results]
        for layer in bn_layers:
            states[id(layer)].running_mean_after = _to_numpy(layer.moving_mean).copy()
            states[id(layer)].running_var_after = _to_numpy(layer.moving_variance).copy()
            if states[id(layer)].renorm:
                states[id(layer)].renorm_after = (_to_numpy(layer.renorm_mean).copy(),
                                                  _to_numpy(layer.renorm_stddev).copy())
    finally:
        if training:
            for v, value in zip(model.weights, saved, strict=True):
                v.assign(value)
        for layer, rate in dropout_rates:
            layer.rate = rate

    n = len(groups)
    flat_shapes = dict(zip(flatten_inputs, (r.shape for r in results[n : n + len(flatten_inputs)]), strict=True))
    entries = []
    for (group_layers, kind, _), out in zip(groups, results[:n], strict=True):
        first = group_layers[0]
        type_name = type(first).__name__
        act = _keras_activation_name(first)
        if act is not None and kind in ("conv", "dense"):
            type_name += f"({act})"
        for extra in group_layers[1:]:
            type_name += f"+{type(extra).__name__}"
        pre = flat_shapes.get(id(first))
        entry = _Entry(first.name, type_name, kind, out, _keras_canonical(out, kind, pre))
        entry.callables = list(group_layers)
        entry.pre_flatten_shape = pre
        if kind == "bn":
            entry.bn = states[id(first)]
        entries.append(entry)
    final = results[-1]
    if groups and groups[-1][2] is model.outputs[0]:  # e.g. a model ending in Flatten: C·H·W order
        final = entries[-1].canonical
    else:
        final = _to_layout(final, "keras", "torch")
    return entries, final, model


def _trace(model, framework: str, x: np.ndarray, training: bool):
    if framework == "torch":
        return _trace_torch(model, x, training)
    return _trace_keras(model, x, training)


def _rerun(entry: _Entry, framework: str, x: np.ndarray) -> np.ndarray:
    """Run an entry's layers (e.g. a Linear and its ReLU) on ``x`` given in its framework's layout."""
    if framework == "torch":
        import torch

        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x))
            for m in entry.callables:
                t = m(t)
        return _to_numpy(t)
    y = x
    for layer in entry.callables:
        y = layer(y)
    return _to_numpy(y)


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------


def _diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max abs diff, max rel diff, diverges) of two arrays; shapes must hold the same values."""
    if a.shape != b.shape:
        squeeze_a = tuple(s for s in a.shape if s != 1)
        squeeze_b = tuple(s for s in b.shape if s != 1)
        if squeeze_a != squeeze_b:
            return math.inf, math.inf, True
        a, b = a.reshape(squeeze_a), b.reshape(squeeze_b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if a64.size == 0:
        return 0.0, 0.0, False
    abs_diff = np.abs(a64 - b64)
    scale = np.maximum(np.abs(a64), np.abs(b64))
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_nonfinite = ~finite & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    abs_diff = np.where(same_nonfinite, 0.0, np.where(finite, abs_diff, np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, abs_diff / np.where(scale > 0, scale, 1.0), 0.0)
    diverges = bool(np.any(abs_diff > atol + rtol * np.where(np.isfinite(scale), scale, 0.0)))
    return float(abs_diff.max()), float(rel.max()), diverges


def _align(entries_a: list[_Entry], entries_b: list[_Entry]):
    matcher = difflib.SequenceMatcher(None, [e.token for e in entries_a], [e.token for e in entries_b], autojunk=False)
    pairs = []
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            pairs.append((block.a + k, block.b + k))
    return pairs


def compare(
    model_a,
    model_b,
    inputs,
    training: bool = False,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> CompareReport:
    """Run ``model_a`` and ``model_b`` on ``inputs`` and report where and why they disagree.

    Args:
        model_a, model_b: a ``torch.nn.Module`` or a ``keras.Model`` each, any pairing.
        inputs: one batch in ``model_a``'s layout (NCHW for PyTorch, NHWC for Keras); the
            channel axis of a rank-3/4/5 input is moved for a model of the other framework.
        training: ``False`` compares inference: Keras models are called with
            ``training=False`` and PyTorch modules run in the mode they are in (a module left
            in ``train()`` is reported as ``training-mode``). ``True`` compares one training
            forward pass: Keras with ``training=True``, PyTorch after ``.train()``; the running
            statistics after the step are compared too. Dropout is disabled in both.
        atol, rtol: a pair of outputs diverges where ``|a - b| > atol + rtol * max(|a|, |b|)``.
            The defaults suit float32: one rounding step is ~6e-8 relative, and a few layers of
            reordered sums stay well below 1e-4.

    Neither model is changed: PyTorch runs on a deep copy, Keras weights are restored.
    """
    framework_a, framework_b = _framework(model_a), _framework(model_b)
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be non-negative, got atol={atol!r}, rtol={rtol!r}")
    x_a = np.asarray(_to_numpy(inputs))
    if not np.issubdtype(x_a.dtype, np.floating):
        raise TypeError(f"inputs must be floating point, got dtype {x_a.dtype}")
    if x_a.ndim < 2:
        raise ValueError(f"inputs must have a batch dimension and at least one more, got shape {x_a.shape}")
    x_a = np.ascontiguousarray(x_a.astype(np.float32) if x_a.dtype == np.float64 else x_a)
    x_b = _to_layout(x_a, framework_a, framework_b)

    entries_a, out_a, run_a = _trace(model_a, framework_a, x_a, training)
    entries_b, out_b, run_b = _trace(model_b, framework_b, x_b, training)

    rows: list[LayerDiff] = []
    bn_pairs: list[BatchNormPair] = []
    pairs = _align(entries_a, entries_b)
    for i, (ia, ib) in enumerate(pairs):
        ea, eb = entries_a[ia], entries_b[ib]
        max_abs, max_rel, diverges = _diff(ea.canonical, eb.canonical, atol, rtol)
        if diverges and ea.kind == "flatten" and framework_a != framework_b:
            # a PyTorch port may permute to channels-last before flattening, as Keras does:
            # then both flatten H·W·C, and its Linear takes Keras' order unchanged
            raw = _diff(ea.raw, eb.raw, atol, rtol)
            if not raw[2]:
                max_abs, max_rel, diverges = raw
                for e in (ea, eb):
                    e.flat_order = "hwc"
        row = LayerDiff(
            i,
            ea.name,
            eb.name,
            ea.type,
            eb.type,
            ea.kind,
            tuple(ea.canonical.shape),
            max_abs,
            max_rel,
            diverges,
        )
        if ea.bn is not None and eb.bn is not None:
            _compare_running_stats(row, ea.bn, eb.bn, atol, rtol, training)
            bn_pairs.append(BatchNormPair(row, ea.bn, eb.bn))
        rows.append(row)
    out_abs, out_rel, out_div = _diff(
        out_a,
        out_b,
        atol,
        rtol,  # both already in PyTorch's layout
    )
    matched_a = {ia for ia, _ in pairs}
    matched_b = {ib for _, ib in pairs}
    report = CompareReport(
        framework_a=framework_a,
        framework_b=framework_b,
        name_a=_model_name(model_a, framework_a),
        name_b=_model_name(model_b, framework_b),
        input_shape=tuple(x_a.shape),
        training=bool(training),
        atol=float(atol),
        rtol=float(rtol),
        rows=rows,
        output_max_abs_diff=out_abs,
        output_max_rel_diff=out_rel,
        output_diverges=out_div,
        causes=[],
        unmatched_a=[e.name for k, e in enumerate(entries_a) if k not in matched_a],
        unmatched_b=[e.name for k, e in enumerate(entries_b) if k not in matched_b],
        batch_norms=bn_pairs,
    )
    if not report.agree:
        context = _Context(framework_a, framework_b, entries_a, entries_b, pairs, atol, rtol, training)
        report.causes = _find_causes(report, context)
    return report


def _model_name(model, framework: str) -> str:
    if framework == "keras":
        return str(model.name)
    return type(model).__name__


def _compare_running_stats(row: LayerDiff, a: BatchNormState, b: BatchNormState, atol, rtol, training):
    """After a training step, compare the updated running statistics of a BN pair."""
    if not training:
        return
    if a.tracks_running_stats != b.tracks_running_stats:  # one side keeps none: they cannot agree
        row.running_stats_diverge = True
        return
    if not a.tracks_running_stats:
        return
    if a.running_mean_after is None or b.running_mean_after is None:
        return
    mean_abs, _, mean_div = _diff(a.running_mean_after, b.running_mean_after, atol, rtol)
    var_abs, _, var_div = _diff(a.running_var_after, b.running_var_after, atol, rtol)
    row.running_mean_abs_diff = mean_abs
    row.running_var_abs_diff = var_abs
    row.running_stats_diverge = bool(mean_div or var_div)
    if a.renorm_after is not None and b.renorm_after is not None:  # the statistics r and d are taken from
        pairs = zip(a.renorm_after, b.renorm_after, strict=True)
        row.running_stats_diverge |= any(_diff(x, y, atol, rtol)[2] for x, y in pairs)
    # One step moves the running statistics by only w (the new-batch weight, 0.01 for Keras'
    # default) times the difference, but they converge to what each side folds in: compare the
    # batch statistics folded in, (after - (1 - w) * before) / w, too.
    folded = [_folded_batch_stats(s) for s in (a, b)]
    if folded[0] is not None and folded[1] is not None:
        for k in range(2):
            x, y = folded[0][k], folded[1][k]
            # rounding of after/before (float32) is amplified by 1/w
            slack = 4 * np.finfo(np.float32).eps * max(folded[0][2], folded[1][2])
            if _diff(x, y, atol + slack, rtol)[2]:
                row.running_stats_diverge = True


def _folded_batch_stats(s: BatchNormState):
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


# --------------------------------------------------------------------------------------------
# causes
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    framework_a: str
    framework_b: str
    entries_a: list[_Entry]
    entries_b: list[_Entry]
    pairs: list[tuple[int, int]]
    atol: float
    rtol: float
    training: bool


def _side(state: BatchNormState, label: str) -> str:
    return f"model {label} ({state.framework})"


def _describe_momentum(s: BatchNormState) -> str:
    if s.momentum is None:
        return "momentum=None (cumulative average)"
    return f"momentum={s.momentum:g} (weight {s.new_weight:g} on the new batch)"


def _find_causes(report: CompareReport, ctx: _Context) -> list[Cause]:
    found: dict[str, Cause] = {}

    def add(code: str, explanation: str, layer: str, evidence: str = "") -> None:
        cause = found.setdefault(code, Cause(code, explanation, [], evidence))
        if layer not in cause.layers:
            cause.layers.append(layer)

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
                    else "it was called in training mode"
                )
                other_why = (
                    "stays in eval() mode (its train() is overridden or it was put back in eval())"
                    if other.framework == "torch" and ctx.training
                    else "uses its running statistics"
                )
                fix = (
                    "call model.eval() on the PyTorch module before inference"
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
        if output_differs and not math.isclose(a.eps, b.eps, rel_tol=1e-6, abs_tol=0.0):
            add(
                "eps",
                f"{name}: eps is {a.eps:g} in model A ({a.framework}) and {b.eps:g} in model B "
                f"({b.framework}) (PyTorch's default is {TORCH.eps:g}, Keras' {KERAS.eps:g}); the outputs "
                "differ by about (eps_a - eps_b) / (2 var) relative. Set the same eps on both sides.",
                name,
                "config: eps differs and the layer's outputs differ",
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
                    "is the weight of the new batch (run = (1-m)·run + m·batch), Keras' the weight of "
                    "the old "
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

    _find_layout(report, ctx, add)
    explained = {name for cause in found.values() for name in cause.layers}
    _find_weights(report, ctx, add, explained)
    if not found:
        first = report.first_divergence
        add(
            "unexplained",
            "the models disagree but none of the known causes applies"
            + (f"; the first divergence is at {first.name}" if first else "; only the final outputs differ"),
            first.name if first else "output",
        )
    order = list(CAUSES)
    return sorted(found.values(), key=lambda c: order.index(c.code))


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
    folded_a, folded_b = _folded_batch_stats(a), _folded_batch_stats(b)
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


def _find_layout(report: CompareReport, ctx: _Context, add) -> None:
    """Flatten → Dense pairs whose flatten outputs agree but whose dense outputs do not:
    re-run each side's dense layer on the other framework's flatten order."""
    if ctx.framework_a == ctx.framework_b:
        return
    for k in range(len(ctx.pairs) - 1):
        (ia, ib), (ja, jb) = ctx.pairs[k], ctx.pairs[k + 1]
        fa, fb = ctx.entries_a[ia], ctx.entries_b[ib]
        da, db = ctx.entries_a[ja], ctx.entries_b[jb]
        if fa.kind != "flatten" or da.kind != "dense" or ja != ia + 1 or jb != ib + 1:
            continue
        flat_row, dense_row = report.rows[k], report.rows[k + 1]
        if flat_row.diverges or not dense_row.diverges:
            continue
        # the flatten outputs agree in one order: does a dense layer expect the other order?
        confirmed = False
        try:
            alt_b = _rerun(db, ctx.framework_b, _other_flatten_order(fb, ctx.framework_b))
            alt_a = _rerun(da, ctx.framework_a, _other_flatten_order(fa, ctx.framework_a))
            confirmed = (
                not _diff(alt_b, da.raw, ctx.atol, ctx.rtol)[2] or not _diff(alt_a, db.raw, ctx.atol, ctx.rtol)[2]
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


def _other_flatten_order(entry: _Entry, framework: str) -> np.ndarray:
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


def _find_weights(report: CompareReport, ctx: _Context, add, explained: set[str]) -> None:
    """The first divergence, when it is a convolution or dense layer whose inputs (the previous
    pair) agree and that no other cause explains."""
    for k, row in enumerate(report.rows):
        if not row.differs:
            continue
        if row.name in explained:
            return
        if row.kind in ("conv", "dense") and (k == 0 or not report.rows[k - 1].differs):
            if k > 0 and row.kind == "dense" and _same_output_on_the_same_input(ctx, k):
                # its parameters agree: the inputs' differences, each within tolerance, add up in its sums
                add(
                    "unexplained",
                    f"{row.name}: fed the same input, the {row.type_a} and the {row.type_b} give the same "
                    "output up to float32 rounding of their long sums (summed in another order in each "
                    "framework), so their parameters agree; with the small differences of the layers "
                    "before it, that exceeds the tolerance. Compare with a larger atol/rtol.",
                    row.name,
                    "experiment: model B's layer fed model A's input reproduces model A's output within "
                    "the rounding of a sum of that many terms",
                )
                return
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
            add(
                "weights",
                f"{row.name}: this {row.type_a} / {row.type_b} gives different outputs although the layers "
                "before it agree: its parameters (or its padding, strides, activation) differ between "
                "the two "
                "models.",
                row.name,
                "observed: inputs agree, outputs differ",
            )
        return


def _kernel_axes_swapped(ctx: _Context, k: int) -> bool:
    """True when a Keras/PyTorch 2-D convolution pair's kernels are each other's transpose with
    the spatial axes swapped (the NHWC/NCHW porting slip ``kernel.transpose(3, 2, 1, 0)``)."""
    if {ctx.framework_a, ctx.framework_b} != {"keras", "torch"}:
        return False
    ia, ib = ctx.pairs[k]
    layers = {ctx.framework_a: ctx.entries_a[ia].callables[0], ctx.framework_b: ctx.entries_b[ib].callables[0]}
    kernel = getattr(layers["keras"], "kernel", None)
    weight = getattr(layers["torch"], "weight", None)
    if kernel is None or weight is None or len(kernel.shape) != 4:
        return False
    keras_kernel = _to_numpy(kernel)
    torch_weight = _to_numpy(weight)
    swapped = np.transpose(keras_kernel, (3, 2, 1, 0))
    right = np.transpose(keras_kernel, (3, 2, 0, 1))
    return (
        swapped.shape == torch_weight.shape
        and np.array_equal(swapped, torch_weight)
        and not (right.shape == torch_weight.shape and np.array_equal(right, torch_weight))
    )


def _same_output_on_the_same_input(ctx: _Context, k: int) -> bool:
    """Experiment: model B's dense layer of pair ``k``, fed model A's output of the entry just before
    it (moved to B's layout and flatten order), reproduces model A's output of pair ``k`` within the
    tolerance plus the float32 rounding of a sum of ``K`` terms (fan-in ``K``): about
    ``sqrt(K) * eps`` of the outputs' scale, with a margin of 8. Different weights give differences
    of the outputs' own size."""
    (ia, ib), (pa, pb) = ctx.pairs[k], ctx.pairs[k - 1]
    if pa != ia - 1 or pb != ib - 1:  # the previous pair does not directly feed this one
        return False
    prev, layer_a, layer_b = ctx.entries_a[pa], ctx.entries_a[ia], ctx.entries_b[ib]
    if ctx.framework_a == ctx.framework_b or prev.flat_order == "hwc":
        x = prev.raw
    elif prev.kind == "flatten":
        x = prev.canonical if ctx.framework_b == "torch" else _other_flatten_order(prev, "torch")
    else:
        x = _to_layout(prev.canonical, "torch", ctx.framework_b)
    try:
        out = _rerun(layer_b, ctx.framework_b, np.ascontiguousarray(x))
    except Exception:  # noqa: BLE001 - an experiment that cannot run confirms nothing
        return False
    if ctx.framework_b == "keras":
        out = _to_layout(out, "keras", "torch")
    fan_in = x.shape[-1]
    scale = float(np.max(np.abs(layer_a.canonical))) if layer_a.canonical.size else 0.0
    rounding = 8 * math.sqrt(fan_in) * float(np.finfo(np.float32).eps) * scale
    return not _diff(out, layer_a.canonical, ctx.atol + rounding, ctx.rtol)[2]
