"""What users do with batch norm after the model is built: fold, freeze, recalibrate.

The functions are ``bnkit.fold_bn`` (:mod:`bnkit.lifecycle.fold`), ``bnkit.freeze_bn``
(:mod:`bnkit.lifecycle.freeze`) and ``bnkit.recalibrate`` (:mod:`bnkit.lifecycle.recalibrate`).
They take PyTorch or Keras models; a framework is imported only when a model of it is given.
This package does not re-export them, so that ``bnkit.lifecycle.recalibrate`` stays the module.
"""
