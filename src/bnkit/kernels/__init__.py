"""Fused Triton batch-norm kernels behind :mod:`bnkit.torch`'s layers on CUDA tensors.

``bnkit.torch`` layers call :func:`batch_norm` for an input when :func:`use_triton` says so:
a CUDA tensor of dtype float32, float16 or bfloat16, Triton importable, the switch on, and
not inside ``torch.compile`` (whose own code generation then sees PyTorch's native op).
Everything else takes the native path. Turn the kernels off with ``BNKIT_TRITON=0`` in the
environment or ``bnkit.kernels.set_enabled(False)``.

This module imports neither Triton nor the kernels: they load on the first CUDA call.
:func:`bnkit.kernels.ops.batch_norm_triton` is the functional form; it also runs on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before it is imported).
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["ENV_VAR", "available", "enabled", "set_enabled", "use_triton", "batch_norm"]

ENV_VAR = "BNKIT_TRITON"

_switch = True
_triton_found: bool | None = None


def available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def set_enabled(flag: bool) -> None:
    """Switch the Triton path on or off for this process (``BNKIT_TRITON=0`` also turns it off)."""
    global _switch
    if not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects True or False, got {flag!r}")
    _switch = flag


def enabled() -> bool:
    """True when the switch is on, ``BNKIT_TRITON`` is not ``0`` and Triton is importable."""
    return _switch and os.environ.get(ENV_VAR, "1").strip() != "0" and available()


def use_triton(input) -> bool:
    """Whether ``bnkit.torch`` runs ``input`` through the Triton kernels."""
    import torch

    if not isinstance(input, torch.Tensor) or not input.is_cuda:  # fx Proxies, CPU tensors
        return False
    if input.numel() == 0:  # an empty batch: nothing to launch, and the native path keeps the statistics
        return False
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if torch.compiler.is_compiling():
        return False
    return enabled()


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
