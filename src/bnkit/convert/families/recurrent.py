"""Recurrent layers, both ways: ``nn.GRU`` ⇄ ``GRU(reset_after=True)``, ``nn.LSTM`` ⇄ ``LSTM``, ``nn.RNN``
(``tanh``/``relu``) ⇄ ``SimpleRNN``; ``bidirectional=True`` ⇄ ``Bidirectional(merge_mode="concat")``;
``num_layers > 1`` ⇄ stacked layers with ``return_sequences=True`` (and a ``Dropout`` between them
where ``dropout > 0``: both drop each value of a layer's output sequence anew, ``1 / (1 - p)`` scaled).

The formulas, per direction, with ``x`` a step's input and ``h`` the previous state (both frameworks,
checked against the real layers; ``σ`` the sigmoid):

* GRU: ``r = σ(W_r x + b_ir + U_r h + b_hr)``, ``z = σ(W_z x + b_iz + U_z h + b_hz)``,
  ``n = tanh(W_n x + b_in + r ⊙ (U_n h + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``. PyTorch applies
  the reset gate after the recurrent matmul: Keras' ``reset_after=True`` (``reset_after=False``,
  ``r`` applied to ``h`` before ``U_n``, is another function and is refused). PyTorch stacks the
  gates ``(r, z, n)`` in ``weight_ih (3H, F)``, ``weight_hh (3H, H)``, ``bias_ih``, ``bias_hh``;
  Keras ``(z, r, h)`` in ``kernel (F, 3H)``, ``recurrent_kernel (H, 3H)`` and ``bias (2, 3H)``
  (input bias, recurrent bias): the weights are transposed and the first two gate blocks swapped.
* LSTM: gates ``(i, f, g, o)`` in PyTorch, ``(i, f, c, o)`` in Keras (the same order),
  ``c' = f ⊙ c + i ⊙ g``, ``h' = o ⊙ tanh(c')``. Keras has one bias, PyTorch two that are only
  ever added: Keras → PyTorch puts it in ``bias_ih`` and zeros in ``bias_hh`` (exact, and back
  again bit for bit); PyTorch → Keras sums them in float32, which rounds once (measured on 20
  random bidirectional LSTMs: within 5.8e-8 relative of the exact sum, and PyTorch's own LSTM
  given the summed bias and a zero ``bias_hh`` returns bit-identical outputs), and converting
  back gives that sum in ``bias_ih``.
* SimpleRNN: ``h' = act(W x + b_ih + U h + b_hh)``, ``act`` tanh or relu; biases as for the LSTM.

PyTorch returns ``(output, h_n)`` (the LSTM ``(output, (h_n, c_n))``); ``output`` is
``(N, L, D·H)`` with ``batch_first=True``, the directions concatenated, each at its own time
step (Keras' Bidirectional flips the backward layer's outputs back, so the same);
``h_n`` is ``(num_layers·D, N, H)``, not batch-first: it converts as :class:`FinalStates`, the
per-layer, per-direction states (Keras' ``return_state=True``), used by index (``h_n[-1]``,
``torch.cat((h_n[-2], h_n[-1]), 1)``). A Keras layer with ``return_sequences=False`` gives
``out[:, -1]`` (a Bidirectional one ``torch.cat((h_n[0], h_n[1]), 1)``: its backward half has
seen the whole sequence), ``return_state=True`` its states; ``go_backwards=True`` alone reverses
the input (``torch.flip``) and leaves the outputs in the reversed order, as Keras does.

The sequence tensor keeps PyTorch's own order ``(N, L, features)`` in both frameworks (the
identity layout, :mod:`bnkit.convert.layouts`): after ``Conv1d`` + ``BatchNorm1d`` on ``(N, C, L)``,
the ``x.permute(0, 2, 1)`` (or ``transpose(1, 2)``) into a ``batch_first`` layer is free in Keras,
and a Keras ``Conv1D`` before a ``GRU`` costs one permute in PyTorch (as it does in PyTorch code).

Exact only with zero initial states and whole sequences: refused by name are an initial state
(``hx``, ``initial_state=``), ``proj_size``, ``batch_first=False`` (its input has the time first
and the batch second, which the converted graph does not represent), Keras masking
(``Masking``, ``mask_zero``), ``stateful``, ``dropout``/``recurrent_dropout`` inside a Keras
layer (one mask per sequence, reused at every step), activations other than the defaults
(SimpleRNN: ``tanh``, ``relu``), and ``merge_mode`` other than ``"concat"``. ``unroll`` and
``use_cudnn`` change how Keras computes, not what: they convert.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx, nn

from bnkit.convert.layouts import identity
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import (
    KerasValue,
    TorchValue,
    call_with_weights,
    keras_array,
    torch_array,
    torch_module_holding,
)
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers

_KERAS_CLASSES = {nn.GRU: L.GRU, nn.LSTM: L.LSTM, nn.RNN: L.SimpleRNN}
_TORCH_CLASSES = {keras_cls: torch_cls for torch_cls, keras_cls in _KERAS_CLASSES.items()}


class FinalStates(list):
    """``h_n`` (or ``c_n``) of a PyTorch recurrent layer converted to Keras: one state ``(N, H)`` per
    layer and direction, in PyTorch's order (layer 0 forward, layer 0 backward, layer 1 ...)."""

    def __repr__(self) -> str:
        return (
            f"the {len(self)} final states (num_layers·directions, N, H) of a recurrent layer, whose first "
            "dim is not the batch: use them by index (h_n[-1])"
        )


def _swap_gates(w: np.ndarray) -> np.ndarray:
    """GRU gate blocks along axis 0 between PyTorch's ``(r, z, n)`` and Keras' ``(z, r, h)``
    (the first two swapped: its own inverse)."""
    first, second, third = np.split(w, 3, axis=0)
    return np.concatenate([second, first, third], axis=0)


def _activation_name(fn) -> str | None:
    name = keras.activations.serialize(fn) if fn is not None else "linear"
    return name if isinstance(name, str) else None


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def _check_keras_layer(b: KerasToTorch, reported, layer) -> None:
    """Refuse what a PyTorch recurrent layer does not compute (``reported``: the layer named in the error)."""
    cell = layer.cell
    if layer.stateful:
        raise b.unsupported(reported, "stateful=True (states carried over between batches); PyTorch starts from zeros")
    if cell.dropout > 0 or cell.recurrent_dropout > 0:
        raise b.unsupported(
            reported,
            f"dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}: Keras draws one mask per sequence "
            "and reuses it at every step, which PyTorch's recurrent layers do not do",
        )
    activation = _activation_name(cell.activation)
    if isinstance(layer, L.SimpleRNN):
        if activation not in ("tanh", "relu"):
            raise b.unsupported(reported, f"activation={activation!r}; nn.RNN computes 'tanh' or 'relu' only")
        return
    recurrent = _activation_name(cell.recurrent_activation)
    if (activation, recurrent) != ("tanh", "sigmoid"):
        raise b.unsupported(
            reported,
            f"activation={activation!r}, recurrent_activation={recurrent!r}; PyTorch computes 'tanh' and 'sigmoid'",
        )
    if isinstance(layer, L.GRU) and not cell.reset_after:
        raise b.unsupported(
            reported, "reset_after=False applies the reset gate before the recurrent matmul; PyTorch's GRU after it"
        )


def _torch_arrays(layer, suffix: str) -> dict[str, np.ndarray]:
    """A Keras recurrent layer's weights as PyTorch's ``weight_ih_l0{suffix}`` and so on."""
    cell = layer.cell
    kernel, recurrent = keras_array(cell.kernel).T, keras_array(cell.recurrent_kernel).T
    bias = keras_array(cell.bias) if cell.use_bias else None
    if isinstance(layer, L.GRU):
        kernel, recurrent = _swap_gates(kernel), _swap_gates(recurrent)
        biases = None if bias is None else (_swap_gates(bias[0]), _swap_gates(bias[1]))
    else:  # one bias: all of it in bias_ih, zeros in bias_hh (only their sum is ever used)
        biases = None if bias is None else (bias, np.zeros_like(bias))
    arrays = {f"weight_ih_l0{suffix}": kernel, f"weight_hh_l0{suffix}": recurrent}
    if biases is not None:
        arrays |= {f"bias_ih_l0{suffix}": biases[0], f"bias_hh_l0{suffix}": biases[1]}
    return arrays


def _torch_layer(layer, features: int, bidirectional: bool, arrays: dict) -> nn.Module:
    cls = next(t for k, t in _TORCH_CLASSES.items() if isinstance(layer, k))
    kwargs = dict(bias=layer.cell.use_bias, batch_first=True, bidirectional=bidirectional)
    if cls is nn.RNN:
        kwargs["nonlinearity"] = _activation_name(layer.cell.activation)
    return torch_module_holding(lambda: cls(features, layer.cell.units, **kwargs), arrays)


def _getitem(b: KerasToTorch, source: fx.Node, index) -> fx.Node:
    return b.graph.call_function(operator.getitem, (source, index))


def _sequence_input(b: KerasToTorch, reported, node, inputs) -> TorchValue:
    """The input sequence as PyTorch's ``(N, L, features)``; refuses initial states and masks."""
    kwargs = node.arguments.kwargs
    if kwargs.get("mask") is not None or getattr(node.input_tensors[0], "_keras_mask", None) is not None:
        raise b.unsupported(
            reported, "a masked input (mask=, Masking, Embedding(mask_zero=True)); PyTorch's recurrent layers take none"
        )
    if kwargs.get("initial_state") is not None or len(inputs) != 1:
        raise b.unsupported(reported, "an initial_state; PyTorch's converted layer starts from zeros")
    (x,) = inputs
    if x.rank != 3:
        raise b.unsupported(reported, f"a rank-{x.rank} input; recurrent layers take (N, L, features)")
    return b.to_layout(x, identity(3))


def _outputs(b: KerasToTorch, layer, rnn: fx.Node, directions: int):
    """The Keras layer's outputs from the PyTorch layer's ``(output, h_n)``: the sequence, or its last
    step, then the states if ``return_state`` (Keras' order: forward h (c), then backward h (c))."""
    lstm = isinstance(layer.forward_layer if directions == 2 else layer, L.LSTM)

    def finals(direction: int) -> list[fx.Node]:  # h_n[direction] (and c_n[direction])
        states = _getitem(b, rnn, 1)
        if not lstm:
            return [_getitem(b, states, direction)]
        return [_getitem(b, _getitem(b, states, k), direction) for k in (0, 1)]

    if layer.return_sequences:
        out = TorchValue(_getitem(b, rnn, 0), 3, identity(3))
    elif directions == 1:  # the forward direction's last step is its final state
        out = TorchValue(_getitem(b, _getitem(b, rnn, 0), (slice(None), -1)), 2)
    else:  # the backward direction's final state is its output at step 0, not at the last step
        both = [finals(0)[0], finals(1)[0]]
        out = TorchValue(b.graph.call_function(torch.cat, (both,), {"dim": 1}), 2)
    if not layer.return_state:
        return out
    return [out, *(TorchValue(s, 2) for d in range(directions) for s in finals(d))]


@from_keras(L.GRU, L.LSTM, L.SimpleRNN, permuted_input=True)
def recurrent_to_torch(b: KerasToTorch, layer, node, inputs):
    """``GRU``/``LSTM``/``SimpleRNN`` → ``nn.GRU``/``nn.LSTM``/``nn.RNN(batch_first=True)``."""
    _check_keras_layer(b, layer, layer)
    x = _sequence_input(b, layer, node, inputs)
    source = x.node
    if layer.go_backwards:  # Keras runs the reversed sequence and returns its outputs in that order
        source = b.graph.call_function(torch.flip, (source, (1,)))
    module = _torch_layer(layer, node.input_tensors[0].shape[-1], False, _torch_arrays(layer, ""))
    return _outputs(b, layer, b.add_module(layer.name, module, source), 1)


@from_keras(L.Bidirectional, permuted_input=True)
def bidirectional_to_torch(b: KerasToTorch, layer, node, inputs):
    """``Bidirectional(merge_mode="concat")`` of a recurrent layer → its PyTorch layer with ``bidirectional=True``."""
    forward, backward = layer.forward_layer, layer.backward_layer
    if layer.merge_mode != "concat":
        raise b.unsupported(layer, f"merge_mode={layer.merge_mode!r}; PyTorch concatenates the directions")
    if not isinstance(forward, tuple(_TORCH_CLASSES)):
        raise b.unsupported(layer, f"it wraps {type(forward).__name__}; GRU, LSTM and SimpleRNN convert")
    for inner in (forward, backward):
        _check_keras_layer(b, layer, inner)
    same = ("units", "use_bias", "activation", "recurrent_activation")
    differs = [a for a in same if getattr(forward.cell, a, None) != getattr(backward.cell, a, None)]
    if type(forward) is not type(backward) or differs or forward.go_backwards or not backward.go_backwards:
        raise b.unsupported(
            layer, "its backward layer is not the forward layer run backwards (PyTorch's bidirectional layers are)"
        )
    x = _sequence_input(b, layer, node, inputs)
    arrays = _torch_arrays(forward, "") | _torch_arrays(backward, "_reverse")
    module = _torch_layer(forward, node.input_tensors[0].shape[-1], True, arrays)
    return _outputs(b, layer, b.add_module(layer.name, module, x.node), 2)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


@dataclass
class Reversed:
    """``torch.flip(x, (1,))`` of a sequence ``(N, L, features)``: taken only by a recurrent layer, as
    Keras' ``go_backwards=True`` (Keras has no layer reversing a tensor)."""

    value: KerasValue

    def __repr__(self) -> str:
        return "a sequence reversed in time (torch.flip), which converts only as a recurrent layer's input"


@from_torch(torch.flip, methods=("flip",), permuted_input=True)
def flip_to_keras(b: TorchToKeras, node, target) -> Reversed:
    """``torch.flip(x, (1,))`` of a batch-first sequence, for the recurrent layer that reads it (``go_backwards``)."""
    x = b.input(node)
    dims = b.arg(node, 1, "dims")
    if target == "flip" and len(node.args) > 2:  # x.flip(1, 2)
        dims = node.args[1:]
    dims = tuple(d % x.rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    if x.rank != 3 or dims != (1,):
        raise b.unsupported(
            node,
            f"flipping dims {dims} of a rank-{x.rank} tensor; only the time dim of a sequence read by a "
            "recurrent layer converts (Keras' go_backwards=True)",
        )
    return Reversed(x)


def _keras_weights(m: nn.Module, layer_index: int, suffix: str) -> list[np.ndarray]:
    """PyTorch's weights of one layer and direction in Keras' order ``[kernel, recurrent_kernel, bias]``."""
    tail = f"_l{layer_index}{suffix}"
    w_ih, w_hh = torch_array(getattr(m, f"weight_ih{tail}")), torch_array(getattr(m, f"weight_hh{tail}"))
    b_ih = torch_array(getattr(m, f"bias_ih{tail}")) if m.bias else None
    b_hh = torch_array(getattr(m, f"bias_hh{tail}")) if m.bias else None
    if isinstance(m, nn.GRU):
        weights = [_swap_gates(w_ih).T, _swap_gates(w_hh).T]
        return weights + ([np.stack([_swap_gates(b_ih), _swap_gates(b_hh)])] if m.bias else [])
    # Keras adds one bias: the float32 sum rounds once (PyTorch adds the two inside the step)
    return [w_ih.T, w_hh.T] + ([b_ih + b_hh] if m.bias else [])


def _states_used(node: fx.Node) -> bool:
    """Whether anything reads ``h_n`` (``c_n``) of the recurrent layer ``node``: Keras' ``return_state``."""
    return any(user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users)


@from_torch(nn.GRU, nn.LSTM, nn.RNN, permuted_input=True)
def recurrent_to_keras(b: TorchToKeras, node, m):
    """``nn.GRU``/``nn.LSTM``/``nn.RNN`` → one Keras layer per PyTorch layer (``Bidirectional`` where
    ``bidirectional=True``), with ``Dropout(m.dropout)`` between them; returns ``(output, h_n)``
    (``(output, (h_n, c_n))``) with ``h_n`` as :class:`FinalStates`."""
    x = b.operand(b.arg(node, 0, "input"), node)
    go_backwards = isinstance(x, Reversed)  # the input reversed in time: Keras' go_backwards=True
    x = b.value(x.value if go_backwards else x, node)
    if b.arg(node, 1, "hx") is not None:
        raise b.unsupported(node, "an initial state hx; only zero initial states (no hx) convert")
    if getattr(m, "proj_size", 0):
        raise b.unsupported(node, f"proj_size={m.proj_size}; Keras' LSTM has no projection of its state")
    if not m.batch_first:
        raise b.unsupported(
            node,
            "batch_first=False: its input has the time first and the batch second, which bnkit.convert does not "
            "represent (use batch_first=True and a batch-first input)",
        )
    if x.rank != 3:
        raise b.unsupported(node, f"a rank-{x.rank} input (unbatched); it takes (N, L, features)")
    if go_backwards and m.bidirectional:
        raise b.unsupported(
            node,
            "a bidirectional layer on a reversed input (torch.flip): Keras' Bidirectional runs its forward "
            "layer forwards",
        )
    name = b.name(node)
    x = b.to_layout(x, identity(3), name)
    cls = _KERAS_CLASSES[next(c for c in type(m).__mro__ if c in _KERAS_CLASSES)]
    kwargs = {"reset_after": True} if cls is L.GRU else {}
    if cls is L.SimpleRNN:
        kwargs["activation"] = m.nonlinearity
    return_state = _states_used(node)
    directions = 2 if m.bidirectional else 1
    steps = x.shape[0]
    finals = [[] for _ in range(2 if isinstance(m, nn.LSTM) else 1)]  # [h states] (, [c states])
    tensor = x.tensor
    for index in range(m.num_layers):
        # the last layer, whose output is the module's, is named after it (compare pairs them by name)
        layer_name = name if index == m.num_layers - 1 else b.unique_name(f"{name}_l{index}")
        if index > 0 and m.dropout > 0:
            tensor = L.Dropout(m.dropout, name=b.unique_name(f"{name}_dropout{index}"))(tensor)
        inner_name = b.unique_name(f"{layer_name}_{cls.__name__.lower()}") if directions == 2 else layer_name
        layer = cls(
            m.hidden_size,
            use_bias=bool(m.bias),
            return_sequences=True,
            return_state=return_state,
            go_backwards=go_backwards and index == 0,
            name=inner_name,
            **kwargs,
        )
        weights = _keras_weights(m, index, "")
        if directions == 2:
            layer = L.Bidirectional(layer, merge_mode="concat", name=layer_name)
            weights += _keras_weights(m, index, "_reverse")
        outputs = call_with_weights(layer, tensor, weights)
        if return_state:  # [sequence, forward h (c), backward h (c)]
            tensor, states = outputs[0], outputs[1:]
            per_direction = len(finals)
            for d in range(directions):
                for k in range(per_direction):
                    finals[k].append(KerasValue(states[d * per_direction + k], (m.hidden_size,)))
        else:
            tensor = outputs
    out = KerasValue(tensor, (steps, directions * m.hidden_size), layout=identity(3))
    states = [FinalStates(f) for f in finals]
    return (out, states[0]) if len(states) == 1 else (out, tuple(states))
