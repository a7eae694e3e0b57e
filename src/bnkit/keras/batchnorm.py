r"""Keras 3 batch normalization in either framework's convention.

:class:`BatchNormalization` subclasses ``keras.layers.BatchNormalization``: the same
constructor arguments, the same weights (``gamma``, ``beta``, ``moving_mean``,
``moving_variance``, in that order) so ``set_weights``/``get_weights`` and saved models move
between the two, and every tool that recognises Keras' layer recognises this one. A
keyword-only ``convention`` chooses the semantics:

.. math::

    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

with the batch's mean and *biased* variance when called with ``training=True`` on a
trainable layer (``training and self.trainable``, as Keras), the moving statistics otherwise.

* ``convention="keras"`` (default): exactly ``keras.layers.BatchNormalization``
  (``moving = m * moving + (1 - m) * batch``, biased variance, ``epsilon=1e-3``, ``momentum=0.99``).
* ``convention="torch"``: PyTorch's ``BatchNorm``: ``moving = (1 - m) * moving + m * batch`` with
  the *unbiased* batch variance ``n / (n - 1) * var``, ``epsilon=1e-5``, ``momentum=0.1``;
  ``momentum=None`` is a cumulative average ``m = 1 / num_batches_tracked``, counted in a fifth,
  non-trainable int64 weight ``num_batches_tracked`` (only in this convention, after the four).

``momentum`` is stored and read in the layer's convention. The torch convention uses
``keras.ops`` only (any backend) and computes the statistics in two passes (mean, then the mean
of squared deviations) in float32 or wider, also for float16/bfloat16 inputs.

Batch renormalization (``renorm=True``, ``renorm_clipping``, ``renorm_momentum``, Keras' weights
``moving_stddev``, ``renorm_mean``, ``renorm_stddev``) works in both conventions: in the Keras one
it is Keras' own; in the torch one it is :class:`bnkit.torch.BatchNorm2d`'s (``renorm_momentum``
weighs the new value, default 0.01; ``None`` is a cumulative average; the moving standard
deviation follows the *unbiased* batch variance), formulas in :mod:`bnkit.reference`.

``synchronized=True`` (statistics over every replica of a distributed training run): on the
TensorFlow backend it is Keras' own; on the torch backend, where Keras refuses it, the statistics
are those of every process of ``torch.distributed``'s default process group together, as
:class:`bnkit.torch.SyncBatchNorm` computes them (the gradient reaches every process's input;
``gamma``/``beta`` get this process's contribution, which ``DistributedDataParallel`` sums).
Without an initialised process group (or with one process) it is a plain batch norm, as Keras'
is without a distribution strategy. Only training synchronises; a mask turns it off (as in Keras).
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from bnkit.conventions import KERAS, NAMED, Convention, get_convention
from bnkit.renorm import check_clipping, default_renorm_momentum, read_momentum

__all__ = ["BatchNormalization", "adopt"]


def _world_size() -> int:
    """Processes of torch.distributed's default group (1 without one); torch backend only."""
    from bnkit.torch.sync import world_size

    return world_size()

# Marks an argument left out, so that momentum=None stays meaningful.
_DEFAULT = "default"


def _convention_config(conv: Convention):
    for named in NAMED:  # "torch", "keras", "tf_keras_fused"
        if conv == named:
            return named.name
    return dataclasses.asdict(conv)


@keras.saving.register_keras_serializable(package="bnkit")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization over ``axis`` (default -1, NHWC) with a ``convention``.

    Args are Keras' (``axis``, ``momentum``, ``epsilon``, ``center``, ``scale``, initializers,
    regularizers, constraints, ...) plus ``convention``: ``"keras"``, ``"torch"`` or a
    :class:`bnkit.Convention`. ``momentum``, ``epsilon`` and ``renorm_momentum`` default to the
    convention's. Masks are a Keras-convention feature.
    """

    def __init__(
        self,
        axis=-1,
        momentum=_DEFAULT,
        epsilon=None,
        center=True,
        scale=True,
        *args,
        convention: str | Convention | dict = "keras",
        **kwargs,
    ):
        if isinstance(convention, dict):  # from get_config() of a custom convention
            convention = Convention(**convention)
        conv = get_convention(convention)
        if epsilon is None:
            epsilon = conv.eps
        if isinstance(momentum, str) and momentum == _DEFAULT:
            momentum = conv.momentum
        if momentum is None:
            conv.check_momentum(None)  # a cumulative average only where the convention has one
        # Keras reads these with int() and float() and checks nothing more (epsilon=0, a momentum
        # outside [0, 1], center="yes" all build): take what it takes, quote what it refuses
        for name, value, read, what in (
            ("axis", axis, int, "an int (the channel axis)"),
            ("epsilon", epsilon, float, "a float"),
            ("momentum", 0.0 if momentum is None else momentum, float, "a float"),
        ):
            try:
                read(value)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{name} must be {what}, got {type(value).__name__} {value!r}") from None
        native = conv == KERAS
        renorm_momentum = kwargs.pop("renorm_momentum", default_renorm_momentum(conv))
        if kwargs.get("renorm"):
            kwargs["renorm_clipping"] = check_clipping(kwargs.get("renorm_clipping"))
            renorm_momentum = read_momentum(renorm_momentum, conv)
        # Keras refuses synchronized=True on any backend but TensorFlow: on the torch backend bnkit
        # synchronises over torch.distributed itself, so Keras' constructor must not see it
        synchronized = kwargs.pop("synchronized", False)
        own_sync = bool(synchronized) and keras.backend.backend() != "tensorflow"
        if own_sync and keras.backend.backend() != "torch":
            raise ValueError(
                f"synchronized=True needs the tensorflow backend (Keras' own) or the torch backend "
                f"(bnkit's, over torch.distributed); the backend is {keras.backend.backend()!r}"
            )
        kwargs["synchronized"] = False if own_sync else synchronized
        # Keras' own constructor stores a float momentum; the real one (maybe None) is set after.
        super().__init__(
            axis, 0.0 if momentum is None else momentum, epsilon, center, scale, *args,
            renorm_momentum=0.0 if renorm_momentum is None else renorm_momentum, **kwargs,
        )
        self.momentum = None if momentum is None else float(momentum)
        self.renorm_momentum = renorm_momentum
        self.synchronized = synchronized
        self._own_sync = own_sync
        self.convention = conv
        self._native = native
        self.num_batches_tracked = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.convention.cumulative_average_when_none:
            # PyTorch's counter: after the four Keras weights, so their order is unchanged.
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int64",
                trainable=False,
                autocast=False,
            )

    def call(self, inputs, training=None, mask=None):
        if self._native:
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(
                f"{self.name}: masks are not supported with convention={self.convention.name!r} "
                "(PyTorch's batch norm has none); use convention='keras'"
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, compute_dtype)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None

        if training and self.trainable:
            if self.num_batches_tracked is not None:  # counted before any refusal, as torch.nn counts
                self.num_batches_tracked.assign(self.num_batches_tracked + 1)
            if not self.epsilon > 0:
                raise ValueError(
                    f"{self.name}: epsilon must be positive when training in the {self.convention.name} "
                    f"convention (as PyTorch's eps), got {self.epsilon!r}"
                )
            mean, variance, count = self._batch_moments(x)
            if self.renorm:
                r, d, _, _ = self._renorm_correction_and_moments(mean, variance)
                gamma, beta = self._compose_transforms(r, d, gamma, beta, compute_dtype)
                self._update_renorm_statistics(mean, variance, count)
            else:
                self._update_moving_statistics(mean, variance, count)
        else:
            if self.epsilon < 0:
                raise ValueError(f"{self.name}: epsilon must be non-negative, got {self.epsilon!r}")
            mean = ops.cast(self.moving_mean, compute_dtype)
            variance = ops.cast(self.moving_variance, compute_dtype)

        outputs = ops.batch_normalization(
            x, mean, variance, axis=self.axis, offset=beta, scale=gamma, epsilon=self.epsilon
        )
        return ops.cast(outputs, self.compute_dtype)

    def _moments(self, inputs, mask):
        """Keras' batch statistics; on the torch backend with ``synchronized=True``, the group's."""
        if self._own_sync and mask is None and _world_size() > 1:
            from bnkit.torch.sync import group_moments

            mean, variance, _ = group_moments(inputs, self._reduction_axes)
            return mean, variance
        if self._own_sync and mask is None:  # no process group: Keras' local statistics
            return ops.moments(inputs, axes=self._reduction_axes)
        return super()._moments(inputs, mask)

    def _batch_moments(self, x):
        """Per-channel mean and biased variance in two passes, and the values per channel."""
        if self._own_sync and _world_size() > 1:
            from bnkit.torch.sync import group_moments

            mean, variance, count = group_moments(x, self._reduction_axes)
            if self.convention.unbiased_running_var and float(count) < 2:
                raise ValueError(
                    f"{self.name}: expected more than 1 value per channel when training across the "
                    f"process group, got {int(count)} in total (this process: input shape {tuple(x.shape)})"
                )
            return mean, variance, count
        mean = ops.mean(x, axis=self._reduction_axes, keepdims=True)
        variance = ops.mean(ops.square(x - mean), axis=self._reduction_axes, keepdims=True)
        static = [x.shape[a] for a in self._reduction_axes]
        if all(isinstance(d, int) for d in static):
            count = math.prod(static)
            if count < 2:
                raise ValueError(
                    f"{self.name}: expected more than 1 value per channel when training "
                    f"(batch statistics), got input shape {tuple(x.shape)}"
                )
        else:  # a dynamic batch size (symbolic tracing on some backends)
            shape = ops.shape(x)
            count = 1
            for a in self._reduction_axes:
                count = count * shape[a]
        return ops.squeeze(mean, self._reduction_axes), ops.squeeze(variance, self._reduction_axes), count

    def _weights(self, momentum, dtype):
        """``(old, new)`` weights of ``momentum`` in the layer's convention (None: cumulative)."""
        if momentum is None:
            new = 1.0 / ops.cast(self.num_batches_tracked, dtype)
            return 1.0 - new, new
        return self.convention.weights(momentum)

    def _update_renorm_statistics(self, mean, variance, count=None):
        """Renorm and moving statistics (Keras' own update in the Keras convention)."""
        if self._native:
            return super()._update_renorm_statistics(mean, variance)
        dtype = mean.dtype
        old, new = self._weights(self.momentum, dtype)
        renorm_old, renorm_new = self._weights(self.renorm_momentum, dtype)
        stddev = ops.sqrt(variance + self.epsilon)
        running_stddev = stddev
        if self.convention.unbiased_running_var:
            count = ops.cast(count, dtype)
            running_stddev = ops.sqrt(variance * (count / (count - 1.0)) + self.epsilon)
        self.renorm_mean.assign(ops.cast(self.renorm_mean, dtype) * renorm_old + mean * renorm_new)
        self.renorm_stddev.assign(ops.cast(self.renorm_stddev, dtype) * renorm_old + stddev * renorm_new)
        self.moving_mean.assign(ops.cast(self.moving_mean, dtype) * old + mean * new)
        moving_stddev = ops.cast(self.moving_stddev, dtype) * old + running_stddev * new
        self.moving_stddev.assign(moving_stddev)
        self.moving_variance.assign(ops.relu(moving_stddev * moving_stddev - self.epsilon))

    def _update_moving_statistics(self, mean, variance, count):
        conv = self.convention
        dtype = mean.dtype
        old, new = self._weights(self.momentum, dtype)
        if conv.unbiased_running_var:
            count = ops.cast(count, dtype)
            variance = variance * (count / (count - 1.0))
        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_variance = ops.cast(self.moving_variance, dtype)
        self.moving_mean.assign(moving_mean * old + mean * new)
        self.moving_variance.assign(moving_variance * old + variance * new)

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        config["renorm_momentum"] = self.renorm_momentum
        config["convention"] = _convention_config(self.convention)
        return config


def adopt(layer, convention: str | Convention) -> BatchNormalization:
    """``layer``, a built ``keras.layers.BatchNormalization`` (Keras' own class), made bnkit's layer in
    ``convention``, in place, and returned: the same object (so its place in a model, its name, its
    variables and their values stay), of this class, as if built as
    ``BatchNormalization(..., convention=convention)`` with its settings (``epsilon`` and ``momentum``,
    read in ``convention``). For a reader that learns a layer's training semantics only once the model
    is built (tf-keras 2's fused batch norm depends on the input's rank: :mod:`bnkit.formats.keras2_fused`).

    Only where the two classes hold the same variables: no renorm, not synchronised, a convention
    without a cumulative average (no ``num_batches_tracked``); ``ValueError`` otherwise.
    """
    conv = get_convention(convention)
    if type(layer) is not keras.layers.BatchNormalization or not layer.built:
        raise ValueError(f"adopt takes a built keras.layers.BatchNormalization, got {type(layer).__name__}")
    if layer.renorm or layer.synchronized or conv.cumulative_average_when_none:
        raise ValueError(
            f"{layer.name}: renorm, synchronized or a cumulative average ({conv.name}) are not adopted in place"
        )
    layer.__class__ = BatchNormalization
    layer.convention = conv
    layer._native = conv == KERAS
    layer._own_sync = False
    layer.num_batches_tracked = None
    return layer
