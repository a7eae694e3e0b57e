"""Whole-model conversion: round trips, inference parity and one training step.

Tolerances: float32. Inference outputs agree within 1e-5 (the issue's bar; convolutions sum in
a different order in each framework). Weights survive a round trip bit for bit (transposes only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convert_nets import keras_mlp, keras_resnet, randomize_bn_state, torch_mlp, torch_resnet
from torch import nn

import bnkit.torch as bnkit_torch
from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.examples import keras_seed_model, torch_seed_model
from bnkit.keras import BatchNormalization, keras

TOL = 1e-5


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(keras.ops.convert_to_numpy(x))


def _nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return (
        torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_nhwc, -1, 1)))
        if x_nhwc.ndim > 2
        else torch.from_numpy(x_nhwc)
    )


def _fx_name(path: str) -> str:
    name = path.replace(".", "_")
    return f"_{name}" if name[0].isdigit() else name


def _keras_weights(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [_np(w) for w in layer.weights] for layer in model.layers if layer.weights}


def _torch_state(module) -> dict[str, np.ndarray]:
    out = {}
    for key, value in module.state_dict().items():
        path, _, leaf = key.rpartition(".")
        out[f"{_fx_name(path)}.{leaf}"] = value.numpy()
    return out


KERAS_NETS = {
    "seed": (keras_seed_model, (2, 64, 64, 1)),
    "resnet": (keras_resnet, (4, 8, 8, 3)),
    "mlp": (keras_mlp, (6, 20)),
}
TORCH_NETS = {
    "seed": (torch_seed_model, (1, 64, 64)),
    "resnet": (torch_resnet, (3, 8, 8)),
    "mlp": (torch_mlp, (20,)),
}


@pytest.mark.parametrize("net", sorted(KERAS_NETS))
def test_keras_torch_keras_round_trip(net):
    factory, shape = KERAS_NETS[net]
    model = factory()
    randomize_bn_state(model)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    torch_model = keras_to_torch(model).eval()
    expected = _np(model(x))
    np.testing.assert_allclose(_np(torch_model(_nchw(x))), expected, rtol=TOL, atol=TOL)
    back = torch_to_keras(torch_model, tuple(_nchw(x).shape[1:]))
    np.testing.assert_allclose(_np(back(x)), expected, rtol=TOL, atol=TOL)
    original, returned = _keras_weights(model), _keras_weights(back)
    assert original.keys() == returned.keys()
    for name, weights in original.items():
        assert len(weights) == len(returned[name]), name
        for a, b in zip(weights, returned[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for layer in model.layers:  # Keras' BN came back as Keras' BN, settings intact
        if isinstance(layer, keras.layers.BatchNormalization):
            twin = back.get_layer(layer.name)
            assert type(twin) is keras.layers.BatchNormalization
            assert (twin.momentum, twin.epsilon, twin.center, twin.scale) == (
                layer.momentum,
                layer.epsilon,
                layer.center,
                layer.scale,
            )


@pytest.mark.parametrize("net", sorted(TORCH_NETS))
def test_torch_keras_torch_round_trip(net):
    factory, shape = TORCH_NETS[net]
    module = factory()
    randomize_bn_state(module)
    module.eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).numpy()
    model = torch_to_keras(module, shape)
    x_keras = np.moveaxis(x.numpy(), 1, -1) if x.dim() > 2 else x.numpy()
    np.testing.assert_allclose(_np(model(x_keras)), expected, rtol=TOL, atol=TOL)
    back = keras_to_torch(model).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), expected, rtol=TOL, atol=TOL)
    original, returned = _torch_state(module), _torch_state(back)
    assert original.keys() == returned.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(returned[key], value, err_msg=key)
    for name, m in module.named_modules():  # PyTorch's BN came back as PyTorch's BN
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            twin = back.get_submodule(_fx_name(name))
            assert type(twin) is type(m)
            assert (twin.momentum, twin.eps, twin.affine) == (m.momentum, m.eps, m.affine)


def test_seed_keras_to_torch_training_step_keeps_keras_semantics():
    model = keras_seed_model()
    torch_model = keras_to_torch(model)  # semantics="source"
    bn = torch_model.bn
    assert isinstance(bn, bnkit_torch.BatchNorm2d) and bn.convention.name == "keras" and bn.momentum == 0.15
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 1)).astype("float32")
    torch_model.train()
    got = torch_model(_nchw(x))
    expected = model(x, training=True)
    np.testing.assert_allclose(_np(got), _np(expected), rtol=TOL, atol=TOL)
    keras_bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.running_mean.numpy(), _np(keras_bn.moving_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), _np(keras_bn.moving_variance), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["keras_to_torch", "torch_to_keras"])
def test_resnet_training_step_with_source_semantics(direction):
    x_nchw = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x_nhwc = np.moveaxis(x_nchw.numpy(), 1, -1)
    if direction == "keras_to_torch":
        keras_model = keras_resnet()
        torch_model = keras_to_torch(keras_model).train()
    else:
        torch_model = torch_resnet().train()
        keras_model = torch_to_keras(torch_model, (3, 8, 8))
        assert all(
            isinstance(layer, BatchNormalization) and layer.convention.name == "torch"
            for layer in keras_model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        )
    for _ in range(2):  # two steps: momentum=None's cumulative average needs the counter
        np.testing.assert_allclose(
            _np(torch_model(x_nchw)), _np(keras_model(x_nhwc, training=True)), rtol=TOL, atol=TOL
        )
        x_nchw, x_nhwc = x_nchw * 2 + 1, x_nhwc * 2 + 1
    bns = [m for m in torch_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    keras_bns = [layer for layer in keras_model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == len(keras_bns) == 3
    for m, layer in zip(bns, keras_bns, strict=True):
        np.testing.assert_allclose(m.running_mean.numpy(), _np(layer.moving_mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.running_var.numpy(), _np(layer.moving_variance), rtol=1e-5, atol=1e-6)


def test_target_semantics_gives_native_layers_with_translated_settings():
    torch_model = keras_to_torch(keras_seed_model(), semantics="target")
    bn = torch_model.bn
    assert type(bn) is nn.BatchNorm2d
    assert bn.momentum == pytest.approx(0.85) and bn.eps == pytest.approx(1e-3)
    keras_model = torch_to_keras(torch_seed_model(), (1, 64, 64), semantics="target")
    (layer,) = [la for la in keras_model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert type(layer) is keras.layers.BatchNormalization
    assert layer.momentum == pytest.approx(0.85) and layer.epsilon == pytest.approx(1e-5)
    # inference is the same function whatever the semantics
    module = torch_seed_model().eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_np(keras_model(np.moveaxis(x.numpy(), 1, -1))), expected, rtol=TOL, atol=TOL)


def test_source_semantics_torch_bn_to_keras_uses_torch_convention():
    module = torch_seed_model("faithful")  # bnkit.torch.BatchNorm2d(convention="keras")
    keras_model = torch_to_keras(module, (1, 64, 64))
    (layer,) = [la for la in keras_model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert type(layer) is keras.layers.BatchNormalization and layer.momentum == 0.15  # Keras' own semantics
    module = torch_seed_model("naive")
    keras_model = torch_to_keras(module, (1, 64, 64))
    (layer,) = [la for la in keras_model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert isinstance(layer, BatchNormalization) and layer.convention.name == "torch" and layer.momentum == 0.15
    assert module.training, "the module given is not changed by tracing"


def test_channels_last_input_shape_is_read_as_such_with_a_warning():
    torch.manual_seed(0)
    module = torch_resnet().eval()
    channels_first = torch_to_keras(module, (3, 8, 8))
    with pytest.warns(UserWarning, match="read it as channels-last"):
        channels_last = torch_to_keras(module, (8, 8, 3))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(_np(channels_last(x)), _np(channels_first(x)))
    with pytest.raises(ValueError, match="does not run on input_shape"):
        torch_to_keras(module, (5, 8, 8))


def test_keras_to_torch_returns_a_module_that_infers_like_the_keras_model():
    """A Keras model infers unless called with training=True: the converted module starts in
    eval(), so calling it right away gives Keras' inference outputs (not batch statistics)."""
    import bnkit

    model = keras_resnet()
    randomize_bn_state(model)
    torch_model = keras_to_torch(model)
    assert not any(m.training for m in torch_model.modules())
    x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype("float32")
    with torch.no_grad():
        got = torch_model(_nchw(x))
    np.testing.assert_allclose(_np(got), _np(model(x)), rtol=TOL, atol=TOL)
    assert bnkit.compare(model, torch_model, x).causes == []


def test_semantics_chosen_per_layer():
    """A dict picks each batch norm's semantics by the source layer's name; the rest keep 'source'."""
    torch_model = keras_to_torch(keras_resnet(), semantics={"block_bn1": "target"})
    assert type(torch_model.block_bn1) is nn.BatchNorm2d
    assert torch_model.block_bn1.momentum == pytest.approx(0.01)  # Keras' default 0.99, translated
    assert isinstance(torch_model.stem_bn, bnkit_torch.BatchNorm2d) and torch_model.stem_bn.convention.name == "keras"
    keras_model = torch_to_keras(torch_resnet(), (3, 8, 8), semantics={"block.bn1": "target"})
    assert type(keras_model.get_layer("block_bn1")) is keras.layers.BatchNormalization
    assert keras_model.get_layer("block_bn1").momentum == pytest.approx(0.9)
    assert isinstance(keras_model.get_layer("stem_bn"), BatchNormalization)
    with pytest.raises(ValueError, match="'blok_bn1'.*'block_bn1'"):  # a typo names the real layers
        keras_to_torch(keras_resnet(), semantics={"blok_bn1": "target"})
    with pytest.raises(ValueError, match="'source' or 'target'"):
        torch_to_keras(torch_resnet(), (3, 8, 8), semantics={"block.bn1": "native"})


def test_nested_keras_models_are_converted_in_line():
    """A functional block and a Sequential used as layers of a functional model (a common way to
    write residual blocks); a nested model called twice shares weights and is refused."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    block_in = keras.Input((6, 6, 3))
    y = L.ReLU()(L.BatchNormalization(momentum=0.8, name="block_bn")(L.Conv2D(3, 3, padding="same")(block_in)))
    block = keras.Model(block_in, L.Add()([y, block_in]), name="block")
    head = keras.Sequential(
        [keras.Input((108,)), L.Dense(4, name="fc"), L.BatchNormalization(name="head_bn")], name="head"
    )
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, head(L.Flatten()(block(inputs))))
    randomize_bn_state(model)
    torch_model = keras_to_torch(model)
    assert isinstance(torch_model.block_bn, bnkit_torch.BatchNorm2d) and torch_model.block_bn.momentum == 0.8
    x = np.random.default_rng(1).standard_normal((4, 6, 6, 3)).astype("float32")
    with torch.no_grad():
        np.testing.assert_allclose(_np(torch_model(_nchw(x))), _np(model(x)), rtol=TOL, atol=TOL)
    shared = keras.Model(inputs, L.Add()([block(inputs), block(inputs)]))
    with pytest.raises(ValueError, match="'block'.*more than once"):
        keras_to_torch(shared)
