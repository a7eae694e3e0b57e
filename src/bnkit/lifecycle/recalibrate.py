r"""Re-estimate batch-norm running statistics as exact population statistics over data.

What is computed, precisely: one pass over ``batches`` in which every batch norm normalises with
the statistics of the batch it receives (its training-mode behaviour, as in
``torch.optim.swa_utils.update_bn``) and records its input. Afterwards each layer's running
statistics are the exact mean and variance of **all** the values it received, per channel:

.. math::

    \mu = \frac{1}{n}\sum_i x_i,\qquad
    \sigma^2 = \frac{1}{n - 1}\sum_i (x_i - \mu)^2 \ \text{(torch convention)}\quad\text{or}\quad
    \frac{1}{n}\sum_i (x_i - \mu)^2 \ \text{(keras convention)}

with ``n`` the number of values per channel over the whole data (``N x H x W`` summed over
batches). Per-batch moments are computed in float64 and merged with Chan et al.'s parallel
update (``M2 = M2_a + M2_b + delta^2 n_a n_b / n``), never as ``E[x^2] - E[x]^2`` and never as a
momentum average. For the first batch norm of a network (and for any layer whose input does not
depend on an earlier batch norm) this is the mean and variance of the data concatenated; a later
layer's input depends on how the earlier layers normalised, here with batch statistics, so its
statistics are exact for that definition (recomputing them with the new statistics of earlier
layers would take one pass per layer).
"""

from __future__ import annotations

from bnkit.frameworks import accepts_tf_keras, framework_of

__all__ = ["recalibrate"]


@accepts_tf_keras("model", in_place=True)
def recalibrate(model, batches, num_batches: int | None = None, *, progress: bool = True,
                device=None, process_group=None):
    """Set every batch norm's running statistics to the exact statistics of its input over ``batches``.

    ``batches`` is an iterable of inputs: tensors, or tuples/lists whose first element is the
    input (a ``DataLoader`` of ``(x, y)`` works). ``num_batches`` stops after that many.
    ``progress`` shows a ``rich`` progress bar on a terminal (never when output is redirected).
    ``device`` moves each input there first.

    The variance is unbiased for layers of the torch convention (``torch.nn`` batch norms and
    bnkit layers with ``convention="torch"``, and ``"tf_keras_fused"``: tf-keras 2's fused batch
    norms) and biased for the keras convention, as each convention's running variance is. Nothing
    else changes: parameters, ``momentum``, ``num_batches_tracked``, every module's ``training``
    flag; no gradients are computed. During
    the pass the model runs in ``eval()`` (dropout off) except that batch norms use batch
    statistics. Frozen batch norms (:func:`bnkit.freeze_bn`) are recalibrated too.

    With ``torch.distributed`` initialised (and more than one process in ``process_group``), each
    process runs its own batches and the per-layer counts, means and ``M2`` are gathered and
    merged in float64 in rank order, so every rank ends with the same statistics: those of all
    ranks' data together. Every rank must call ``recalibrate``; ranks may hold different numbers
    of batches (a ``DistributedDataParallel`` model is run through its ``.module``, so that DDP's
    per-forward buffer broadcast does not make them wait on each other).

    Keras models: the same definition for every ``BatchNormalization`` layer, with Keras' biased
    moving variance; the model is called with ``training=False`` and each batch norm normalises
    with its batch's statistics. ``trainable`` flags and all other weights stay as they were.

    A live tf-keras 2 model is recalibrated as the Keras 3 model bnkit reads it as
    (:mod:`bnkit.keras.from_tf_keras`), and the new moving statistics are written back into it.

    Returns the model (changed in place).
    """
    framework = framework_of(model, "recalibrate")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if framework == "keras":
        if device is not None or process_group is not None:
            raise ValueError("device and process_group are for PyTorch models")
        from bnkit.lifecycle._recalibrate_keras import recalibrate_keras

        return recalibrate_keras(model, batches, num_batches, progress=progress)
    from bnkit.lifecycle._recalibrate_torch import recalibrate_torch

    return recalibrate_torch(model, batches, num_batches, progress=progress, device=device,
                             process_group=process_group)
