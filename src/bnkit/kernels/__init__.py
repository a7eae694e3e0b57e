"""Fused Triton batch-norm kernels behind :mod:`bnkit.torch`'s layers on CUDA tensors.

``bnkit.torch`` layers call :func:`batch_norm` for an input when :func:`use_triton` says so.
Candidates are CUDA tensors of dtype float32, float16 or bfloat16, outside ``torch.compile``
(whose own code generation then sees PyTorch's native op), with Triton importable. Among
them, by default, only the configurations that the device family's measured table turns on
(:mod:`bnkit.kernels.dispatch`) run on Triton: a device without a table takes PyTorch's path.

Overrides, in this order (turning off wins):

1. ``BNKIT_TRITON=0`` or ``set_enabled(False)``: never Triton;
2. ``BNKIT_TRITON=1`` or ``set_enabled(True)``: Triton for every candidate, measured or not
   (for trying a new device);
3. otherwise (``BNKIT_TRITON`` unset, empty or ``auto``; ``set_enabled(None)``): the table.

This module imports neither Triton nor the kernels: they load on the first Triton call.
:func:`bnkit.kernels.ops.batch_norm_triton` is the functional form; it also runs on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before it is imported).
"""

from __future__ import annotations

import importlib.util
import os

from bnkit.kernels.dispatch import Dispatch

__all__ = ["ENV_VAR", "available", "enabled", "forced", "set_enabled", "use_triton", "mode_of", "batch_norm"]

ENV_VAR = "BNKIT_TRITON"
_ENV_VALUES = {"0": False, "1": True, "": None, "auto": None}

_switch: bool | None = None
_triton_found: bool | None = None
_dispatch = Dispatch()


def available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def set_enabled(flag: bool | None) -> None:
    """``False``: never run Triton; ``True``: run it on every candidate; ``None``: the measured table.

    ``BNKIT_TRITON=0`` still turns the kernels off after ``set_enabled(True)``.
    """
    global _switch
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True, False or None, got {flag!r}")
    _switch = flag


def _environment() -> bool | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    try:
        return _ENV_VALUES[raw.strip().lower()]
    except KeyError:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not understood: use 0 (PyTorch's kernels), 1 (bnkit's Triton kernels "
            "everywhere) or auto / unset (the measured dispatch table)"
        ) from None


def _policy() -> bool | None:
    """False: off; True: forced on; None: the table decides."""
    env = _environment()
    if env is False or _switch is False:
        return False
    if env or _switch:
        return True
    return None


def enabled() -> bool:
    """True unless the kernels are turned off (or Triton is not importable).

    Whether a given input runs on them also depends, unless :func:`forced`, on the table.
    """
    return _policy() is not False and available()


def forced() -> bool:
    """True when ``BNKIT_TRITON=1`` or ``set_enabled(True)`` (and not turned off): no table asked."""
    return _policy() is True and available()


def mode_of(module, fused: bool = False) -> str:
    """The dispatch mode of a batch-norm ``module``'s forward: ``train``, ``infer`` or ``bn_relu``."""
    if module.training or module.running_mean is None:
        return "bn_relu" if fused else "train"
    return "infer"


def _choose(input, mode: str, dispatch: Dispatch) -> bool:
    """The overrides, then the table, for a candidate ``input`` (a float CUDA tensor)."""
    policy = _policy()
    if policy is False or not available():
        return False
    return policy is True or dispatch.triton_wins(input, mode)


def use_triton(input, mode: str = "train") -> bool:
    """Whether ``bnkit.torch`` runs ``input`` through the Triton kernels in ``mode`` (:func:`mode_of`)."""
    import torch

    if not isinstance(input, torch.Tensor) or not input.is_cuda:  # fx Proxies, CPU tensors
        return False
    if input.numel() == 0:  # an empty batch: nothing to launch, and the native path keeps the statistics
        return False
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if torch.compiler.is_compiling():
        return False
    return _choose(input, mode, _dispatch)


def batch_norm(module, input, residual=None, activation: str | None = None):
    """The forward pass of a ``bnkit.torch`` batch-norm ``module`` on the Triton kernels.

    Follows the module exactly as its native forward does: batch statistics in training or
    without running statistics, running statistics otherwise; in training with running
    statistics, ``num_batches_tracked`` is incremented and the running mean and variance
    are updated in the module's convention (momentum weighing the new or the old value,
    unbiased or biased variance, ``momentum=None`` as PyTorch's cumulative average).
    Returns ``act(bn(input) [+ residual])``.
    """
    from bnkit.kernels.ops import batch_norm_triton

    module._check_input_dim(input)
    use_batch_stats = module.training or module.running_mean is None
    updates = module.training and module.track_running_stats and module.running_mean is not None
    old_weight, new_weight, var_factor = 0.0, 0.0, 1.0
    if updates:
        module.num_batches_tracked.add_(1)
        # reading the count synchronises with the device: only the cumulative average needs it
        count = int(module.num_batches_tracked) if module.momentum is None else 1
        old_weight, new_weight = module.convention.weights(module.momentum, count)
        n = input.numel() // input.shape[1]
        var_factor = n / (n - 1) if module.convention.unbiased_running_var else 1.0
    keeps_running = updates or not use_batch_stats
    return batch_norm_triton(
        input,
        module.running_mean if keeps_running else None,
        module.running_var if keeps_running else None,
        module.weight,
        module.bias,
        use_batch_stats=use_batch_stats,
        old_weight=old_weight,
        new_weight=new_weight,
        var_factor=var_factor,
        eps=module.eps,
        residual=residual,
        activation=activation,
    )
