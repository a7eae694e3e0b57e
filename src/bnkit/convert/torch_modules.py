"""PyTorch modules that :mod:`bnkit.convert` puts into converted models where ``torch.nn`` has none."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StochasticDepth"]


class StochasticDepth(nn.Module):
    """Identity in ``eval()``; in training, each sample (``mode="row"``) or the whole batch
    (``mode="batch"``) is zeroed with probability ``p`` and what is kept is divided by ``1 - p``.

    What ``torchvision.ops.StochasticDepth`` computes (without needing torchvision), and what
    keras.applications' ConvNeXt ``StochasticDepth`` and a Keras ``Dropout`` whose
    ``noise_shape`` keeps only the batch compute: the same probabilities, not the same masks.
    """

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p!r}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode!r}")
        self.p, self.mode = float(p), mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        size = [input.shape[0] if self.mode == "row" else 1] + [1] * (input.ndim - 1)
        keep = 1.0 - self.p
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return input * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"
