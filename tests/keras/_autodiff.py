"""One training call of a Keras layer and its gradients, on whichever backend Keras runs.

Keras 3 has no backend-neutral gradient; each backend's own autodiff is used (torch.autograd,
tf.GradientTape, jax.grad over ``stateless_call``), so the Keras-side tests run unchanged on torch,
TensorFlow and JAX (CI runs tests/keras on all three).
"""

from __future__ import annotations

import numpy as np

from bnkit.keras import keras


def training_call(layer, x: np.ndarray, dy: np.ndarray):
    """``layer(x, training=True)`` (its moving statistics updated, as the call updates them) and the
    gradients of ``sum(y * dy)`` with respect to ``x``, ``gamma`` and ``beta``, all as NumPy arrays."""
    backend = keras.backend.backend()
    x, dy = np.asarray(x, "float32"), np.asarray(dy, "float32")
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, training=True)
        grads = torch.autograd.grad((y * torch.from_numpy(dy)).sum(), [xt, layer.gamma.value, layer.beta.value])
        return (y.detach().numpy(), *(g.numpy() for g in grads))
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * dy)
        grads = tape.gradient(loss, [xt, layer.gamma.value, layer.beta.value])
        return (y.numpy(), *(g.numpy() for g in grads))
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(inputs, weights):
            y, updated = layer.stateless_call(weights, non_trainable, inputs, training=True)
            return (y * dy).sum(), (y, updated)

        (_, (y, updated)), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, trainable)
        for variable, value in zip(layer.non_trainable_variables, updated, strict=True):
            variable.assign(value)
        by_name = {v.name: g for v, g in zip(layer.trainable_variables, gw, strict=True)}
        return tuple(np.asarray(a) for a in (y, gx, by_name["gamma"], by_name["beta"]))
    raise NotImplementedError(f"no autodiff for the {backend!r} backend in these tests")
