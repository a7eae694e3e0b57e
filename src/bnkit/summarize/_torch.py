"""Summary of a ``torch.nn.Module``: forward hooks on the layers during one eval-mode pass."""

from __future__ import annotations

import torch
from torch import nn

from bnkit.summarize.rows import LayerRow, MemoryEstimate, ModelSummary, normalize_input_shape
from bnkit.torch.frozen import is_torchvision_frozen


def summarize_torch(model: nn.Module, input_shape=None, dtype=None) -> ModelSummary:
    input_shapes = normalize_input_shape(input_shape if input_shape is not None else _recorded_shapes(model))
    layers = _layers(model)

    outputs: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {}
    call_bytes: dict[str, int] = {}
    input_bytes = 0
    if input_shapes is not None:
        inputs = _zeros_like_inputs(model, input_shapes, dtype)
        input_bytes = sum(t.numel() * t.element_size() for t in inputs)
        outputs, call_bytes = _trace_outputs(model, layers, inputs)

    types = getattr(model, "_bnkit_layer_types", None) or {}  # a .pt2 program's original layer classes
    rows = [_row(name, module, outputs.get(name), types.get(name)) for name, module in layers]

    params = list(model.parameters())  # unique: tied weights counted once
    torch_params = sum(p.numel() for p in params)
    torch_trainable = sum(p.numel() for p in params if p.requires_grad)
    buffers = list(model.buffers())
    float_buffers = [b for b in buffers if b.is_floating_point() or b.is_complex()]
    torch_buffers = sum(b.numel() for b in float_buffers)
    torch_counters = sum(b.numel() for b in buffers) - torch_buffers
    running_stats = sum(  # a batch norm's floating buffers: running (and renorm) statistics
        b.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers(recurse=False)
        if b.is_floating_point()
    ) + sum(  # torchvision's frozen batch norm: its weight and bias are buffers too, not statistics
        m.running_mean.numel() + m.running_var.numel() for m in model.modules() if is_torchvision_frozen(m)
    )

    memory = None
    if input_shapes is not None:
        # torchinfo's estimate: the output of every call of a leaf layer with parameters is kept
        # for backward and gets a gradient of its size; parameters only (buffers apart)
        with_params = {name for name, module in layers if _is_leaf(module) and _owns_params(module)}
        activations = 2 * sum(nbytes for name, nbytes in call_bytes.items() if name in with_params)
        memory = MemoryEstimate(
            input=input_bytes,
            activations=activations,
            params=sum(p.numel() * p.element_size() for p in params),
            buffers=sum(b.numel() * b.element_size() for b in float_buffers),
        )

    notes = []
    if input_shapes is None:
        notes.append("Output shapes need input_shape (without the batch dimension, e.g. (3, 224, 224)).")
    return ModelSummary(
        name=type(model).__name__,
        framework="torch",
        input_shapes=None if input_shapes is None else tuple((None, *s) for s in input_shapes),
        rows=rows,
        total=torch_params + torch_buffers,
        trainable=torch_trainable,
        non_trainable=torch_params + torch_buffers - torch_trainable,
        torch_params=torch_params,
        torch_trainable=torch_trainable,
        torch_buffers=torch_buffers,
        torch_counters=torch_counters,
        memory=memory,
        dtype=str(_input_dtype(model, dtype)).removeprefix("torch."),
        notes=notes,
        torch_running_stats=running_stats,
        renorm_layers=sum(getattr(m, "renorm", False) is True for m in model.modules()),
    )


def _recorded_shapes(model: nn.Module):
    """Input shapes (without batch) recorded in an fx graph's placeholders, as torch.export leaves them."""
    graph = getattr(model, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return None
    shapes = []
    for node in graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor) or value.dim() < 1:
                return None
            shapes.append(tuple(int(d) for d in value.shape[1:]))
    return shapes or None


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules, and containers that hold parameters or buffers of their own."""
    layers = []
    for name, module in model.named_modules():
        has_children = next(module.children(), None) is not None
        owns_state = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if (not has_children and name) or owns_state:
            layers.append((name or "(root)", module))
    return layers


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _owns_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _row(name: str, module: nn.Module, traced, type_name: str | None = None) -> LayerRow:
    own_params = list(module.parameters(recurse=False))
    own_buffers = list(module.buffers(recurse=False))
    trainable = sum(p.numel() for p in own_params if p.requires_grad)
    frozen = sum(p.numel() for p in own_params if not p.requires_grad)
    float_buffers = sum(b.numel() for b in own_buffers if b.is_floating_point() or b.is_complex())
    counters = sum(b.numel() for b in own_buffers) - float_buffers
    return LayerRow(
        name=name,
        type=type_name or type(module).__name__,
        output_shapes=None if traced is None else traced[0],
        trainable_params=trainable,
        non_trainable_params=frozen + float_buffers,
        buffers=float_buffers,
        counters=counters,
        depth=0 if name == "(root)" else name.count("."),
    )


def _input_dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _zeros_like_inputs(model: nn.Module, input_shapes, dtype) -> list[torch.Tensor]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = _input_dtype(model, dtype)
    return [torch.zeros((1, *shape), dtype=dtype, device=device) for shape in input_shapes]


def _trace_outputs(model: nn.Module, layers, inputs) -> tuple[dict, dict]:
    """Run ``model`` once in eval mode without gradients: every layer's first output's shapes and
    bytes, and the bytes of all its calls' outputs together."""
    from bnkit.torch.probe import probing, tensors_in

    outputs: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {}
    call_bytes: dict[str, int] = {}

    def record(name, module, args, output):
        tensors = tensors_in(output)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        call_bytes[name] = call_bytes.get(name, 0) + nbytes
        if name not in outputs:  # a layer called twice shows its first call
            outputs[name] = (tuple(tuple(t.shape) for t in tensors), nbytes)

    try:
        with probing(model, layers, record):
            model(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(
            f"running {type(model).__name__} on zeros of shape {shapes} failed "
            f"(input_shape excludes the batch dimension and uses the model's own layout): "
            f"{type(e).__name__}: {e}"
        ) from e
    return outputs, call_bytes
