"""bnkit's PyTorch layers: drop-in ``torch.nn`` batch norms with a ``convention``."""

from bnkit.torch.batchnorm import DEFAULT, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DEFAULT"]
