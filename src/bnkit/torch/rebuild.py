"""Rebuild real ``torch.nn`` layers from a ``torch.export`` program.

``torch.export.unflatten`` restores the module hierarchy, but each leaf is an anonymous
sub-program. For the layers bnkit reasons about (convolutions, linear, batch norms,
activations, pooling, flatten, dropout) the original class is in the nodes'
``nn_module_stack`` and its settings are the operator's arguments, so the layer can be
constructed again and given the exported parameters and buffers. bnkit's own batch norms
keep their convention through the metadata :func:`layer_metadata` stores beside the program.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import fx, nn

from bnkit.torch.eager_ops import eager_graph
from bnkit.torch.rebuild_tensors import build_layer, unflatten_sharing

__all__ = ["rebuild_exported", "layer_metadata"]


def layer_metadata(model: nn.Module) -> dict:
    """What an eval-mode export loses: every batch norm's momentum (``None`` included) and
    the convention of bnkit's batch norms."""
    meta = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            convention = getattr(module, "convention", None)
            meta[name] = {"convention": convention and convention.name, "momentum": module.momentum}
    return meta


def _call(sub: nn.Module):
    """The single operator call of a leaf sub-program (None if it has no or several)."""
    calls = [n for n in sub.graph.nodes if n.op == "call_function"]
    return calls[0] if len(calls) == 1 else None


def _tensor(sub: nn.Module, name: str):
    """The sub-program's tensor ``name`` itself (no copy: see :func:`build_layer`), or None."""
    value = getattr(sub, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _arg(node, index: int, default):
    return node.args[index] if node is not None and len(node.args) > index else default


def _conv(cls, sub, node):
    weight, bias = _tensor(sub, "weight"), _tensor(sub, "bias")
    stride, padding = _arg(node, 3, 1), _arg(node, 4, 0)
    dilation, groups = _arg(node, 5, 1), _arg(node, 6, 1)
    out_channels, in_per_group, *kernel = weight.shape
    make = functools.partial(cls, in_per_group * groups, out_channels, tuple(kernel), stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
    return make, {"weight": weight, "bias": bias}


def _conv_transpose(cls, sub, node):
    weight, bias = _tensor(sub, "weight"), _tensor(sub, "bias")
    stride, padding, output_padding = _arg(node, 3, 1), _arg(node, 4, 0), _arg(node, 5, 0)
    groups, dilation = _arg(node, 6, 1), _arg(node, 7, 1)
    in_channels, out_per_group, *kernel = weight.shape
    make = functools.partial(cls, in_channels, out_per_group * groups, tuple(kernel), stride=stride,
                              padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
                              bias=bias is not None)
    return make, {"weight": weight, "bias": bias}


def _linear(cls, sub, node):
    weight, bias = _tensor(sub, "weight"), _tensor(sub, "bias")
    make = functools.partial(cls, weight.shape[1], weight.shape[0], bias=bias is not None)
    return make, {"weight": weight, "bias": bias}


def _batchnorm(cls, sub, node, meta):
    import bnkit.torch as bt

    weight, bias = _tensor(sub, "weight"), _tensor(sub, "bias")
    running_mean, running_var = _tensor(sub, "running_mean"), _tensor(sub, "running_var")
    reference = next(t for t in (running_mean, weight, bias) if t is not None) if node else None
    if reference is None:
        raise ValueError("a batch norm without parameters or running statistics cannot be rebuilt")
    eps, momentum = float(_arg(node, 7, 1e-5)), _arg(node, 6, 0.1)
    kwargs = {"affine": weight is not None, "track_running_stats": running_mean is not None}
    if weight is not None and bias is None:
        kwargs["bias"] = False
    if meta:
        momentum = meta["momentum"]
    if meta and meta.get("convention"):  # a bnkit layer
        cls = getattr(bt, cls.__name__, bt.BatchNorm2d)
        make = functools.partial(cls, reference.numel(), eps, momentum, convention=meta["convention"], **kwargs)
    else:
        make = functools.partial(cls, reference.numel(), eps, momentum, **kwargs)
    state = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var,
             "num_batches_tracked": _tensor(sub, "num_batches_tracked")}
    return make, state


# the aten pooling operators' arguments after the input, in order, with their defaults
_MAX_POOL = (("kernel_size", 2), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False))
_AVG_POOL = (("kernel_size", 2), ("stride", None), ("padding", 0), ("ceil_mode", False), ("count_include_pad", True))


def _pool_args(node, names: tuple) -> dict:
    args = {name: _arg(node, i + 1, default) for i, (name, default) in enumerate(names)}
    if not args["stride"]:  # aten's empty stride means "the kernel size"
        args["stride"] = None
    return args


def _simple(factory):
    return lambda cls, sub, node: (functools.partial(factory, cls, node), {})


_ACTIVATIONS = {
    nn.ReLU: lambda cls, node: cls(),
    nn.Sigmoid: lambda cls, node: cls(),
    nn.Tanh: lambda cls, node: cls(),
    nn.SiLU: lambda cls, node: cls(),
    nn.Identity: lambda cls, node: cls(),
    nn.GELU: lambda cls, node: cls(approximate=(node.kwargs.get("approximate", "none") if node else "none")),
    nn.ELU: lambda cls, node: cls(alpha=float(_arg(node, 1, 1.0))),
    nn.LeakyReLU: lambda cls, node: cls(negative_slope=float(_arg(node, 1, 0.01))),
    nn.Softmax: lambda cls, node: cls(dim=_arg(node, 1, -1)),
    nn.Flatten: lambda cls, node: cls(start_dim=_arg(node, 1, 1), end_dim=_arg(node, 2, -1)),
    nn.Dropout: lambda cls, node: cls(p=float(_arg(node, 1, 0.5))),
    nn.MaxPool1d: lambda cls, node: cls(**_pool_args(node, _MAX_POOL)),
    nn.MaxPool2d: lambda cls, node: cls(**_pool_args(node, _MAX_POOL)),
    nn.AvgPool1d: lambda cls, node: cls(**_pool_args(node, _AVG_POOL)),
    nn.AvgPool2d: lambda cls, node: cls(**_pool_args(node, _AVG_POOL)),
    nn.AdaptiveAvgPool1d: lambda cls, node: cls(_arg(node, 1, 1)),
    nn.AdaptiveAvgPool2d: lambda cls, node: cls(_arg(node, 1, 1)),
}

_BUILDERS = {
    **{c: _conv for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{c: _conv_transpose for c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: _linear,
    **{c: _simple(f) for c, f in _ACTIVATIONS.items()},
}
_BATCHNORMS = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}


def _original_types(program) -> dict[str, str]:
    """Module path -> fully qualified class name, from the exported nodes' module stacks."""
    types = {}
    for node in program.graph.nodes:
        for path, type_name in node.meta.get("nn_module_stack", {}).values():
            if not isinstance(type_name, str):
                type_name = f"{type_name.__module__}.{type_name.__qualname__}"
            types[path] = type_name
    return types


def _class_for(type_name: str):
    short = type_name.rsplit(".", 1)[-1]
    if short in _BATCHNORMS and (type_name.startswith("torch.nn.") or type_name.startswith("bnkit.")):
        return "batchnorm", _BATCHNORMS[short]
    for cls in _BUILDERS:
        if type_name == f"{cls.__module__}.{cls.__qualname__}":
            return "builder", cls
    return None, None


def rebuild_exported(program, bnkit_layers: dict | None = None, bnkit_meta: dict | None = None) -> nn.Module:
    """An ``fx.GraphModule`` over the program's module hierarchy with known layers rebuilt.

    It is named after the exported model's class (``bnkit_meta["model"]``, stored by
    :func:`bnkit.io.save_model`) and remembers every layer's original class name in
    ``_bnkit_layer_types`` (path -> class name), for the layers left as ``InterpreterModule``."""
    bnkit_layers = bnkit_layers or {}
    try:
        with warnings.catch_warnings():
            # torch.export's own pytree code trips its own deprecation; nothing the user can act on
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            unflat = unflatten_sharing(program)  # torch.export.unflatten, without copying the weights
    except Exception as e:  # torch.export.unflatten fails on some hierarchies (torch 2.13)
        warnings.warn(
            f"torch.export.unflatten could not restore the module hierarchy ({type(e).__name__}: {e}); "
            "the program runs as flat operators, without its layers",
            RuntimeWarning,
            stacklevel=3,
        )
        return FlatProgram(program.module())
    types = _original_types(program)
    for path, type_name in types.items():
        kind, cls = _class_for(type_name)
        if kind is None:
            continue
        try:
            sub = unflat.get_submodule(path)
        except AttributeError:
            continue
        node = _call(sub)
        if kind == "batchnorm":
            make, state = _batchnorm(cls, sub, node, bnkit_layers.get(path))
        else:
            make, state = _BUILDERS[cls](cls, sub, node)
        layer = build_layer(make, state)
        layer.eval()
        _set_submodule(unflat, path, layer)
    graph = unflat.graph
    _eager_sub_programs(unflat, _plain_graph(graph, unflat))
    root_name = (bnkit_meta or {}).get("model") or "ExportedModel"
    module = fx.GraphModule(unflat, graph, class_name=root_name if root_name.isidentifier() else "ExportedModel")
    # the classes the program was exported from, for the layers left as sub-programs (summaries, compare)
    module._bnkit_layer_types = {path: type_name.rsplit(".", 1)[-1] for path, type_name in types.items()}
    return module.eval()


def _plain_graph(graph: fx.Graph, owner: nn.Module) -> dict:
    """Eager-style operators and a single output instead of a 1-tuple, in place; returns what
    :func:`eager_graph` returns. The program's inputs are the caller's: no later read of them in
    the graph, which is all that writing them in place could change."""
    calls = eager_graph(graph, frozenset(), owner)
    for node in graph.nodes:
        if node.op == "output" and isinstance(node.args[0], (tuple, list)) and len(node.args[0]) == 1:
            node.args = (node.args[0][0],)
    graph.lint()
    return calls


def _eager_sub_programs(root: nn.Module, calls: dict) -> None:
    """The operators of every sub-program left in ``root`` (a layer not rebuilt) as eager calls.

    ``calls``: what :func:`eager_graph` returned for ``root``'s graph, the arguments of each module
    call that the module must not write in place; a sub-program reached otherwise (one of the
    several calls of a shared module) is given none of its inputs to write."""
    from torch.export.unflatten import InterpreterModule

    done = set()

    def visit(module: nn.Module, calls: dict) -> None:
        for node, unsafe in calls.items():
            sub = module.get_submodule(node.target)
            if isinstance(sub, InterpreterModule) and id(sub) not in done:
                done.add(id(sub))
                visit(sub, eager_graph(sub.graph, unsafe, sub))

    visit(root, calls)
    for module in root.modules():
        if isinstance(module, InterpreterModule) and module is not root and id(module) not in done:
            eager_graph(module.graph, None, module)
    for module in root.modules():
        if isinstance(module, InterpreterModule) and module is not root:
            module.graph.lint()
            module.finalize()  # its generated code, for when it does not run through fx.Interpreter


class FlatProgram(nn.Module):
    """An exported program that runs as flat operators, in the mode it was exported in."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module
        self.training = False

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> FlatProgram:
        # the exported graph fixed its batch-norm mode; its module refuses .train()/.eval()
        self.training = mode
        return self


def _set_submodule(root: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, layer)
