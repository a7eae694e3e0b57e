"""The weights of a program read from a ``.pt2`` file, held once while it is rebuilt into layers.

Why: :func:`bnkit.torch.rebuild.rebuild_exported` used to hold every weight up to 3.7 times
(VGG16's 528 MB grew the process by 2.1 GB): ``torch.export.unflatten`` clones every parameter,
buffer and constant; the rebuilt layer cloned it again; and each new layer first initialised random
weights of its own. The tensors :func:`bnkit.torch.pt2_archive.read_exported_program` makes are
owned by the program alone, so none of those copies is needed:

* :func:`unflatten_sharing` runs ``torch.export.unflatten`` on *meta* twins of the program's tensors
  (same shapes, strides, dtypes, ``requires_grad`` and sharing of storage, no data), so its clones
  cost nothing, then puts the program's own tensors where the twins' clones are. A tensor is shared
  only where its clone would be indistinguishable from it: its storage holds it alone and whole
  (no other view of it, no bytes beyond it) and a clone keeps its strides; any other is cloned, as
  torch does. Aliases that torch keeps as one object (tied weights) stay one object.
* :func:`build_layer` builds a layer on the meta device (no parameters allocated, no random
  initialisation) and gives it the loaded tensors themselves, where each has exactly the dtype,
  shape and strides the layer would have made; otherwise it builds the layer as before and copies
  the values in (``copy_`` casts and checks, as it always did).

What is read is what was read before, bit for bit: values, dtypes, strides, ``state_dict`` keys,
``requires_grad`` (a rebuilt layer's parameters require grad, as a new layer's do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["build_layer", "unflatten_sharing"]


def unflatten_sharing(program) -> nn.Module:
    """``torch.export.unflatten(program)``, holding the program's tensors instead of clones of them."""
    tables = [program.state_dict, program.constants]
    real = [dict(table) for table in tables]
    try:
        for table, twins in zip(tables, _twins(real), strict=True):
            table.update(twins)
        unflat = torch.export.unflatten(program)
    except Exception:  # whatever fails on twins is torch's to report on the tensors themselves
        unflat = None
    finally:
        for table, originals in zip(tables, real, strict=True):
            table.update(originals)
    if unflat is None:
        return torch.export.unflatten(program)
    views: dict[int, set] = {}  # storage -> the distinct views of it the program holds
    for originals in real:
        for tensor in originals.values():
            if isinstance(tensor, torch.Tensor):
                views.setdefault(_storage_key(tensor), set()).add(_view(tensor))
    replacements: dict[int, torch.Tensor] = {}
    for originals in real:
        for fqn, tensor in originals.items():
            placed = _get(unflat, fqn)
            if isinstance(tensor, torch.Tensor) and isinstance(placed, torch.Tensor) and placed.is_meta:
                alone = len(views[_storage_key(tensor)]) == 1
                replacements.setdefault(id(placed), _owned(tensor, placed, alone))
    if not _replace(unflat, replacements):  # a twin's clone where no name of the program leads: as torch does
        return torch.export.unflatten(program)
    return unflat


def build_layer(make: Callable[[], nn.Module], state: dict) -> nn.Module:
    """``make()``'s layer holding ``state``'s tensors (name -> tensor, or None for the layer's default).

    The tensors themselves where the layer would hold the same (see the module doc), else copies."""
    try:
        with torch.device("meta"):
            layer = make()
    except Exception:  # a layer that cannot be built on meta: as before
        layer = None
    if layer is not None and _takes_as_is(layer, state):
        for name, value in state.items():
            if value is None:
                continue
            if name in layer._parameters:
                # a new layer's parameters require grad, whatever the file says (as before)
                shared = isinstance(value, nn.Parameter) and value.requires_grad
                layer._parameters[name] = value if shared else nn.Parameter(value.detach())
            else:
                layer._buffers[name] = value
        return layer
    layer = make()
    with torch.no_grad():
        for name, value in state.items():
            if value is not None:
                getattr(layer, name).copy_(value)
    return layer


def _takes_as_is(layer: nn.Module, state: dict) -> bool:
    """True when ``state`` gives each of ``layer``'s (meta) tensors, and nothing else, laid out like it."""
    own = {**layer._parameters, **layer._buffers}
    own = {name: tensor for name, tensor in own.items() if tensor is not None}
    given = {name: value for name, value in state.items() if value is not None}
    if next(layer.children(), None) is not None or set(own) != set(given):
        return False
    for name, mine in own.items():
        value = given[name]
        if name in layer._buffers and (isinstance(value, nn.Parameter) or value.requires_grad):
            return False
        if value.device.type != "cpu" or (value.dtype, value.shape, value.stride()) != (
            mine.dtype,
            mine.shape,
            mine.stride(),
        ):
            return False
    return True


def _storage_key(tensor: torch.Tensor) -> int:
    """Which storage ``tensor`` views (its C++ object: the same for every view, unique while it lives)."""
    return tensor.untyped_storage()._cdata


def _view(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def _twins(tables: list[dict]) -> list[dict]:
    """Meta tensors like the tables' tensors, one meta storage for each storage they share."""
    storages: dict[int, torch.UntypedStorage] = {}  # real storage -> its meta twin
    result = []
    for table in tables:
        twins = {}
        for name, tensor in table.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key not in storages:
                storages[key] = torch.UntypedStorage(tensor.untyped_storage().nbytes(), device="meta")
            twin = torch.empty(0, dtype=tensor.dtype, device="meta")
            twin.set_(storages[key], tensor.storage_offset(), tensor.size(), tensor.stride())
            if isinstance(tensor, nn.Parameter):
                twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
            elif tensor.requires_grad:
                twin.requires_grad_(True)
            twins[name] = twin
        result.append(twins)
    return result


def _owned(tensor: torch.Tensor, placed: torch.Tensor, alone: bool) -> torch.Tensor:
    """What stands where unflatten put ``placed`` (a clone of ``tensor``'s twin): ``tensor`` itself,
    or a clone of it where the clone differs from it (``alone``: no other view of its storage in the
    program; bytes beyond it; strides a clone does not keep), a parameter or not and requiring grad
    or not as ``placed`` is."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    value = tensor if alone and whole and placed.stride() == tensor.stride() else tensor.detach().clone()
    if isinstance(placed, nn.Parameter):
        if isinstance(value, nn.Parameter) and value.requires_grad == placed.requires_grad:
            return value
        return nn.Parameter(value.detach(), requires_grad=placed.requires_grad)
    value = value.detach()
    return value.requires_grad_(True) if placed.requires_grad else value


def _get(root: nn.Module, fqn: str):
    obj = root
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _replace(root: nn.Module, replacements: dict[int, torch.Tensor]) -> bool:
    """Every tensor of ``root``'s modules that is a key of ``replacements``, replaced; False if a
    meta tensor is left."""
    left = False
    for module in root.modules():
        for table in (module._parameters, module._buffers, module.__dict__):
            for name, value in list(table.items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    if id(value) in replacements:
                        table[name] = replacements[id(value)]
                    else:
                        left = True
    return not left
