"""Real classification networks for the conversion tests and benchmarks/convert_cpu.py.

:data:`NETWORKS` holds every network issue 8 names and further ones it does not, both families:
keras.applications and torchvision models with random weights (nothing is downloaded), small inputs, a 10-class head
giving logits, and every normalization layer given non-trivial statistics and affine parameters
(:func:`randomize_normalization`), so that a mix-up of mean and variance, gamma and beta, or a
lost layer scale shows in the outputs. :func:`check_network` converts one and measures how far
the converted model is from the source, in inference and in a training forward.

Which of them convert is the business of the tests (``tests/convert/test_real_networks.py``
lists them); this module only builds and measures.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.keras import keras
from bnkit.keras.data_format import is_channels_first
from bnkit.torch.frozen import is_batch_norm, is_torchvision_frozen
from conftest import import_torchvision

L = keras.layers

# Inference: the converted model computes the same function with the same float32 weights; only
# the order of the sums inside convolutions and matrix products differs between the frameworks.
INFERENCE_TOL = 1e-5
# Training forward with semantics="source": every batch norm normalises with statistics of the
# batch, sums over N*H*W values (2*48*48 = 4608 at a 96x96 stem) taken in a different order by
# each framework, and a deep network passes the rounding on through tens of such layers, each
# dividing by a batch standard deviation of as few as 2*3*3 values. Measured on ResNet50
# (Keras -> PyTorch, 96x96, batch 2): the float32 training forward is itself 2.6e-5 (PyTorch) and
# 4.3e-5 (Keras) from the same network evaluated in float64, and the two differ by 4e-5. The
# updated running statistics mix those batch statistics in. 1e-4 relative bounds that rounding;
# a wrong semantics (momentum read the other way, the biased instead of the unbiased batch
# variance) is off by 1e-3 or more.
TRAINING_TOL = 1e-4


@dataclass(frozen=True)
class Network:
    """A real network: how to build it (random weights, randomised normalization) and feed it."""

    name: str
    framework: str  # "keras" or "torch": the source framework
    build: Callable[[], object]
    input_shape: tuple[int, ...]  # the source framework's layout, no batch dimension
    pixel_input: bool = False  # the model rescales [0, 255] pixels itself (preprocessing layers)

    def example_input(self, batch: int = 2, seed: int = 0) -> np.ndarray:
        """A batch in the source framework's layout: pixels in [0, 255], else standard normal values."""
        rng = np.random.default_rng(seed)
        shape = (batch, *self.input_shape)
        if self.pixel_input:
            return rng.uniform(0, 255, shape).astype("float32")
        return rng.standard_normal(shape).astype("float32")


# ---- builders ---------------------------------------------------------------------------------


def keras_application(name: str, size: int = 96, *, pixel_input: bool = False, **kwargs) -> Network:
    """``keras.applications.<name>`` with random weights, a ``size``×``size`` input and a 10-logit head."""

    def build():
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None, **kwargs
        )
        randomize_normalization(model)
        return model

    return Network(name, "keras", build, (size, size, 3), pixel_input)


def torchvision_model(name: str, size: int = 96, **kwargs) -> Network:
    """``torchvision.models.<name>`` with random weights, a ``size``×``size`` input and 10 classes."""

    def build():
        torchvision = import_torchvision()
        torch.manual_seed(0)
        module = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
        randomize_normalization(module)
        return module.eval()

    return Network(name, "torch", build, (3, size, size))


def randomize_normalization(model, seed: int = 1) -> None:
    """Non-trivial statistics and affine parameters in every normalization layer of ``model``.

    Batch norms: running means in [-0.5, 0.5], variances in [0.5, 2]; all normalizations:
    gammas in [0.5, 1.5], betas in [-0.5, 0.5]; ConvNeXt's layer scales (initialised to 1e-6,
    which would hide their residual branches) in [0.5, 1.5]; a Keras ``Normalization`` fed
    rescaled pixels: means in [0.3, 0.6], variances in [0.04, 0.09]. torchvision's ``FrozenBatchNorm2d``
    (buffers only: weight, bias, running_mean, running_var) as a batch norm.
    """
    rng = np.random.default_rng(seed)
    ranges = {
        "moving_mean": (-0.5, 0.5),
        "running_mean": (-0.5, 0.5),
        "moving_variance": (0.5, 2.0),
        "running_var": (0.5, 2.0),
        "gamma": (0.5, 1.5),
        "weight": (0.5, 1.5),
        "beta": (-0.5, 0.5),
        "bias": (-0.5, 0.5),
        "layer_scale": (0.5, 1.5),
        "mean": (0.3, 0.6),
        "variance": (0.04, 0.09),
    }
    if _is_torch(model):
        norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        for module in model.modules():
            tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            for name, tensor in tensors.items():
                normalization = isinstance(module, norms) or is_torchvision_frozen(module)
                if (normalization or name == "layer_scale") and name in ranges and tensor is not None:
                    values = rng.uniform(*ranges[name], tuple(tensor.shape)).astype("float32")
                    with torch.no_grad():
                        tensor.copy_(torch.from_numpy(values))
        return
    norms = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization, L.Normalization)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, norms) or type(layer).__name__ == "LayerScale":
            for w in layer.weights:
                leaf = w.path.rpartition("/")[2]
                key = "layer_scale" if type(layer).__name__ == "LayerScale" else leaf
                if key in ranges and w.dtype.startswith("float"):
                    w.assign(rng.uniform(*ranges[key], tuple(w.shape)).astype("float32"))


# Every network issue 8 names, then further ones. Extension point: add a network here, and its name to the lists in
# tests/convert/test_real_networks.py once it converts; benchmarks/convert_cpu.py times them all.
NETWORKS: dict[str, Network] = {
    net.name: net
    for net in [
        keras_application("ResNet50"),
        keras_application("DenseNet121"),
        keras_application("InceptionV3"),
        keras_application("VGG16"),
        keras_application("Xception"),
        keras_application("MobileNetV2"),
        keras_application("MobileNetV3Small", pixel_input=True),  # include_preprocessing=True
        keras_application("EfficientNetB0", pixel_input=True),  # Rescaling + Normalization layers
        keras_application("ConvNeXtTiny", pixel_input=True),  # include_preprocessing=True
        torchvision_model("resnet18"),
        torchvision_model("resnet50"),
        torchvision_model("mobilenet_v2"),
        torchvision_model("densenet121"),
        torchvision_model("googlenet", aux_logits=False, init_weights=True),
        torchvision_model("mobilenet_v3_small"),
        torchvision_model("efficientnet_b0"),
        torchvision_model("regnet_y_400mf"),
        torchvision_model("shufflenet_v2_x0_5"),
        torchvision_model("squeezenet1_0"),
        torchvision_model("vgg11_bn", size=224),  # AdaptiveAvgPool2d(7) is the identity only on 7x7 features
        torchvision_model("convnext_tiny"),
        torchvision_model("alexnet"),  # not named by the issue: AdaptiveAvgPool2d(6) of 2x2 features at 96x96
        # not named by the issue
        keras_application("ResNet50V2"),
        keras_application("MobileNet"),
        keras_application("MobileNetV3Large", pixel_input=True),
        keras_application("EfficientNetV2B0", pixel_input=True),
        keras_application("DenseNet169"),
        # its last blocks see 1x1 features at 96x96: a training forward's batch norms then normalise 2 values
        keras_application("InceptionResNetV2", size=160),
        torchvision_model("mnasnet0_5"),
        torchvision_model("mobilenet_v3_large"),
        torchvision_model("shufflenet_v2_x1_0"),
        torchvision_model("regnet_x_400mf"),
        torchvision_model("resnext50_32x4d"),
        torchvision_model("efficientnet_v2_s"),
        torchvision_model("wide_resnet50_2"),
        torchvision_model("inception_v3", size=160, aux_logits=False, init_weights=True),  # as InceptionResNetV2
    ]
}


# ---- the check ----------------------------------------------------------------------------------


@dataclass
class Report:
    """How a conversion went; errors are relative: max |converted - source| / max |source|."""

    network: str
    direction: str
    batch_norms: int
    convert_seconds: float
    inference_error: float
    training_error: float
    statistics_error: float  # running means and variances after the training forward, worst layer
    round_trip_error: float = math.nan  # the converted model converted back, against the source (inference)
    weights_lost: tuple[str, ...] = ()  # source weights whose values the model converted back lacks


def _is_torch(model) -> bool:
    """A PyTorch module, not a Keras model (which, on Keras' torch backend, is an nn.Module too)."""
    return isinstance(model, nn.Module) and not isinstance(model, keras.layers.Layer)


def relative_error(got, expected) -> float:
    if isinstance(expected, (dict, list, tuple)):  # several outputs ({"out", "aux"}): the worst, key by key
        keys = expected.keys() if isinstance(expected, dict) else range(len(expected))
        return max(relative_error(got[k], expected[k]) for k in keys)
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.abs(expected).max()
    return float(np.abs(got - expected).max() / scale) if scale > 0 else float(np.abs(got).max())


def each(fn, y):
    """``fn`` on an output, or on each output of a dict, tuple or list of them (the same structure back)."""
    if isinstance(y, dict):
        return {k: fn(v) for k, v in y.items()}
    return type(y)(fn(v) for v in y) if isinstance(y, (list, tuple)) else fn(y)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(x))


def _to_keras_layout(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if x.ndim > 2 else x


def takes_torch_layout(model) -> bool:
    """Whether ``model`` takes and returns PyTorch's layout, channels at axis 1: a PyTorch module, or a
    channels_first Keras model (:func:`bnkit.keras.data_format.is_channels_first`), whose conversion takes
    the same tensors. Any other Keras model has its channels last."""
    return _is_torch(model) or is_channels_first(model)


def torch_layout_input(net: Network, source, batch: int = 2, seed: int = 0) -> np.ndarray:
    """:meth:`Network.example_input` in PyTorch's layout (channels at axis 1)."""
    x = net.example_input(batch, seed)
    return x if takes_torch_layout(source) else _to_torch_layout(x)


def run_in_torch_layout(model, x_torch: np.ndarray, training: bool):
    """``model`` on ``x_torch`` (PyTorch's layout), its outputs in PyTorch's layout: a model that takes
    channels last gets the channels moved there, and its outputs' channels moved back to axis 1."""
    if takes_torch_layout(model):
        return _run(model, x_torch, training)
    return each(_to_torch_layout, _run(model, _to_keras_layout(x_torch), training))


def _batch_norm_statistics(model) -> list[tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]]:
    """(running mean, running variance) readers of every batch norm of a PyTorch or Keras model."""
    if _is_torch(model):
        return [
            (lambda m=m: _numpy(m.running_mean), lambda m=m: _numpy(m.running_var))
            for m in model.modules()
            if is_batch_norm(m)  # torchvision's FrozenBatchNorm2d too: its statistics stay, as its Keras twin's
        ]
    return [
        (lambda la=layer: _numpy(la.moving_mean.value), lambda la=layer: _numpy(la.moving_variance.value))
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, L.BatchNormalization)
    ]


def _pair_batch_norms(source, target) -> list[tuple]:
    """The target's batch norm of each of the source's, found by their running means: randomised,
    so unique, and copied bit for bit by the conversion."""
    targets = _batch_norm_statistics(target)
    pairs = []
    for mean, var in _batch_norm_statistics(source):
        initial = mean()
        twins = [t for t in targets if t[0]().shape == initial.shape and np.array_equal(t[0](), initial)]
        assert len(twins) == 1, f"{len(twins)} converted batch norms start from the same running mean"
        pairs.append(((mean, var), twins[0]))
    return pairs


def _without_dropout(model) -> None:
    """Dropout and stochastic depth off, so that a training forward is deterministic."""
    if _is_torch(model):
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
                m.p = 0.0
            elif isinstance(m, nn.MultiheadAttention):  # dropout on the attention weights
                m.dropout = 0.0
        return
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for attribute in ("rate", "drop_path_rate"):
            if isinstance(getattr(layer, attribute, None), float):
                setattr(layer, attribute, 0.0)


def _run(model, x: np.ndarray, training: bool) -> np.ndarray:
    """``model`` on ``x`` (in the model's own layout), in inference or a training forward."""
    with torch.no_grad():  # Keras runs on its torch backend: no autograd graph either
        if _is_torch(model):
            model.train(training)
            return each(_numpy, model(torch.from_numpy(x)))
        return each(_numpy, model(x, training=training))


def _weights(model) -> list[tuple[str, np.ndarray]]:
    """(name, values) of every parameter and buffer of a PyTorch module, every weight of a Keras model."""
    if _is_torch(model):
        return [(name, _numpy(t)) for name, t in model.state_dict().items()]
    return [(w.path, _numpy(w.value)) for w in model.weights]


def _is_keras_normalization_variance(name: str) -> bool:
    # a Keras Normalization's variance (and its sample count) come back as the constant its input is divided
    # by, max(sqrt(variance), epsilon): same function, other values
    leaf = name.rpartition("/")[2]
    return "normalization" in name.rpartition("/")[0] and leaf in ("variance", "count")


def _arrangements(values: np.ndarray) -> list[bytes]:
    """The bytes of ``values``, then of every other transpose of it with its size-1 axes squeezed out
    (at most 4 axes left): the layouts a converter may choose for the same weight."""
    squeezed = values.squeeze()
    if not 2 <= squeezed.ndim <= 4:
        return [values.tobytes()]
    return [values.tobytes()] + [
        np.ascontiguousarray(squeezed.transpose(axes)).tobytes()
        for axes in itertools.permutations(range(squeezed.ndim))
        if axes != tuple(range(squeezed.ndim))
    ]


def lost_weights(source, back) -> tuple[str, ...]:
    """The source's weights whose values no weight of ``back`` holds, bit for bit. Shapes are not
    compared: a weight may come back reshaped (ConvNeXt's layer scale of shape (C, 1, 1) becomes a
    (C,) multiplier; a Keras Conv2D with groups equal to its channels, a DepthwiseConv2D), but
    its values in order are the same. Nor are axis orders: a weight held as a transpose of its squeezed
    array (ndim <= 4) counts as held — a layout the converter chose for the same function (ViT's
    (1, 17, 32) position embedding comes back as (32, 17): Keras' (N, L, E) sequences are (N, E, L) in
    PyTorch's mapped layout). Whether the function is the same is the round trip's inference error."""
    held = {(values.dtype.str, values.tobytes()) for _, values in _weights(back)}
    return tuple(
        name
        for name, values in _weights(source)
        if not any((values.dtype.str, b) in held for b in _arrangements(values))
        and not _is_keras_normalization_variance(name)
    )


def convert(source, net: Network, x_torch: np.ndarray, semantics="source"):
    """``source`` converted to the other framework: (the converted model, its direction)."""
    if net.framework == "keras":
        return keras_to_torch(source, semantics=semantics), "keras_to_torch"
    return torch_to_keras(source, x_torch.shape[1:], semantics=semantics), "torch_to_keras"


def training_check(source, target, x_torch: np.ndarray) -> tuple[int, float, float]:
    """One training forward of ``source`` and ``target`` (dropout off on both sides) on ``x_torch``:
    (batch norms paired, relative error of the outputs, worst relative error of the updated running
    means and variances). Updates both models' statistics; leaves PyTorch modules in ``eval()``."""
    pairs = _pair_batch_norms(source, target)
    _without_dropout(source), _without_dropout(target)
    expected = run_in_torch_layout(source, x_torch, True)
    training = relative_error(run_in_torch_layout(target, x_torch, True), expected)
    errors = [relative_error(t(), s()) for s_pair, t_pair in pairs for s, t in zip(s_pair, t_pair, strict=True)]
    for model in (source, target):
        if _is_torch(model):
            model.eval()
    return len(pairs), training, max(errors, default=0.0)


def check_network(net: Network, batch: int = 2, seed: int = 0, semantics="source", round_trip=False) -> Report:
    """Convert ``net`` (``semantics="source"`` by default) and compare the converted model with the
    source: inference outputs, then one training forward (dropout off on both sides) — its outputs
    and every batch norm's updated running statistics. With ``round_trip``, the converted model is
    also converted back, and its inference outputs and weights compared with the source's. Both sides
    are fed the same batch, in PyTorch's layout where the model takes it (a PyTorch module, a
    channels_first Keras model), else with its channels last. Raises what the conversion raises."""
    source = net.build()
    x_torch = torch_layout_input(net, source, batch, seed)
    start = time.perf_counter()
    target, direction = convert(source, net, x_torch, semantics)
    seconds = time.perf_counter() - start
    expected = run_in_torch_layout(source, x_torch, False)
    inference = relative_error(run_in_torch_layout(target, x_torch, False), expected)
    round_trip_error, lost = math.nan, ()
    if round_trip:
        if net.framework == "keras":  # a channels_first model comes back channels-last (bnkit's Keras side is)
            back = torch_to_keras(target, x_torch.shape[1:], semantics=semantics)
        else:
            back = keras_to_torch(target, semantics=semantics)
        round_trip_error = relative_error(run_in_torch_layout(back, x_torch, False), expected)
        lost = lost_weights(source, back)
        del back
    batch_norms, training, statistics = training_check(source, target, x_torch)
    return Report(net.name, direction, batch_norms, seconds, inference, training, statistics, round_trip_error, lost)


def format_error(error: float) -> str:
    return "0" if error == 0 else f"{error:.1e}" if math.isfinite(error) else str(error)
