"""``bnkit fold IN OUT`` through the real console script."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from _lifecycle_models import ResNetStyle, randomize_batchnorms

from bnkit.io import load_model, save_model


def test_fold_pt2_to_pt2(run_cli, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorms(ResNetStyle(widths=(4, 8, 8))).eval()
    save_model(model, tmp_path / "net.pt2", input_shape=(3, 16, 16))
    proc = run_cli("fold", "net.pt2", "folded.pt2", check=True)
    assert "folded 9 of 9 batch norms into the preceding layer; wrote folded.pt2" in proc.stdout
    program = torch.export.load(str(tmp_path / "folded.pt2"))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("batch_norm" in op for op in ops)
    with warnings.catch_warnings():  # torch.export.unflatten may fail on this hierarchy: flat then
        warnings.simplefilter("ignore", RuntimeWarning)
        folded = load_model(tmp_path / "folded.pt2")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    again = run_cli("fold", "net.pt2", "folded.pt2")
    assert again.returncode == 2
    assert "bnkit fold: error: folded.pt2: already exists; pass --force to replace it" in again.stderr


def test_fold_keras_model(run_cli, tmp_path):
    from bnkit.keras import keras

    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = layers.BatchNormalization()(layers.Conv2D(4, 3)(inputs))  # folds
    x = layers.BatchNormalization()(layers.Conv2D(4, 3, activation="relu")(x))  # after a relu: affine
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    model.save(tmp_path / "small.keras")
    proc = run_cli("fold", "small.keras", "folded.keras", check=True)
    assert "folded 1 of 2 batch norms into the preceding layer, 1 replaced by ChannelAffine" in proc.stdout
    folded = load_model(tmp_path / "folded.keras")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-5, atol=1e-6)


def test_bad_input_shape_is_one_line_error(run_cli):
    proc = run_cli("fold", "a.pt2", "b.pt2", "--input-shape", "3,x")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "bnkit fold: error: argument --input-shape: must be positive integers separated by commas, "
        "like 64,64,1, without the batch dimension; got '3,x' (see bnkit fold --help)"
    )


def test_fold_says_why_a_batch_norm_was_not_folded(run_cli, tmp_path):
    proc = run_cli("fold", "bnkit.examples:torch_seed_model", "folded.pt", check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "folded 0 of 1 batch norm into the preceding layer, 1 replaced by ChannelAffine; wrote folded.pt"
    assert lines[1].startswith(
        "  BatchNorm2d '2' not folded (replaced by ChannelAffine): its input is the output of ReLU '1', not of a "
        "Conv/ConvTranspose/Linear (ReLU sits between Conv2d '0' and the batch norm"
    )
    import json

    data = json.loads(run_cli("fold", "bnkit.examples:torch_seed_model", "again.pt", "--json", check=True).stdout)
    assert (data["total"], data["folded"], data["replaced_by_channel_affine"]) == (1, 0, 1)
    (decision,) = data["batch_norms"]
    assert decision["outcome"] == "affine" and decision["reason"].startswith("its input is the output of ReLU '1'")
