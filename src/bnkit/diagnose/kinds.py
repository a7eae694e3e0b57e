"""The layer kinds compare traces, in one place: what each framework's layers and functions are,
and how a kind behaves when outputs are compared and tolerances estimated.

A new kind, or a new layer of a known kind, is a row here: the tracers
(:mod:`~bnkit.diagnose.trace_torch`, :mod:`~bnkit.diagnose.trace_keras`) read these tables and
nothing else to decide what to record. Names are strings, resolved when a tracer first runs,
so that this module imports no framework; a name the installed version lacks is skipped.

* :data:`KINDS` — framework-neutral behaviour of each kind (:class:`Kind`).
* :data:`TORCH_MODULES` — ``torch.nn`` classes (subclasses included) and their kind.
* :data:`TORCH_FUNCTIONS` — functions, ``Tensor`` methods and ``aten`` operators (what a
  ``torch.export`` program calls) and their kind, with an optional check on the call.
* :data:`KERAS_LAYERS` — Keras class names (matched anywhere in a layer's MRO) and their kind.
* :data:`ONNX_OPS` — ONNX operator types and their kind (:mod:`~bnkit.diagnose.trace_onnx`).

Layers of no kind (dropout, identity, reshapes, ...) are not recorded: data flows through them,
so the layers before and after them are still connected in the traced graph.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Kind", "KINDS", "TORCH_MODULES", "TORCH_FUNCTIONS", "KERAS_LAYERS", "ONNX_OPS", "kind_of"]


@dataclass(frozen=True)
class Kind:
    """How a kind of layer is compared.

    ``parametric``: its weights are read (canonical shapes: ``weight`` as ``(out, fan_in)``-able,
    batch-norm statistics per channel) for the alignment token and the rounding estimate.
    ``folds_activation``: an activation that consumes its output alone is folded into it, as Keras
    fuses ``Conv2D(..., activation="relu")``. ``optional``: a faithful port may have it on one side
    only (a converter pads explicitly where the other framework pads inside the convolution), so
    alignment looks through it. ``shape_key``: how its output shape enters the alignment token
    (``"full"``, ``"squeeze"``: size-1 axes dropped, ``"numel"``: the element count).
    ``reduction``: how many terms each output value sums, for the rounding estimate (``"fan_in"``,
    ``"window"``: input elements per output element, ``"inputs"``: operands, ``"channels"``,
    ``"normalized"``: the values normalized together, ``None``: element-wise). ``combine``: how errors
    of several inputs add up (``"rss"``: root of the sum of squares, for sums; ``"max"``: for
    concatenations, whose elements come from one input). ``chains``: a layer of this kind applied to
    the output of another alone is folded into it (``(x - mean) / std`` is one entry on both sides,
    whether a framework computes it in one layer or two).
    """

    name: str
    parametric: bool = False
    folds_activation: bool = False
    optional: bool = False
    shape_key: str = "full"
    reduction: str | None = None
    combine: str = "rss"
    chains: bool = False
    description: str = ""


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("conv", parametric=True, folds_activation=True, reduction="fan_in", description="convolution"),
        Kind("dense", parametric=True, folds_activation=True, reduction="fan_in", description="dense / linear"),
        Kind("bn", parametric=True, description="batch normalization"),
        Kind("ln", parametric=True, reduction="normalized", description="layer / group normalization"),
        Kind("pool", reduction="window", description="pooling"),
        Kind("gpool", shape_key="squeeze", reduction="window", description="global pooling"),
        Kind("flatten", shape_key="numel", description="flatten"),
        Kind("add", reduction="inputs", description="element-wise sum or difference of layers' outputs"),
        Kind("mul", description="element-wise product or quotient of layers' outputs (a squeeze-excitation gate)"),
        Kind(
            "scale",
            parametric=True,
            chains=True,
            description="element-wise arithmetic with a constant tensor (layer scale, per-channel normalization)",
        ),
        Kind("concat", combine="max", description="concatenation"),
        Kind("act", description="activation"),
        Kind("pad", optional=True, description="zero padding"),
        # a transposed convolution one framework crops inside and the other after it: folded into the
        # convolution it follows (as an activation is), so both sides' entries have the cropped shape
        Kind("crop", optional=True, description="cropping (negative padding)"),
        Kind("rnn", description="recurrent layer (GRU, LSTM, simple RNN; both directions of a bidirectional one)"),
        Kind("attn", description="multi-head attention (projections, softmax of scaled dot products, output)"),
        Kind("resize", description="resizing / upsampling (nearest, bilinear, bicubic interpolation)"),
    )
}

# torch.nn classes -> kind. Subclasses match too (bnkit's batch norms are _BatchNorm subclasses).
# A class of a package other than torch and bnkit is matched by its dotted name in the MRO, never imported.
TORCH_MODULES: tuple[tuple[str, str], ...] = (
    ("torch.nn.modules.conv._ConvNd", "conv"),
    # Keras' SeparableConv*D as bnkit converts it: one layer (depthwise then pointwise), as in Keras
    ("bnkit.convert.torch_modules.SeparableConv1d", "conv"),
    ("bnkit.convert.torch_modules.SeparableConv2d", "conv"),
    ("torch.nn.Linear", "dense"),
    ("torch.nn.MultiheadAttention", "attn"),
    ("torch.nn.modules.batchnorm._BatchNorm", "bn"),
    # matched by name in the class's MRO, not imported: bnkit never imports torchvision to trace
    ("torchvision.ops.misc.FrozenBatchNorm2d", "bn"),
    ("torch.nn.modules.pooling._AdaptiveAvgPoolNd", "gpool"),
    ("torch.nn.modules.pooling._AdaptiveMaxPoolNd", "gpool"),
    ("torch.nn.modules.pooling._MaxPoolNd", "pool"),
    ("torch.nn.modules.pooling._AvgPoolNd", "pool"),
    ("torch.nn.LayerNorm", "ln"),  # torchvision's LayerNorm2d is a subclass
    ("torch.nn.GroupNorm", "ln"),
    ("torch.nn.Flatten", "flatten"),
    ("torch.nn.modules.padding._ConstantPadNd", "pad"),
    ("torch.nn.modules.rnn.RNNBase", "rnn"),  # nn.GRU, nn.LSTM, nn.RNN: their output sequence is recorded
    ("torch.nn.Upsample", "resize"),  # UpsamplingNearest2d, UpsamplingBilinear2d are subclasses
    *(
        (f"torch.nn.{name}", "act")
        for name in (
            "ReLU", "ReLU6", "Sigmoid", "Tanh", "GELU", "ELU", "LeakyReLU", "SiLU", "SELU", "Softplus",
            "Softsign", "Hardsigmoid", "Hardswish", "Mish", "Hardtanh", "LogSigmoid", "CELU", "Softmax",
            "LogSoftmax", "PReLU",
        )
    ),
)  # fmt: skip

# Functions, Tensor methods ("Tensor.x") and aten operators ("aten.op.overload") -> (kind, check).
# A function may have several rows: the first whose check holds gives the kind.
# The check, when given, must hold for the call to count (see trace_torch._check):
#   "operands": at least two tensor operands (x + y, not x + 1; a concatenation of one tensor is a copy);
#   "constant": one tensor operand and a parameter or buffer of the model (x * layer_scale; x * 0.5 is
#     not recorded: a Python number is part of the operation, as in Keras);
#   "to_2d": the result is (N, features) from an input of rank 3 or more (a flattening view);
#   "spatial": every axis after the channels is reduced (global pooling by mean/amax);
#   "crop": the result is no larger than the input on any axis, and smaller (a pad by negative amounts).
_F = "torch.nn.functional."
# fmt: off
_ADD = ("torch.add", "Tensor.add", "Tensor.add_", "Tensor.__add__", "Tensor.__iadd__", "Tensor.__radd__",
        "aten.add.Tensor", "aten.add_.Tensor")
_SUB = ("torch.sub", "torch.subtract", "Tensor.sub", "Tensor.sub_", "Tensor.subtract", "Tensor.__sub__",
        "Tensor.__isub__", "Tensor.__rsub__", "aten.sub.Tensor", "aten.sub_.Tensor")
_MUL = ("torch.mul", "torch.multiply", "Tensor.mul", "Tensor.mul_", "Tensor.multiply", "Tensor.__mul__",
        "Tensor.__imul__", "Tensor.__rmul__", "aten.mul.Tensor", "aten.mul_.Tensor")
_DIV = ("torch.div", "torch.divide", "torch.true_divide", "Tensor.div", "Tensor.div_", "Tensor.divide",
        "Tensor.true_divide", "Tensor.__truediv__", "Tensor.__itruediv__", "Tensor.__rtruediv__",
        "aten.div.Tensor", "aten.div_.Tensor")
TORCH_FUNCTIONS: tuple[tuple[str, str, str | None], ...] = (
    *(
        (name, "act", None)
        for name in (
            "torch.relu", "torch.relu_", "torch.sigmoid", "torch.tanh", "torch.softmax", "torch.log_softmax",
            "torch.selu", "torch.celu",
            *(_F + f for f in (
                "relu", "relu_", "relu6", "sigmoid", "tanh", "softmax", "log_softmax", "gelu", "silu", "elu",
                "leaky_relu", "hardswish", "hardsigmoid", "mish", "softplus", "selu", "celu", "hardtanh",
                "logsigmoid", "softsign",
            )),
            "Tensor.relu", "Tensor.relu_", "Tensor.sigmoid", "Tensor.sigmoid_", "Tensor.tanh", "Tensor.tanh_",
            "Tensor.softmax",
            "aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default",
            "aten.sigmoid.default", "aten.tanh.default", "aten.silu.default", "aten.silu_.default",
            "aten.gelu.default", "aten._softmax.default", "aten.softmax.int", "aten.hardswish.default",
            "aten.hardsigmoid.default", "aten.elu.default", "aten.leaky_relu.default",
            "aten._log_softmax.default", "aten.log_softmax.int",
        )
    ),
    *((name, "add", "operands") for name in _ADD + _SUB),
    *((name, "mul", "operands") for name in _MUL + _DIV),
    *((name, "scale", "constant") for name in _ADD + _SUB + _MUL + _DIV),
    *((name, "concat", "operands") for name in ("torch.cat", "torch.concat", "torch.concatenate", "aten.cat.default")),
    *((name, "flatten", "to_2d") for name in ("torch.flatten", "Tensor.flatten", "aten.flatten.using_ints")),
    *(
        (name, "flatten", "to_2d")
        for name in ("Tensor.view", "Tensor.reshape", "torch.reshape", "aten.view.default", "aten.reshape.default",
                     "aten._unsafe_view.default")
    ),
    *(
        (name, "gpool", "spatial")
        for name in ("torch.mean", "Tensor.mean", "aten.mean.dim", "torch.amax", "Tensor.amax", "aten.amax.default")
    ),
    *(
        (name, "gpool", None)
        for name in (_F + "adaptive_avg_pool1d", _F + "adaptive_avg_pool2d", _F + "adaptive_max_pool2d",
                     "aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default",
                     _F + "adaptive_avg_pool3d", _F + "adaptive_max_pool3d", "aten.adaptive_avg_pool3d.default",
                     "aten._adaptive_avg_pool3d.default", "aten.adaptive_max_pool3d.default")
    ),
    *(
        (name, "pool", None)
        for name in (_F + "max_pool1d", _F + "max_pool2d", _F + "avg_pool1d", _F + "avg_pool2d",
                     "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.max_pool2d_with_indices.default",
                     _F + "max_pool3d", _F + "avg_pool3d", "aten.max_pool3d.default", "aten.avg_pool3d.default",
                     "aten.max_pool3d_with_indices.default")
    ),
    *((name, "crop", "crop") for name in (_F + "pad", "aten.pad.default", "aten.constant_pad_nd.default")),
    *((name, "pad", None) for name in (_F + "pad", "aten.pad.default", "aten.constant_pad_nd.default")),
    *(
        (name, "conv", None)
        for name in (_F + "conv1d", _F + "conv2d", _F + "conv3d", "aten.conv1d.default", "aten.conv2d.default",
                     "aten.convolution.default", "aten.conv3d.default",
                     _F + "conv_transpose1d", _F + "conv_transpose2d", _F + "conv_transpose3d",
                     "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input")
    ),
    *((name, "dense", None) for name in (_F + "linear", "aten.linear.default")),
    *(
        (name, "ln", None)
        for name in (_F + "layer_norm", _F + "group_norm", "torch.layer_norm", "torch.group_norm",
                     "aten.layer_norm.default", "aten.native_layer_norm.default", "aten.group_norm.default",
                     "aten.native_group_norm.default")
    ),
    *((name, "bn", None) for name in (_F + "batch_norm", "aten._native_batch_norm_legit_no_training.default")),
    *(
        (name, "resize", None)
        for name in (_F + "interpolate", _F + "upsample", "aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec",
                     "aten.upsample_bicubic2d.vec", "aten._upsample_nearest_exact2d.vec",
                     "aten._upsample_bilinear2d_aa.vec", "aten._upsample_bicubic2d_aa.vec")
    ),
)  # fmt: skip

# Keras class names (anywhere in the layer's MRO) -> kind; the first row that matches wins.
KERAS_LAYERS: tuple[tuple[str, str], ...] = (
    ("BaseConv", "conv"),
    ("BaseDepthwiseConv", "conv"),
    ("BaseSeparableConv", "conv"),
    ("BaseConvTranspose", "conv"),
    ("MultiHeadAttention", "attn"),
    ("Dense", "dense"),
    ("BatchNormalization", "bn"),
    ("LayerNormalization", "ln"),
    ("GroupNormalization", "ln"),
    ("BaseGlobalPooling", "gpool"),
    ("BaseAdaptivePooling", "gpool"),
    ("BasePooling", "pool"),
    ("Flatten", "flatten"),
    ("Add", "add"),  # the layer, and the op of `x + y` in a functional model (a sum of two layers only)
    ("Subtract", "add"),
    ("Multiply", "mul"),
    ("TrueDivide", "mul"),
    ("Divide", "mul"),
    ("ElementwiseConstant", "scale"),  # bnkit's (a PyTorch parameter or buffer in arithmetic)
    ("LayerScale", "scale"),  # keras.applications ConvNeXt's
    ("Normalization", "scale"),  # (x - mean) / std with its stored statistics
    ("Rescaling", "scale"),  # recorded when its scale or offset is per channel (numbers are part of the op)
    ("Concatenate", "concat"),
    ("Cropping1D", "crop"),
    ("Cropping2D", "crop"),
    ("Cropping3D", "crop"),
    ("ZeroPadding1D", "pad"),
    ("ZeroPadding2D", "pad"),
    ("ZeroPadding3D", "pad"),
    ("RNN", "rnn"),  # GRU, LSTM, SimpleRNN: their first output (the sequence, or its last step)
    ("Bidirectional", "rnn"),
    ("Activation", "act"),
    ("ReLU", "act"),
    ("Softmax", "act"),
    ("LeakyReLU", "act"),
    ("ELU", "act"),
    ("PReLU", "act"),
    ("UpSampling1D", "resize"),
    ("UpSampling2D", "resize"),
    ("Resizing", "resize"),
    ("Resize", "resize"),  # the op of keras.ops.image.resize in a functional model
)

# ONNX operators (op_type of the default domain) -> (kind, check), read by trace_onnx; the first row whose
# check holds gives the kind. Checks as TORCH_FUNCTIONS' ("constant": one data operand and a constant of
# more than one value, an initializer or Constant output: a number is part of the operation, as in Keras).
ONNX_OPS: tuple[tuple[str, str, str | None], ...] = (
    ("Conv", "conv", None),
    ("ConvTranspose", "conv", None),
    ("Gemm", "dense", None),
    ("MatMul", "dense", "constant"),
    ("BatchNormalization", "bn", None),
    ("LayerNormalization", "ln", None),
    ("GroupNormalization", "ln", None),
    ("MaxPool", "pool", None),
    ("AveragePool", "pool", None),
    ("LpPool", "pool", None),
    ("GlobalAveragePool", "gpool", None),
    ("GlobalMaxPool", "gpool", None),
    ("ReduceMean", "gpool", "spatial"),
    ("ReduceMax", "gpool", "spatial"),
    ("Flatten", "flatten", "to_2d"),
    ("Reshape", "flatten", "to_2d"),
    *((op, "add", "operands") for op in ("Add", "Sub")),
    *((op, "mul", "operands") for op in ("Mul", "Div")),
    *((op, "scale", "constant") for op in ("Add", "Sub", "Mul", "Div")),
    ("Concat", "concat", "operands"),
    *(
        (op, "act", None)
        for op in ("Relu", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "LeakyRelu", "Elu", "Selu", "Celu",
                   "HardSigmoid", "HardSwish", "Gelu", "Softplus", "Softsign", "PRelu", "Mish", "Clip")
    ),
    ("Pad", "pad", None),
    ("Resize", "resize", None),
    ("Upsample", "resize", None),
)  # fmt: skip

# Keras layers that are random in training (their masks cannot agree across frameworks): compare
# calls them in inference mode. Matched like KERAS_LAYERS. MultiHeadAttention: its dropout on the
# attention weights is all that training changes in it.
KERAS_RANDOM_LAYERS: tuple[str, ...] = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                                        "GaussianNoise", "GaussianDropout", "AlphaDropout",
                                        "MultiHeadAttention")  # fmt: skip
# Layers outside keras.layers that are random in training: keras.applications ConvNeXt's and bnkit's
# stochastic depth.
KERAS_RANDOM_CUSTOM_LAYERS: tuple[str, ...] = ("StochasticDepth",)

# PyTorch modules (class names anywhere in the MRO) that are random in training: compare runs them
# in eval() (torch.nn's dropouts, torchvision's and bnkit's StochasticDepth; nn.MultiheadAttention, whose
# dropout on the attention weights is all that train() changes in it).
TORCH_RANDOM_MODULES: tuple[str, ...] = ("_DropoutNd", "StochasticDepth", "MultiheadAttention")


def kind_of(name: str) -> Kind:
    """The :class:`Kind` called ``name``; an unknown name gets the defaults (element-wise)."""
    return KINDS.get(name) or Kind(name)
