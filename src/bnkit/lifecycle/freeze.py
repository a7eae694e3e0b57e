"""Freeze batch normalization for fine-tuning, with PyTorch's or Keras' meaning of *frozen*.

The two frameworks disagree on what a frozen batch norm does in training:

* PyTorch: ``requires_grad=False`` stops ``weight`` and ``bias`` only. In ``train()`` the layer
  still normalises with the batch statistics **and keeps updating its running statistics**;
  you must also call ``.eval()`` on it (which ``model.train()`` undoes) to stop them.
* Keras: ``trainable=False`` stops ``gamma`` and ``beta`` **and** runs the layer in inference
  mode, even inside ``fit()``: the moving statistics normalise and nothing updates.

``freeze_bn(model, convention=...)`` makes the choice explicit. ``convention`` chooses what
*frozen* means, not the statistics convention of the layers, which every layer keeps.
"""

from __future__ import annotations

from bnkit.conventions import get_convention
from bnkit.frameworks import accepts_tf_keras, framework_of

__all__ = ["freeze_bn"]


@accepts_tf_keras("model", in_place=True)
def freeze_bn(model, convention: str = "torch", *, freeze_stats: bool = True):
    """Freeze every batch norm of ``model`` in place and return the model.

    PyTorch models:

    * ``convention="keras"``: each batch norm becomes a :class:`bnkit.torch.FrozenBatchNorm2d`
      (1d/3d) that normalises with its running statistics in ``train()`` and ``eval()`` alike and
      updates nothing: Keras ``trainable=False``.
    * ``convention="torch"``, ``freeze_stats=True`` (default): each batch norm becomes a frozen
      layer that, in ``train()``, still normalises with the batch statistics (as a PyTorch layer
      with ``requires_grad=False`` does) but never updates its running statistics; in
      ``eval()`` it uses them. Batch norms with ``renorm=True`` are refused (``ValueError``): the
      frozen layer has no renorm correction.
    * ``convention="torch"``, ``freeze_stats=False``: exactly PyTorch's ``requires_grad=False``
      on ``weight`` and ``bias``; the layers stay as they are and their running statistics keep
      updating in ``train()``.

    Frozen layers keep the ``state_dict`` layout (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``); their ``weight`` and ``bias`` become buffers, so
    no optimizer can change them. A batch norm that is the model itself is returned frozen.

    Keras models:

    * ``convention="keras"``: ``trainable=False`` on every ``BatchNormalization`` layer, Keras'
      own freeze (inference mode in ``fit()``, nothing updates).
    * ``convention="torch"``, ``freeze_stats=False``: ``gamma`` and ``beta`` become
      non-trainable variables while the layer stays trainable, so in training it still
      normalises with the batch statistics and updates its moving statistics, as PyTorch does.
    * ``convention="torch"``, ``freeze_stats=True`` has no Keras layer to express it:
      ``ValueError``.

    A live tf-keras 2 model is frozen in place as its Keras 3 equivalent would be and returned:
    ``convention="keras"`` sets ``trainable=False`` on its batch norms (tf-keras' own freeze);
    ``convention="torch"``, ``freeze_stats=False`` (non-trainable variables in a trainable layer) has
    no tf-keras form: ``ValueError`` (:mod:`bnkit.keras.from_tf_keras`), the model unchanged.
    """
    mode = get_convention(convention).name
    if mode not in ("torch", "keras"):
        raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
    if not isinstance(freeze_stats, bool):
        raise TypeError(f"freeze_stats must be a bool, got {freeze_stats!r}")
    if mode == "keras" and not freeze_stats:
        raise ValueError(
            "convention='keras' freezes the statistics by definition (trainable=False runs the layer "
            "in inference mode); use convention='torch', freeze_stats=False to keep them updating"
        )
    if framework_of(model, "freeze_bn") == "keras":
        return _freeze_keras(model, mode, freeze_stats)
    return _freeze_torch(model, mode, freeze_stats)


def _freeze_torch(model, mode: str, freeze_stats: bool):
    from bnkit.lifecycle._torch_bn import batchnorms, replace_module, require_running_stats
    from bnkit.torch.frozen import FrozenBatchNorm

    found = batchnorms(model)
    if mode == "torch" and not freeze_stats:
        for _, bn in found:
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(False)
        return model
    for name, bn in found:
        require_running_stats(name, bn, "freeze")
    batch_stats_in_train = mode == "torch"
    if batch_stats_in_train:
        renorm = [name or "(the model itself)" for name, bn in found if getattr(bn, "renorm", False)]
        if renorm:
            raise ValueError(
                f"batch norms {', '.join(map(repr, renorm))} have renorm=True: frozen with batch statistics in "
                "train() they would lose the renorm correction; use convention='keras' (running statistics "
                "in train() and eval()) or freeze_stats=False (requires_grad=False, renorm keeps running)"
            )
    for name, bn in found:
        if isinstance(bn, FrozenBatchNorm):
            bn.batch_stats_in_train = batch_stats_in_train
        else:
            frozen = FrozenBatchNorm.from_batchnorm(bn, batch_stats_in_train=batch_stats_in_train)
            model = replace_module(model, name, frozen)
    return model


def _freeze_keras(model, mode: str, freeze_stats: bool):
    from bnkit.keras import keras

    if mode == "torch" and freeze_stats:
        raise ValueError(
            "convention='torch' with freeze_stats=True (batch statistics in training, moving statistics "
            "frozen) has no Keras equivalent; use convention='keras' (trainable=False) or freeze_stats=False"
        )
    layers = [m for m in _all_layers(model) if isinstance(m, keras.layers.BatchNormalization)]
    for layer in layers:
        if mode == "keras":
            layer.trainable = False
        else:
            for variable in (layer.gamma, layer.beta):
                if variable is not None:
                    variable.trainable = False
    return model


def _all_layers(model):
    yield model
    yield from model._flatten_layers(include_self=False, recursive=True)
