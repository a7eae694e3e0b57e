"""Real sequence networks with batch norms and recurrent layers convert exactly, there and back
(real_networks.check_network): a PyTorch CRNN and an LSTM tagger, torch -> Keras -> torch; a Keras
Conv1D + BatchNormalization -> Bidirectional(LSTM) -> GRU -> Dense, Keras -> torch -> Keras.
Random weights, randomised batch-norm statistics, batch 2.
"""

from __future__ import annotations

import pytest
from real_networks import INFERENCE_TOL, TRAINING_TOL, Network, check_network
from real_networks_beyond import SEQUENCE_NETWORKS as NETWORKS

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.diagnose.compare import compare
from bnkit.diagnose.lint import lint
from bnkit.keras import keras

L = keras.layers

# the source weights that do not come back bit for bit: PyTorch's two LSTM biases come back as their float32
# sum (Keras has one) in bias_ih, and zeros in bias_hh
SUMMED_BIASES = {"lstm_tagger": {f"lstm.bias_{k}_l0{d}" for k in ("ih", "hh") for d in ("", "_reverse")}}


@pytest.mark.parametrize("net", NETWORKS, ids=lambda n: n.name)
def test_sequence_network_converts_there_and_back(net):
    report = check_network(net, round_trip=True)
    assert report.inference_error <= INFERENCE_TOL
    assert report.round_trip_error <= INFERENCE_TOL
    assert report.training_error <= TRAINING_TOL
    assert report.statistics_error <= TRAINING_TOL
    assert report.batch_norms == {"crnn": 2, "lstm_tagger": 1, "conv_lstm_gru": 1}[net.name]
    assert set(report.weights_lost) == SUMMED_BIASES.get(net.name, set())


def _pair(net: Network):
    source = net.build()
    target = torch_to_keras(source, net.input_shape) if net.framework == "torch" else keras_to_torch(source)
    return source, target


@pytest.mark.parametrize("net", NETWORKS[::2], ids=lambda n: n.name)
def test_compare_traces_the_recurrent_layers_and_agrees(net):
    """bnkit.compare pairs each recurrent layer with its conversion (a 2-layer PyTorch GRU with the second
    Keras layer, whose output is the module's; a Keras GRU(return_sequences=False) has no partner: PyTorch's
    GRU returns the whole sequence, and out[:, -1] is not traced) and agrees, in inference and in a training forward;
    a recurrent kernel changed on one side is found at that layer; lint finds nothing."""
    source, target = _pair(net)
    x = net.example_input()
    for training in (False, True):
        report = compare(source, target, x, training=training)
        assert not report.output_diverges and not any(row.diverges for row in report.rows), report
        rnn_rows = [(row.name_a, row.name_b) for row in report.rows if row.kind == "rnn"]
        assert rnn_rows == {"crnn": [("gru", "gru")], "conv_lstm_gru": [("bilstm", "bilstm")]}[net.name]
    keras_model = target if net.framework == "torch" else source
    layer = next(la for la in keras_model.layers if la.name in ("gru", "bilstm") and isinstance(la, L.Bidirectional))
    kernel = layer.forward_layer.cell.recurrent_kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) * 1.01)
    report = compare(source, target, x)
    first = next(row for row in report.rows if row.diverges)
    assert first.kind == "rnn"
    for model in (source, target):
        assert lint(model) == [] and lint(model, for_inference=True, batch_size=2) == []
