"""What users do with batch norm after the model is built: fold, freeze, recalibrate.

``fold_bn``, ``freeze_bn`` and ``recalibrate`` take PyTorch or Keras models; each framework is
imported only when a model of it is given.
"""

from bnkit.lifecycle.fold import fold_bn
from bnkit.lifecycle.freeze import freeze_bn
from bnkit.lifecycle.recalibrate import recalibrate

__all__ = ["fold_bn", "freeze_bn", "recalibrate"]
