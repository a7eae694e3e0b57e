"""Runs in each spawned process of tests/convert/test_convert_sync.py (a module of its own: spawn imports it).

Every rank loads the same saved Keras model (its batch norms have ``synchronized=True``, as a model
saved on TensorFlow under a distribution strategy), takes its own slice of the batch (sizes differ
per rank), and runs two training steps of (a) the model converted to PyTorch, whose batch norms are
``bnkit.torch.SyncBatchNorm``, in float64, and (b) the Keras model itself, whose batch norms
synchronise over torch.distributed on the torch backend. It saves what it saw.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from _gloo import join_world

SHAPE = (4, 4, 3)  # NHWC, one sample
STEPS = 2


def make_data(sizes):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((sum(sizes), *SHAPE)) * 2 + 1).astype("float32")
    target = rng.standard_normal((sum(sizes), 2)).astype("float32")
    return x, target


def torch_steps(model, x_nhwc, target):
    """Two training steps of the converted model (float64): outputs, input and parameter gradients, state."""
    outputs, input_grads, param_grads = [], [], []
    for _ in range(STEPS):
        x = torch.from_numpy(np.moveaxis(x_nhwc, -1, 1).copy()).double().requires_grad_(True)
        model.zero_grad()
        y = model(x)
        (y * torch.from_numpy(target).double()).sum().backward()
        outputs.append(y.detach())
        input_grads.append(x.grad)
        param_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"outputs": outputs, "input_grads": input_grads, "param_grads": param_grads, "state": state}


def keras_steps(model, x_nhwc, target):
    """Two training steps of the Keras model (no update of the trainable weights)."""
    outputs, input_grads, weight_grads = [], [], []
    for _ in range(STEPS):
        x = torch.from_numpy(x_nhwc).requires_grad_(True)
        y = model(x, training=True)
        weights = [w.value for w in model.trainable_weights]
        grads = torch.autograd.grad((y * torch.from_numpy(target)).sum(), [x, *weights])
        outputs.append(y.detach())
        input_grads.append(grads[0])
        weight_grads.append([g.clone() for g in grads[1:]])
    state = {w.path: torch.as_tensor(np.asarray(w.numpy())).clone() for w in model.non_trainable_weights}
    return {"outputs": outputs, "input_grads": input_grads, "weight_grads": weight_grads, "state": state}


def run(rank, world_size, init_file, out_dir, sizes, model_path):
    from bnkit.convert import keras_to_torch
    from bnkit.io import load_model

    join_world(rank, world_size, init_file)
    try:
        start = sum(sizes[:rank])
        x_all, target_all = make_data(sizes)
        x_local, target_local = x_all[start : start + sizes[rank]], target_all[start : start + sizes[rank]]
        converted = keras_to_torch(load_model(model_path)).double().train()
        result = {
            "types": [type(m).__name__ for m in converted.modules()],
            "torch": torch_steps(converted, x_local, target_local),
            "keras": keras_steps(load_model(model_path), x_local, target_local),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
