"""Input checks shared by every backend, with messages that name the layer and the problem.

They take plain shapes and a dtype's name so that the torch and Keras layers (and the
Triton kernels) give the same words for the same mistake.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "check_bn_input",
    "check_bn_rank",
    "ChannelMismatchError",
    "DtypeMismatchError",
    "NonFloatingInputError",
    "NumFeaturesError",
]

_LAYOUT_BY_RANK = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def check_bn_input(
    layer: str,
    shape: Sequence[int],
    dtype: str,
    is_floating: bool,
    *,
    ranks: Sequence[int],
    num_features: int,
    channel_axis: int = 1,
    uses_batch_stats: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` for an input a batch-norm layer cannot take.

    ``layer`` names the layer in the message (its repr, say). ``uses_batch_stats`` is true
    when this call normalises with the batch's own statistics (training, or no running
    statistics), where one value per channel leaves the variance undefined.
    """
    shape = tuple(int(d) for d in shape)
    if not is_floating:
        raise TypeError(
            f"{layer}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got dtype {dtype}; cast it first, e.g. x.float()"
        )
    if len(shape) not in ranks:
        wanted = " or ".join(f"{r}D {_LAYOUT_BY_RANK.get(r, '')}".rstrip() for r in ranks)
        raise ValueError(f"{layer}: expected {wanted} input, got {len(shape)}D input of shape {shape}")
    axis = channel_axis % len(shape)
    if shape[axis] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels on axis {channel_axis}, got {shape[axis]} "
            f"(input shape {shape})"
        )
    if uses_batch_stats:
        per_channel = 1
        for i, d in enumerate(shape):
            if i != axis:
                per_channel *= d
        if per_channel == 1:
            raise ValueError(
                f"{layer}: expected more than 1 value per channel when training (batch statistics), "
                f"got input shape {shape}; use a larger batch or call .eval()"
            )


# Exceptions that are both torch.nn's type for a mistake and the clearer type for it, so that code
# written against torch.nn (``except RuntimeError``) and code that expects a value or type error
# both catch them.


class ChannelMismatchError(RuntimeError, ValueError):
    """The input's channel count is not the layer's (``torch.nn`` raises ``RuntimeError``)."""


class DtypeMismatchError(RuntimeError, TypeError):
    """The input's dtype does not go with the layer's parameters (``torch.nn``: ``RuntimeError``)."""


class NonFloatingInputError(NotImplementedError, TypeError):
    """An integer, bool or complex input (``torch.nn``: ``NotImplementedError``)."""


class NumFeaturesError(RuntimeError, ValueError):
    """A negative ``num_features`` (``torch.nn``: ``RuntimeError`` from ``torch.empty``)."""


def check_bn_rank(layer: str, shape: Sequence[int], ranks: Sequence[int] | None) -> None:
    """Raise ``ValueError`` unless ``shape`` has one of ``ranks`` dimensions (``None``: 2 or more)."""
    ndim = len(shape)
    if ranks is None:
        if ndim >= 2:
            return
        raise ValueError(f"{layer}: expected an input of at least 2 dimensions (N, C, ...), got {ndim}D input "
                         f"of shape {tuple(shape)}")
    if ndim not in ranks:
        wanted = " or ".join(f"{r}D {_LAYOUT_BY_RANK.get(r, '')}".rstrip() for r in ranks)
        raise ValueError(f"{layer}: expected {wanted} input, got {ndim}D input of shape {tuple(shape)}")
