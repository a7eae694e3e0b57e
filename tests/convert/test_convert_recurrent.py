"""Recurrent layers both ways against the real layers: nn.GRU/LSTM/RNN ⇄ Keras GRU/LSTM/SimpleRNN,
bidirectional ⇄ Bidirectional, stacked layers, return_sequences / return_state / go_backwards, how
PyTorch code uses the outputs (out[:, -1], h_n[-1], torch.cat((h_n[-2], h_n[-1]), 1)); training
forwards and gradients; refusals by name. Inference within 1e-5 (layer_checks.TOL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import TOL, check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers

FEATURES, STEPS = 3, 6


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and biases of both signs and a scale where the gates neither saturate nor stay linear."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return module.eval()


class _Sequence(nn.Module):
    """(N, C, L) features → permute → a recurrent layer; returns what ``use`` picks of its outputs."""

    def __init__(self, rnn: nn.Module, use: str = "out") -> None:
        super().__init__()
        self.rnn, self.use = rnn, use

    def forward(self, x):
        out, states = self.rnn(x.permute(0, 2, 1))
        h = states[0] if isinstance(self.rnn, nn.LSTM) else states
        if self.use == "out":
            return out
        if self.use == "last":
            return out[:, -1]
        if self.use == "h_last":
            return h[-1]
        if self.use == "c_last":
            return states[1][-1]
        return torch.cat((h[-2], h[-1]), dim=1)  # "h_both": the top layer's two directions


def _torch_rnn(kind: str, hidden: int = 5, **kwargs) -> nn.Module:
    if kind == "RNN_relu":
        return nn.RNN(FEATURES, hidden, nonlinearity="relu", batch_first=True, **kwargs)
    return getattr(nn, kind)(FEATURES, hidden, batch_first=True, **kwargs)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN", "RNN_relu"])
@pytest.mark.parametrize(
    ("layers", "bidirectional", "bias", "use"),
    [
        (1, False, True, "out"),
        (2, False, False, "h_last"),
        (1, True, True, "h_both"),
        (2, True, True, "last"),
    ],
)
def test_torch_recurrent_layers_convert_and_back(kind, layers, bidirectional, bias, use):
    rnn = _torch_rnn(kind, num_layers=layers, bidirectional=bidirectional, bias=bias)
    model = check_torch(_randomized(_Sequence(rnn, use)), (FEATURES, STEPS))
    expected = {"GRU": L.GRU, "LSTM": L.LSTM, "RNN": L.SimpleRNN, "RNN_relu": L.SimpleRNN}[kind]
    found = [la.forward_layer if isinstance(la, L.Bidirectional) else la for la in model.layers]
    assert sum(isinstance(la, expected) for la in found) == layers
    assert sum(isinstance(la, L.Bidirectional) for la in model.layers) == (layers if bidirectional else 0)


def test_torch_lstm_cell_state_and_dropout_between_layers():
    lstm = nn.LSTM(FEATURES, 4, num_layers=3, batch_first=True, dropout=0.25)
    model = check_torch(_randomized(_Sequence(lstm, "c_last")), (FEATURES, STEPS))
    assert [la.rate for la in model.layers if isinstance(la, L.Dropout)] == [0.25, 0.25]


class _Direct(nn.Module):
    """A GRU on the model's (N, L, F) input, reversed in time first where ``flip``."""

    def __init__(self, flip: bool):
        super().__init__()
        self.gru, self.flip = nn.GRU(FEATURES, 4, batch_first=True), flip

    def forward(self, x):
        out, _ = self.gru(torch.flip(x, (1,)) if self.flip else x)
        return out


def test_torch_sequence_input_without_permute_and_reversed_input():
    """A (N, L, F) model input (Keras takes it channels-last, (N, F, L): one Permute), and
    torch.flip(x, (1,)) into a GRU: Keras' go_backwards=True."""
    model = check_torch(_randomized(_Direct(flip=False)), (STEPS, FEATURES))
    assert sum(isinstance(la, L.Permute) for la in model.layers) == 2  # the input, and the output to (N, H, L)
    model = check_torch(_randomized(_Direct(flip=True)), (STEPS, FEATURES))
    assert [la.go_backwards for la in model.layers if isinstance(la, L.GRU)] == [True]


def _keras_rnn(kind: str, **kwargs):
    if kind == "SimpleRNN_relu":
        return L.SimpleRNN(4, activation="relu", **kwargs)
    return getattr(L, kind)(4, **kwargs)


def _randomized_keras(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign((rng.standard_normal(tuple(w.shape)) * 0.5).astype("float32"))
    return model


def _keras_outputs_equal(model, torch_model, x):
    """Every output of the Keras model (a list with return_state) against the PyTorch one's."""
    expected = model(x)
    got = torch_model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    got = got if isinstance(got, (list, tuple)) else [got]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        g, e = to_numpy(g), to_numpy(e)
        np.testing.assert_allclose(np.moveaxis(g, 1, -1) if g.ndim > 2 else g, e, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "SimpleRNN", "SimpleRNN_relu"])
@pytest.mark.parametrize(
    ("bidirectional", "sequences", "state", "backwards", "unroll"),
    [
        (False, True, False, False, False),
        (False, False, True, True, False),
        (False, False, False, False, True),
        (True, True, True, False, False),
        (True, False, False, False, False),
    ],
)
def test_keras_recurrent_layers_convert_and_back(kind, bidirectional, sequences, state, backwards, unroll):
    inputs = keras.Input((STEPS, FEATURES))
    layer = _keras_rnn(kind, return_sequences=sequences, return_state=state, go_backwards=backwards, unroll=unroll)
    if bidirectional:
        layer = L.Bidirectional(layer)
    model = _randomized_keras(keras.Model(inputs, layer(inputs)))
    x = random_array((2, STEPS, FEATURES))
    if state:  # several outputs: checked one by one, then converted back
        torch_model = keras_to_torch(model)
        _keras_outputs_equal(model, torch_model, x)
        back = torch_to_keras(torch_model, (FEATURES, STEPS))
        for g, e in zip(back(x), model(x), strict=True):
            np.testing.assert_allclose(to_numpy(g), to_numpy(e), rtol=TOL, atol=TOL)
    else:
        check_keras(model, x)


def test_keras_stacked_layers_after_conv_and_batch_norm():
    inputs = keras.Input((STEPS, FEATURES))
    x = L.BatchNormalization()(L.Conv1D(8, 3, padding="same")(inputs))
    x = L.Bidirectional(L.LSTM(5, return_sequences=True))(x)
    x = L.Dropout(0.2)(x)
    x = L.GRU(4)(x)
    model = _randomized_keras(keras.Model(inputs, L.Dense(3)(x)))
    torch_model = check_keras(model, random_array((2, STEPS, FEATURES)))
    assert [type(m).__name__ for m in torch_model.modules() if isinstance(m, nn.RNNBase)] == ["LSTM", "GRU"]


# ---- training: a training forward and the gradients of the weights -------------------------


def _keras_to_torch_grad(kind: str, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras gradients in PyTorch's names and layout, as the weights map (their sum for split biases)."""

    def swap(w):  # Keras' (z, r, h) gate blocks as PyTorch's (r, z, n)
        if kind != "GRU":
            return w
        z, r, h = np.split(w, 3, axis=0)
        return np.concatenate([r, z, h], axis=0)

    out = {"weight_ih_l0": swap(grads["kernel"].T), "weight_hh_l0": swap(grads["recurrent_kernel"].T)}
    if kind == "GRU":
        out |= {"bias_ih_l0": swap(grads["bias"][0]), "bias_hh_l0": swap(grads["bias"][1])}
    else:  # the two PyTorch biases are added: each gets the gradient of their sum
        out |= {"bias_ih_l0": grads["bias"], "bias_hh_l0": grads["bias"]}
    return out


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_training_forward_and_gradients_match(kind):
    module = _randomized(_Sequence(_torch_rnn(kind, hidden=4), "out")).train()
    model = torch_to_keras(module, (FEATURES, STEPS))
    x = torch.randn(2, FEATURES, STEPS, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, STEPS, 4, generator=torch.Generator().manual_seed(2))
    loss = ((module(x) - target) ** 2).sum()
    loss.backward()
    keras_x = torch.from_numpy(np.moveaxis(x.numpy(), 1, -1).copy())
    keras_out = model(keras_x, training=True)  # (N, 4, L): Keras outputs the mapped layout
    keras_loss = ((keras_out.permute(0, 2, 1) - target) ** 2).sum()
    keras_loss.backward()
    np.testing.assert_allclose(keras_loss.item(), loss.item(), rtol=1e-5)
    layer = next(la for la in model.layers if isinstance(la, (L.GRU, L.LSTM, L.SimpleRNN)))
    grads = {w.path.rpartition("/")[2]: w.value.grad.numpy() for w in layer.weights}
    expected = {name: p.grad.numpy() for name, p in module.rnn.named_parameters()}
    for name, grad in _keras_to_torch_grad(kind, grads).items():
        scale = np.abs(expected[name]).max()
        assert np.abs(grad - expected[name]).max() <= 1e-5 * scale, name


# ---- refusals ------------------------------------------------------------------------------


class _WithState(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.gru = nn.GRU(FEATURES, 4, batch_first=True)
        self.use = use

    def forward(self, x):
        if self.use == "hx":  # encoder-decoder: the decoder starts from the encoder's final state
            _, h = self.gru(x)
            out, _ = self.gru(x, h)
            return out
        out, h = self.gru(x)
        return h.squeeze(0)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.Sequential(nn.LSTM(FEATURES, 4, batch_first=True, proj_size=2)), "proj_size=2"),
        (nn.Sequential(nn.GRU(FEATURES, 4)), "batch_first=False"),
        (_WithState("hx"), "initial state hx"),
        (_WithState("squeeze"), "final states .* use them by index"),
    ],
)
def test_torch_refusals_name_the_layer(module, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        torch_to_keras(module, (STEPS, FEATURES))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: L.GRU(4, reset_after=False, name="r"), "reset_after=False"),
        (lambda: L.GRU(4, dropout=0.1, name="r"), "dropout=0.1"),
        (lambda: L.LSTM(4, recurrent_dropout=0.1, name="r"), "recurrent_dropout=0.1"),
        (lambda: L.LSTM(4, activation="relu", name="r"), "activation='relu'"),
        (lambda: L.SimpleRNN(4, activation="sigmoid", name="r"), "activation='sigmoid'"),
        (lambda: L.Bidirectional(L.GRU(4), merge_mode="sum", name="r"), "merge_mode='sum'"),
    ],
)
def test_keras_refusals_name_the_layer(make, match):
    inputs = keras.Input((STEPS, FEATURES))
    with pytest.raises(UnsupportedLayerError, match=f"'r'.*{match}"):
        keras_to_torch(keras.Model(inputs, make()(inputs)))


def test_keras_masks_initial_states_and_stateful_layers_are_refused():
    inputs = keras.Input((STEPS, FEATURES))
    mask = keras.Input((STEPS,), dtype="bool")
    masked = L.GRU(4, name="r")(inputs, mask=mask)
    with pytest.raises(UnsupportedLayerError, match="'r'.*masked input"):
        keras_to_torch(keras.Model([inputs, mask], masked))
    with pytest.raises(UnsupportedLayerError):  # Masking computes its mask with ops bnkit does not convert
        keras_to_torch(keras.Model(inputs, L.GRU(4)(L.Masking()(inputs))))
    state = keras.Input((4,))
    out = L.GRU(4, name="r")(inputs, initial_state=[state])
    with pytest.raises(UnsupportedLayerError, match="'r'.*initial_state"):
        keras_to_torch(keras.Model([inputs, state], out))
    batch_inputs = keras.Input((STEPS, FEATURES), batch_size=2)
    stateful = L.LSTM(4, stateful=True, name="r")(batch_inputs)
    with pytest.raises(UnsupportedLayerError, match="'r'.*stateful=True"):
        keras_to_torch(keras.Model(batch_inputs, stateful))
