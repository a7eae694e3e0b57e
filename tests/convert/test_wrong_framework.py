"""The conversion API says which framework it expected when given the other one's model."""

from __future__ import annotations

import pytest
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras


def test_keras_to_torch_of_a_torch_module_names_both_frameworks():
    with pytest.raises(TypeError, match=r"keras_to_torch converts a Keras 3 model; got a PyTorch module of type "
                                        r"Sequential \(use torch_to_keras\(module, input_shape\)"):
        keras_to_torch(nn.Sequential(nn.Linear(2, 2)))


def test_torch_to_keras_of_a_keras_model_names_both_frameworks():
    from bnkit.keras import keras

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))  # an nn.Module too, on the torch backend
    with pytest.raises(TypeError, match=r"torch_to_keras converts a PyTorch torch.nn.Module; got a Keras model "
                                        r"of type Functional \(use keras_to_torch\(model\)"):
        torch_to_keras(model, (2,))


@pytest.mark.parametrize("function", [keras_to_torch, lambda m: torch_to_keras(m, (2,))])
def test_neither_framework(function):
    with pytest.raises(TypeError, match="got an object of type str"):
        function("model.keras")
