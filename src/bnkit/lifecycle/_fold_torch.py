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
    replace_module,
    require_running_stats,
)
from bnkit.torch.affine import ChannelAffine
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


def fold_torch(model: nn.Module, *, example_inputs=None) -> nn.Module:
    found = batchnorms(model)
    for name, bn in found:
        require_running_stats(name, bn, "fold")
    model = copy.deepcopy(model).eval()
    if isinstance(model, _BatchNorm):
        return _affine_for(model)
    try:
        graph_module = torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as error:  # torch.fx raises many kinds for untraceable Python
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            "bnkit.fold_bn folds only the batch norms that directly follow a Conv/ConvTranspose/Linear "
            "inside an nn.Sequential and replaces the others by ChannelAffine",
            stacklevel=3,
        )
        return _fold_sequential(model)
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*example_inputs)
    read = _read_as_tensors(graph_module)
    plan = _plan(graph_module, read, shapes_known=example_inputs is not None)
    # The graph only decides; the deep copy keeps its own class and forward, with each batch
    # norm swapped for nn.Identity (folded) or a ChannelAffine (not foldable).
    for name, bn in batchnorms(model):
        if name in read:
            warnings.warn(
                f"{display_name(name, bn)} is not only called: forward reads its tensors directly "
                "(e.g. F.batch_norm(x, self.bn.running_mean, ...)), so it is left as it is",
                stacklevel=3,
            )
            continue
        producers = plan.get(name)
        if producers:
            scale, shift = inference_scale_shift(bn)
            for producer in producers:
                fold_into(model.get_submodule(producer), scale, shift)
            linear = any(isinstance(model.get_submodule(p), nn.Linear) for p in producers)
            model = replace_module(model, name, _folded(name, linear and example_inputs is None))
        else:
            model = replace_module(model, name, _affine_for(bn))
    return model


def _computes_plainly(layer: nn.Module) -> bool:
    """The layer's output is its ``weight``/``bias`` applied, nothing recomputed or changed around it:
    a parametrization (``weight_norm``, ``spectral_norm``) rebuilds ``weight`` at every call, and a
    forward (pre-)hook (old-style ``weight_norm``, user hooks) may rewrite weight, input or output."""
    return not parametrize.is_parametrized(layer) and not layer._forward_hooks and not layer._forward_pre_hooks


def _foldable_pair(layer: nn.Module, bn: _BatchNorm, output_ndim: int | None) -> bool:
    if not isinstance(layer, FOLDABLE) or _out_channels(layer) != bn.num_features:
        return False
    if not _computes_plainly(layer):
        return False
    if isinstance(layer, nn.Linear):
        # Linear maps the last axis, a batch norm normalises axis 1: they agree only on (N, C)
        if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)):
            return False  # 4-D / 5-D input, even when its last axis has C entries
        if output_ndim is not None and output_ndim != 2:
            return False  # (N, C, L) with C = out_features would normalise the wrong axis
    return True


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


def _plan(gm: torch.fx.GraphModule, read: set[str], *, shapes_known: bool) -> dict[str, list[str]]:
    """``batch norm name -> the layers it folds into``, for batch norms foldable at every call."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    plan: dict[str, list[str] | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        ndim = None
        if shapes_known and isinstance(source, torch.fx.Node) and "tensor_meta" in source.meta:
            ndim = len(source.meta["tensor_meta"].shape)
        foldable = (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1  # nothing else reads the un-normalised output
            and calls[source.target] == 1  # a layer called twice would fold for both calls
            and source.target not in read  # nor may its weight be read elsewhere
            and _foldable_pair(modules[source.target], bn, ndim)
        )
        sites = plan.setdefault(node.target, [])
        if sites is None or not foldable:
            plan[node.target] = None  # a batch norm is one module: every call must fold, or none
        elif source.target not in sites:
            sites.append(source.target)
    return {name: sites for name, sites in plan.items() if sites}


def _fold_sequential(model: nn.Module) -> nn.Module:
    # a layer or batch norm registered under a second name may be called from there as well
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for parent in list(model.modules()):
        if type(parent) is not nn.Sequential:
            continue
        children = list(parent._modules.items())
        for (_, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if (
                isinstance(bn, _BatchNorm)
                and _foldable_pair(layer, bn, None)
                and registrations[id(layer)] == registrations[id(bn)] == 1
            ):
                fold_into(layer, *inference_scale_shift(bn))
                parent._modules[bn_name] = _folded(bn_name, isinstance(layer, nn.Linear))
    for name, bn in batchnorms(model):
        model = replace_module(model, name, _affine_for(bn))
    return model
