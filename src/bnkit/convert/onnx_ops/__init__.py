"""ONNX operator converters (→ ``torch.nn``), one file per family; importing this package registers them.

See :mod:`bnkit.convert.onnx_ops.registry` for the calling convention and
:mod:`bnkit.convert.onnx_walker` for the builder the converters receive.
"""

from bnkit.convert.onnx_ops import (  # noqa: F401 - each module registers its converters
    activation,
    convolution,
    elementwise,
    gemm,
    normalization,
    pooling,
    tensor_ops,
)
