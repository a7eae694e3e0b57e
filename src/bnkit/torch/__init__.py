"""bnkit's PyTorch layers: drop-in ``torch.nn`` batch norms with a ``convention``."""

from bnkit.torch.batchnorm import DEFAULT, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.torch.fused import BatchNormAct2d, BatchNormAddAct2d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "BatchNormAddAct2d", "DEFAULT"]
