"""Layouts as permutations, and reshapes planned across them (pure index arithmetic, no framework).

A converted tensor holds the same values as the source tensor, possibly with its axes in another
order. Its *layout* says which: ``layout[i]`` is the PyTorch dimension that Keras axis ``i``
holds, i.e. ``keras_tensor == torch_tensor.permute(layout)``. The batch stays first
(``layout[0] == 0``). The usual, *mapped* layout is channels-last of channels-first
(``(0, 2, 3, 1)`` for images); a permute written in the model (``x.permute(0, 2, 3, 1)``, Keras
``Permute``) changes the layout instead of moving data, and a layer that needs the mapped layout
gets a permute in front of it (see the walkers).

:func:`plan_reshape` translates a reshape of the source tensor (a PyTorch ``view``, a Keras
``Reshape``) into an optional permute and a reshape of the target tensor, chosen so that the
target's element order fits, preferring the mapped layout for the result. Size-1 axes move freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["mapped_layout", "identity", "inverse", "is_identity", "ReshapePlan", "plan_reshape"]

Layout = tuple[int, ...]


def mapped_layout(rank: int) -> Layout:
    """The layout of a channels-last (Keras) tensor against a channels-first (PyTorch) one."""
    if rank <= 2:
        return tuple(range(rank))
    return (0, *range(2, rank), 1)


def identity(rank: int) -> Layout:
    return tuple(range(rank))


def inverse(perm: Layout) -> Layout:
    """``q`` with ``q[perm[i]] == i``."""
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def is_identity(perm: Layout) -> bool:
    return all(i == p for i, p in enumerate(perm))


@dataclass(frozen=True)
class ReshapePlan:
    """How the target tensor carries out a reshape of the source tensor.

    ``permute``: a permutation of the target's axes to apply first (``None``: none needed);
    ``shape``: the target's new shape, without the batch; ``order``: the new correspondence,
    target axis ``i`` holding source dimension ``order[i]`` (target == source.permute(order)).
    """

    permute: Layout | None
    shape: tuple[int, ...]
    order: Layout


class ReshapeError(ValueError):
    """A reshape that cannot be carried out batch by batch (it mixes the batch with other axes)."""


def _groups(src_in: tuple[int, ...], src_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """The reshape as groups of input dims -> output dims of equal size (size-1 dims left out).

    Dims are numbered with the batch as 0; the batch must map to itself.
    """
    a = [i for i in range(1, len(src_in)) if src_in[i] != 1]
    b = [j for j in range(1, len(src_out)) if src_out[j] != 1]
    if any(src_in[i] == 0 for i in a) or any(src_out[j] == 0 for j in b):
        raise ReshapeError("a reshape of an empty tensor")
    if math.prod(src_in[i] for i in a) != math.prod(src_out[j] for j in b):
        raise ReshapeError(f"a reshape from {src_in[1:]} to {src_out[1:]} moves values across the batch")
    groups, i, j = [], 0, 0
    while i < len(a):
        gi, gj = [a[i]], [b[j]]
        pa, pb = src_in[a[i]], src_out[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(a[i])
                pa *= src_in[a[i]]
                i += 1
            else:
                gj.append(b[j])
                pb *= src_out[b[j]]
                j += 1
        groups.append((gi, gj))
    return groups


def _blocks(sequence: list[int], groups: list[list[int]]) -> list[int] | None:
    """The order of ``groups`` (indices) in which ``sequence`` is their concatenation, or ``None``."""
    where = {d: g for g, dims in enumerate(groups) for d in dims}
    order, pos = [], 0
    while pos < len(sequence):
        g = where[sequence[pos]]
        if sequence[pos : pos + len(groups[g])] != groups[g]:
            return None
        order.append(g)
        pos += len(groups[g])
    return order


def plan_reshape(src_in: tuple, src_out: tuple, order: Layout, preferred: Layout) -> ReshapePlan:
    """Plan a reshape of the source tensor from ``src_in`` to ``src_out`` (full shapes, the batch
    first with any value) on a target tensor ``target == source.permute(order)``.

    ``preferred`` is the correspondence wanted for the result (the mapped layout, in the target's
    terms); it is used when it needs no permute, or when a permute is needed anyway.
    Raises :class:`ReshapeError` when the reshape mixes the batch with other axes.
    """
    groups = _groups(tuple(src_in), tuple(src_out))
    in_groups, out_groups = [g for g, _ in groups], [g for _, g in groups]
    current = [d for d in order[1:] if src_in[d] != 1]
    as_is = _blocks(current, in_groups)
    wanted = _blocks([d for d in preferred[1:] if src_out[d] != 1], out_groups)
    if wanted is not None and (as_is is None or as_is == wanted):
        blocks, out_order = wanted, tuple(preferred)
    else:
        if as_is is None:  # the groups in the order their first dim comes in the target
            first = {g: min(current.index(d) for d in dims) for g, dims in enumerate(in_groups)}
            as_is = sorted(range(len(in_groups)), key=first.__getitem__)
        blocks = as_is
        out_order = [0] + [d for g in blocks for d in out_groups[g]]
        for j in range(1, len(src_out)):  # size-1 output dims: after the output dim before them
            if src_out[j] == 1:
                out_order.insert(out_order.index(j - 1) + 1, j)
        out_order = tuple(out_order)
    needed = [d for g in blocks for d in in_groups[g]]
    permute = None
    if needed != current:
        ones = [d for d in order[1:] if src_in[d] == 1]
        new_in_order = [0, *needed, *ones]
        position = {d: i for i, d in enumerate(order)}
        permute = tuple(position[d] for d in new_in_order)
    return ReshapePlan(permute, tuple(src_out[d] for d in out_order[1:]), out_order)
