"""PyTorch side of :func:`bnkit.fold_bn`: torch.fx graph, nn.Sequential fallback."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from bnkit.lifecycle._torch_bn import (
    _BatchNorm,
    batchnorms,
    display_name,
    inference_scale_shift,
    num_channels,
    replace_module,
    require_running_stats,
)
from bnkit.lifecycle.fold import FoldDecision
from bnkit.torch.affine import ChannelAffine
from bnkit.torch.frozen import is_batch_norm, is_torchvision_frozen
from bnkit.torch.tracing import BatchNormLeafTracer

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE = _CONV + _CONV_TRANSPOSE + (nn.Linear,)


class _Tracer(BatchNormLeafTracer):
    """Keeps batch norms (bnkit's too), ChannelAffine and the layers they fold into as graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ChannelAffine,) + FOLDABLE) or super().is_leaf_module(m, qualname)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def fold_into(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``layer`` followed by ``z * scale + shift`` (per output channel) becomes ``layer`` alone."""
    with torch.no_grad():
        weight = layer.weight.detach().double()
        if isinstance(layer, _CONV_TRANSPOSE):
            # weight is (in, out / groups, *kernel): output channel g * (out / groups) + j lives
            # at [rows of group g, j]
            groups, rows, per_group = layer.groups, weight.shape[0], weight.shape[1]
            kernel = weight.shape[2:]
            grouped = weight.reshape(groups, rows // groups, per_group, *kernel)
            grouped = grouped * scale.reshape(groups, 1, per_group, *(1,) * len(kernel))
            weight = grouped.reshape(weight.shape)
        else:  # Conv: (out, in / groups, *kernel); Linear: (out, in)
            weight = weight * scale.reshape(-1, *(1,) * (weight.ndim - 1))
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
        bias = bias * scale + shift
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(
                bias.to(device=layer.weight.device, dtype=layer.weight.dtype),
                requires_grad=layer.weight.requires_grad,
            )
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


class FoldedIntoLinear(nn.Identity):
    """Where a batch norm was folded into the ``Linear`` before it on the assumption, not checked
    (no ``example_inputs``), that its input is ``(N, C)``: the identity there, and an error on
    ``(N, C, L)``, where the ``Linear`` maps ``L`` and the batch norm normalised ``C``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        # built here: forward stays scriptable (TorchScript has no f-string conversions)
        self.message = (
            f"bnkit.fold_bn folded the batch norm {name!r} into the Linear before it, taking its input to "
            "be (N, C), where alone that is right; fold again with example_inputs=(x,) so that shapes "
            "are checked. Got input shape "
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.ndim != 2:
            raise ValueError(self.message + str(list(input.shape)))
        return input

    def extra_repr(self) -> str:
        return repr(self.name)


def _folded(name: str, unchecked_linear: bool) -> nn.Module:
    """What takes a folded batch norm's place: ``nn.Identity``, guarded where the fold assumed (N, C)."""
    return FoldedIntoLinear(name) if unchecked_linear else nn.Identity()


def _affine_for(bn: _BatchNorm) -> ChannelAffine:
    scale, shift = inference_scale_shift(bn)
    # at least float32: a half batch norm computes in float32, and so does ChannelAffine
    dtype = torch.promote_types(bn.running_mean.dtype, torch.float32)
    return ChannelAffine(scale.to(dtype), shift.to(dtype))


def fold_torch(model: nn.Module, *, example_inputs=None) -> tuple[nn.Module, list[FoldDecision]]:
    found = batchnorms(model, torchvision_frozen=True)
    for name, bn in found:
        require_running_stats(name, bn, "fold")
    model = copy.deepcopy(model).eval()
    if is_batch_norm(model):
        reason = "the model is the batch norm itself: there is no layer to fold it into"
        return _affine_for(model), [_decision("", model, "affine", reason=reason)]
    try:
        graph_module = torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as error:  # torch.fx raises many kinds for untraceable Python
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            "bnkit.fold_bn folds only the batch norms that directly follow a Conv/ConvTranspose/Linear "
            "inside an nn.Sequential and replaces the others by ChannelAffine",
            stacklevel=3,
        )
        return _fold_sequential(model, f"torch.fx could not trace {type(model).__name__} ({type(error).__name__})")
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*example_inputs)
    read = _read_as_tensors(graph_module)
    plan, reasons = _plan(graph_module, read, shapes_known=example_inputs is not None)
    # The graph only decides; the deep copy keeps its own class and forward, with each batch
    # norm swapped for nn.Identity (folded) or a ChannelAffine (not foldable).
    decisions = []
    for name, bn in batchnorms(model, torchvision_frozen=True):
        if name in read:
            warnings.warn(
                f"{display_name(name, bn)} is not only called: forward reads its tensors directly "
                "(e.g. F.batch_norm(x, self.bn.running_mean, ...)), so it is left as it is",
                stacklevel=3,
            )
            reason = "forward reads its tensors directly (F.batch_norm(x, self.bn.running_mean, ...))"
            decisions.append(_decision(name, bn, "kept", reason=reason))
            continue
        producers = plan.get(name)
        if producers:
            scale, shift = inference_scale_shift(bn)
            for producer in producers:
                fold_into(model.get_submodule(producer), scale, shift)
            linear = any(isinstance(model.get_submodule(p), nn.Linear) for p in producers)
            model = replace_module(model, name, _folded(name, linear and example_inputs is None))
            decisions.append(_decision(name, bn, "folded", into=producers))
        else:
            model = replace_module(model, name, _affine_for(bn))
            reason = reasons.get(name, "forward never calls it, so no layer before it is known")
            decisions.append(_decision(name, bn, "affine", reason=reason))
    return model, decisions


def _decision(name: str, bn: nn.Module, outcome: str, *, into=(), reason: str = "") -> FoldDecision:
    return FoldDecision(name=name, type=type(bn).__name__, outcome=outcome, into=tuple(into), reason=reason)


def _layer(name: str, module: nn.Module) -> str:
    return f"{type(module).__name__} {name!r}"


def _computes_plainly(layer: nn.Module) -> bool:
    """The layer's output is its ``weight``/``bias`` applied, nothing recomputed or changed around it:
    a parametrization (``weight_norm``, ``spectral_norm``) rebuilds ``weight`` at every call, and a
    forward (pre-)hook (old-style ``weight_norm``, user hooks) may rewrite weight, input or output."""
    return not parametrize.is_parametrized(layer) and not layer._forward_hooks and not layer._forward_pre_hooks


def _pair_problem(name: str, layer: nn.Module, bn: _BatchNorm, output_ndim: int | None) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (the layer whose output it normalises), or ``None``."""
    if not isinstance(layer, FOLDABLE):
        return f"its input is the output of {_layer(name, layer)}, not of a Conv/ConvTranspose/Linear"
    if _out_channels(layer) != num_channels(bn):
        return f"{_layer(name, layer)} has {_out_channels(layer)} output channels, the batch norm {num_channels(bn)}"
    if parametrize.is_parametrized(layer):
        return f"{_layer(name, layer)} has a parametrization (weight_norm, spectral_norm...) that rebuilds its weight"
    if not _computes_plainly(layer):
        return f"{_layer(name, layer)} has forward hooks, which may change its input, weight or output"
    if isinstance(layer, nn.Linear):
        # Linear maps the last axis, a batch norm normalises axis 1: they agree only on (N, C)
        if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)) or is_torchvision_frozen(bn):
            return (
                f"{_layer(name, layer)} maps the last axis of its input, {type(bn).__name__} normalises axis 1 "
                "of a 4-D or 5-D one"
            )
        if output_ndim is not None and output_ndim != 2:
            return (
                f"the output of {_layer(name, layer)} is {output_ndim}-D: the Linear maps its last axis, the "
                "batch norm normalises axis 1"
            )
    return None


def _foldable_pair(layer: nn.Module, bn: _BatchNorm, output_ndim: int | None) -> bool:
    return _pair_problem("", layer, bn, output_ndim) is None


def _read_as_tensors(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the modules whose parameters or buffers ``forward`` reads directly (``get_attr``
    nodes, e.g. ``F.conv2d(x, self.conv.weight)``): folding would change what those reads see."""
    read = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not all(_asks_metadata(user) for user in node.users):
            parts = node.target.split(".")
            read.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return read


def _asks_metadata(node: torch.fx.Node) -> bool:
    """``self.conv.weight.dtype``, ``.shape``, ``.size()``: what folding leaves as it is."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_method" and node.target in ("size", "dim")


def _plan(gm: torch.fx.GraphModule, read: set[str], *, shapes_known: bool):
    """``batch norm name -> the layers it folds into`` for the batch norms foldable at every call,
    and ``batch norm name -> why not`` for the others."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    plan: dict[str, list[str] | None] = {}
    reasons: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_batch_norm(modules[node.target]):
            continue
        bn = modules[node.target]
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        ndim = None
        if shapes_known and isinstance(source, torch.fx.Node) and "tensor_meta" in source.meta:
            ndim = len(source.meta["tensor_meta"].shape)
        problem = _source_problem(node, source, modules, calls, read, bn, ndim)
        sites = plan.setdefault(node.target, [])
        if problem is not None:
            if node.target not in reasons:
                prefix = f"at one of its {calls[node.target]} calls, " if calls[node.target] > 1 else ""
                reasons[node.target] = prefix + problem
            plan[node.target] = None  # a batch norm is one module: every call must fold, or none
        elif sites is not None and source.target not in sites:
            sites.append(source.target)
    return {name: sites for name, sites in plan.items() if sites}, reasons


def _source_problem(node, source, modules, calls, read, bn, ndim) -> str | None:
    """Why the batch norm called at ``node`` cannot fold into what computes its input, or ``None``."""
    if source is None:
        return "it is called with more than its input"
    if not isinstance(source, torch.fx.Node):
        return "its input is a constant, not a layer's output"
    if source.op == "placeholder":
        return "its input is the model's input: no layer comes before it"
    if source.op != "call_module":
        what = f"the tensor method .{source.target}()" if source.op == "call_method" else _function(source)
        return f"its input is computed by {what}, not by a Conv/ConvTranspose/Linear module"
    name, layer = source.target, modules[source.target]
    problem = _pair_problem(name, layer, bn, ndim)
    if problem is not None and not isinstance(layer, FOLDABLE):
        before = source.args[0] if source.args else None
        called = isinstance(before, torch.fx.Node) and before.op == "call_module"
        layer_before = modules[before.target] if called else None
        if isinstance(layer_before, FOLDABLE):
            problem += (
                f" ({type(layer).__name__} sits between {_layer(before.target, layer_before)} and "
                "the batch norm; folding needs the batch norm right after that layer)"
            )
        return problem
    if len(source.users) > 1:
        others = [_reader(user, modules) for user in source.users if user is not node]
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (
            f"the output of {_layer(name, layer)} is also used by {shown}, which would see the folded values "
            "(a residual or skip connection?)"
        )
    if calls[name] > 1:
        return f"{_layer(name, layer)} is called {calls[name]} times (shared weights): folding would change every call"
    if name in read:
        return f"forward reads the tensors of {_layer(name, layer)} directly (e.g. F.conv2d(x, self.conv.weight))"
    return problem


def _function(node: torch.fx.Node) -> str:
    target = node.target
    module = getattr(target, "__module__", None) or ""
    aliases = {"torch._C._nn": "F", "torch.nn.functional": "F", "torch._C._VariableFunctions": "torch"}
    short = aliases.get(module, module)
    return f"{short + '.' if short else ''}{getattr(target, '__name__', str(target))}()"


def _reader(node: torch.fx.Node, modules) -> str:
    if node.op == "call_module":
        return _layer(node.target, modules[node.target])
    if node.op == "output":
        return "the model's output"
    if node.op == "call_method":
        return f".{node.target}()"
    return _function(node)


def _fold_sequential(model: nn.Module, untraced: str) -> tuple[nn.Module, list[FoldDecision]]:
    # a layer or batch norm registered under a second name may be called from there as well
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules()}
    folded: dict[int, FoldDecision] = {}
    problems: dict[int, str] = {}
    for parent in list(model.modules()):
        if type(parent) is not nn.Sequential:
            continue
        children = list(parent._modules.items())
        for (_, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not is_batch_norm(bn):
                continue
            problem = _pair_problem(names.get(id(layer), ""), layer, bn, None)
            if problem is None and registrations[id(layer)] == registrations[id(bn)] == 1:
                fold_into(layer, *inference_scale_shift(bn))
                parent._modules[bn_name] = _folded(bn_name, isinstance(layer, nn.Linear))
                folded[id(bn)] = _decision(names[id(bn)], bn, "folded", into=[names[id(layer)]])
            else:
                problems[id(bn)] = problem or "it or the layer before it is registered under several names"
    decisions = list(folded.values())
    for name, bn in batchnorms(model, torchvision_frozen=True):
        reason = problems.get(id(bn), "it does not follow a Conv/ConvTranspose/Linear inside an nn.Sequential")
        decisions.append(_decision(name, bn, "affine", reason=f"{untraced}, so only an nn.Sequential's order "
                                                                  f"is known, and {reason}"))
        model = replace_module(model, name, _affine_for(bn))
    return model, decisions
