"""The seed network's story, end to end, as data: what goes wrong porting a Keras model with
BatchNormalization to PyTorch, why, and the fix.

1. The Keras model and its summary (13,108,758 params, 64 non-trainable).
2. A hand port to PyTorch as users write it: the weights copied correctly, but
   ``nn.BatchNorm2d(32, momentum=0.15)`` (Keras' number copied literally, PyTorch's eps) and
   the module left in ``train()`` mode, as every new PyTorch module is. Its summary, and why
   PyTorch tools print 13,108,694.
3. ``bnkit.compare`` in inference: the port normalises with batch statistics (``training-mode``)
   and a different eps (``eps``).
4. After ``model.eval()``: only ``eps`` is left.
5. One training step: ``momentum-convention`` and ``running-variance-estimator`` as well.
6. The fix, ``bnkit.convert.keras_to_torch`` (Keras semantics kept), written to files and read
   back: the models agree in inference and in training.

:func:`run_walkthrough` returns the steps; ``bnkit walkthrough`` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Step", "run_walkthrough"]


@dataclass
class Step:
    title: str
    text: str
    code: str = ""
    summary: object | None = None  # a bnkit ModelSummary to render
    report: object | None = None  # a bnkit CompareReport to render
    files: list[str] = field(default_factory=list)


def _hand_port(keras_model):
    """The PyTorch port users write by hand: right weights, literal momentum, train() mode."""
    import torch
    from torch import nn

    from bnkit.convert import keras_to_torch
    from bnkit.examples.seed import SEED_KERAS_MOMENTUM

    port = keras_to_torch(keras_model, semantics="target")
    for name, module in list(port.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            literal = nn.BatchNorm2d(module.num_features, momentum=SEED_KERAS_MOMENTUM)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(literal, key).copy_(getattr(module, key))
            setattr(port, name, literal)
    return port.train()


def run_walkthrough(out_dir: str | Path, *, batch: int = 8, seed: int = 0) -> list[Step]:
    """Run every step on the bundled seed network; files are written under ``out_dir``."""
    import numpy as np

    import bnkit
    from bnkit.convert import keras_to_torch
    from bnkit.examples import SEED_INPUT_SHAPE, keras_seed_model
    from bnkit.io import load_model, save_model

    out_dir = Path(out_dir)
    steps: list[Step] = []
    keras_model = keras_seed_model(seed=seed)
    x = np.random.default_rng(seed).normal(size=(batch, *SEED_INPUT_SHAPE)).astype("float32")
    keras_path = save_model(keras_model, out_dir / "seed.keras")

    steps.append(
        Step(
            "1. The seed network in Keras",
            "Conv2D(32) → BatchNormalization(momentum=0.15) → Flatten → Dense(100) → Dense(10) on 64×64×1. "
            "Keras counts the BN's moving mean and variance as non-trainable params: 4 × 32 = 128 for the layer.",
            code="bnkit summary seed.keras",
            summary=bnkit.summary(keras_model),
            files=[str(keras_path)],
        )
    )

    port = _hand_port(keras_model)
    steps.append(
        Step(
            "2. The same network ported to PyTorch by hand",
            "Weights copied correctly, but nn.BatchNorm2d(32, momentum=0.15) copies Keras' number literally "
            "(in PyTorch momentum weighs the new batch, in Keras the old value), keeps PyTorch's eps=1e-5 "
            "(Keras: 1e-3), and the module is still in train() mode, as every new PyTorch module is.",
            code="nn.BatchNorm2d(32, momentum=0.15)",
            summary=bnkit.summary(port, input_shape=(SEED_INPUT_SHAPE[2], *SEED_INPUT_SHAPE[:2])),
        )
    )

    steps.append(
        Step(
            "3. Compare them in inference",
            "Keras calls outside fit() run in inference mode (moving statistics); the PyTorch port, left in "
            "train(), normalises with the batch's own statistics.",
            code="bnkit.compare(keras_model, port, x)",
            report=bnkit.compare(keras_model, port, x),
        )
    )

    port.eval()
    steps.append(
        Step(
            "4. After port.eval()",
            "Both use moving statistics now; what is left is eps: 1e-3 in Keras, 1e-5 in the port.",
            code="port.eval(); bnkit.compare(keras_model, port, x)",
            report=bnkit.compare(keras_model, port, x),
        )
    )

    steps.append(
        Step(
            "5. Compare one training step",
            "In training both normalise with the batch statistics, but the running statistics drift apart: "
            "momentum=0.15 keeps 15% of the old value in Keras and 85% in PyTorch, and PyTorch folds in the "
            "unbiased variance n/(n-1) where Keras folds in the biased one.",
            code="bnkit.compare(keras_model, port, x, training=True)",
            report=bnkit.compare(keras_model, port, x, training=True),
        )
    )

    converted = keras_to_torch(keras_model)  # Keras semantics kept: bnkit BatchNorm2d(convention="keras")
    torch_path = save_model(converted, out_dir / "seed.pt2", input_shape=(SEED_INPUT_SHAPE[2], *SEED_INPUT_SHAPE[:2]))
    reloaded = load_model(torch_path)
    inference = bnkit.compare(keras_model, reloaded, x)
    training = bnkit.compare(keras_model, reloaded, x, training=True)
    steps.append(
        Step(
            "6. The fix: convert with bnkit",
            "keras_to_torch keeps Keras' batch-norm semantics (bnkit.torch.BatchNorm2d(convention='keras'): "
            "eps=1e-3, momentum read Keras' way, biased running variance) and reorders the Dense rows after "
            "Flatten (NHWC vs NCHW). Written to seed.pt2 and read back, it agrees with Keras in inference "
            f"({'agree' if inference.agree else 'DISAGREE'}) and in a training step "
            f"({'agree' if training.agree else 'DISAGREE'}).",
            code="bnkit convert seed.keras seed.pt2",
            report=training,
            files=[str(torch_path)],
        )
    )
    return steps
