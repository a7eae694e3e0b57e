"""bnkit's PyTorch layers: drop-in ``torch.nn`` batch norms with a ``convention``."""

from bnkit.torch.affine import ChannelAffine
from bnkit.torch.batchnorm import DEFAULT, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnkit.torch.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnkit.torch.fused import BatchNormAct2d, BatchNormAddAct2d
from bnkit.torch.sync import SyncBatchNorm, convert_sync

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchNormAddAct2d",
    "DEFAULT",
    "ChannelAffine",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
    "convert_sync",
]
