"""bnkit's PyTorch layers: drop-in ``torch.nn`` batch norms with a ``convention``."""

from bnkit.checks import ChannelMismatchError, DtypeMismatchError, NonFloatingInputError, NumFeaturesError
from bnkit.torch.affine import ChannelAffine
from bnkit.torch.batchnorm import (
    DEFAULT,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from bnkit.torch.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnkit.torch.fused import BatchNormAct2d, BatchNormAddAct2d
from bnkit.torch.sync import SyncBatchNorm, convert_sync

# torch.nn's name for the conversion, as a function (also SyncBatchNorm.convert_sync_batchnorm)
convert_sync_batchnorm = convert_sync

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchNormAddAct2d",
    "ChannelMismatchError",
    "DEFAULT",
    "ChannelAffine",
    "DtypeMismatchError",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "NonFloatingInputError",
    "NumFeaturesError",
    "SyncBatchNorm",
    "convert_sync",
    "convert_sync_batchnorm",
]
