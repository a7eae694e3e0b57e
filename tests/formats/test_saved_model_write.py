"""tf-keras 2 SavedModel folders written by bnkit (``bnkit convert model.pt2 out_dir``, ``save_model(model, "dir")``).

A torchvision ResNet-18 (32x32, random batch-norm statistics) is exported to ``.pt2``, converted by the
real ``bnkit convert`` into a SavedModel folder (tf-keras 2.21 saves it in a subprocess, bnkit reads
it back before the rename), then loaded by the real tf-keras 2.21 (``tf_keras.models.load_model``)
and by TensorFlow (``tf.saved_model.load``, the ``serving_default`` signature) in one subprocess, and
by bnkit's reader here; all are compared with PyTorch's output on the same input.

Tolerance: relative to the largest output, 1e-5 (TensorFlow and PyTorch sum convolutions in other
orders: a few float32 ulp per layer; a misplaced weight is off by far more).

The refusals (an existing path, a folder that is not a SavedModel, a layer tf-keras 2 could not load,
a failing or crashing subprocess, TensorFlow missing) are checked without TensorFlow's slow save.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bnkit.formats import saved_model_write
from bnkit.formats.atomic import atomic_folder
from bnkit.io import ModelFileError, load_model, save_model
from bnkit.keras import keras
from conftest import import_torchvision
from convert.real_networks import randomize_normalization  # every batch norm 1d/2d: statistics, gamma, beta

RTOL = 1e-5

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="tf-keras 2 not installed")

_LOAD = r"""
import sys
import numpy as np
import tensorflow as tf
import tf_keras
folder, x_file, out = sys.stdin.readline().split()  # TensorFlow is imported while bnkit writes the folder
x = np.load(x_file)
model = tf_keras.models.load_model(folder, compile=False)
serving = tf.saved_model.load(folder).signatures["serving_default"]
(y_sig,) = serving(tf.constant(x)).values()
np.savez(out, tf_keras=model(x, training=False).numpy(), signature=y_sig.numpy())
"""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_resnet18_converted_to_a_saved_model_loads_in_tf_keras_tensorflow_and_bnkit(run_cli, tmp_path):
    torchvision = import_torchvision()
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    randomize_normalization(net)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    save_model(net, tmp_path / "resnet18.pt2", input_shape=(3, 32, 32))
    out = tmp_path / "resnet18"
    x_nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    np.save(tmp_path / "x.npy", x_nhwc)
    # the real tf-keras 2.21 and TensorFlow, in a process of their own, started first
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    loader = subprocess.Popen(
        [sys.executable, "-c", _LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=tmp_path.parent,
    )  # fmt: skip

    proc = run_cli("convert", tmp_path / "resnet18.pt2", out, "--json")
    if proc.returncode != 0:
        loader.kill()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    back = report["read_back"]
    assert back["written_as"] == "a tf-keras 2 SavedModel folder" and back["relative_difference"] <= RTOL
    assert {p.name for p in out.iterdir()} >= {"saved_model.pb", "keras_metadata.pb", "variables"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18", "resnet18.pt2", "x.npy"]  # nothing else left

    _, stderr = loader.communicate(f"{out} {tmp_path / 'x.npy'} {tmp_path / 'y.npz'}\n", timeout=300)
    assert loader.returncode == 0, stderr[-3000:]
    outputs = np.load(tmp_path / "y.npz")
    assert _relative(outputs["tf_keras"], expected) <= RTOL
    assert _relative(outputs["signature"], expected) <= RTOL

    # bnkit's own reader
    model = load_model(out)
    assert _relative(np.asarray(keras.ops.convert_to_numpy(model(x_nhwc, training=False))), expected) <= RTOL

    # an existing folder is not replaced without force (refused before any work)
    with pytest.raises(ModelFileError, match="already exists; pass --force"):
        save_model(model, out)


def _keras_model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    return keras.Model(inputs, x, name="small")


def test_a_layer_tf_keras_could_not_load_writes_nothing(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Activation("hard_sigmoid", name="hard")(inputs))
    with pytest.raises(ModelFileError, match="'hard'") as info:
        save_model(model, tmp_path / "out")
    assert "not written" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_paths_that_are_not_saved_models_are_never_replaced(tmp_path):
    model = _keras_model()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for path in (other, tmp_path / "file"):
        for force in (False, True):
            with pytest.raises(ModelFileError, match="not replaced"):
                save_model(model, path, force=force)
    assert (other / "keep.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me too"
    with pytest.raises(ModelFileError, match="holds a Keras model; convert the PyTorch module first"):
        save_model(nn.Linear(2, 2), tmp_path / "torch_out")


def test_force_replaces_a_saved_model_folder_by_renames(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "saved_model.pb").write_text("old")
    (target / "old_only").write_text("old")
    with atomic_folder(target, "saved_model.pb", "SavedModel folder", force=True) as (folder, work):
        assert folder.parent == work and work.parent == tmp_path
        folder.mkdir()
        (folder / "saved_model.pb").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["saved_model.pb"]
    assert (target / "saved_model.pb").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a writer that fails: the old folder stays, nothing else is left
    with pytest.raises(ModelFileError, match="cannot write the folder"):
        with atomic_folder(target, "saved_model.pb", "SavedModel folder", force=True) as (folder, work):
            folder.mkdir()
            raise OSError(28, "No space left on device")
    assert (target / "saved_model.pb").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    ("script", "cause"),
    [
        ("import sys\nprint('bnkit-save-error: ValueError: boom', file=sys.stderr)\nsys.exit(3)", "ValueError: boom"),
        ("import os\nos.abort()", "killed by SIGABRT"),
    ],
)
def test_a_failing_or_crashing_tf_keras_subprocess_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, script, cause):
    monkeypatch.setattr(saved_model_write, "SAVE_SCRIPT", script)
    with pytest.raises(ModelFileError, match="tf-keras 2 could not save the SavedModel") as info:
        save_model(_keras_model(), tmp_path / "out")
    assert cause in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_tensorflow_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf_keras" else real(name, *a))
    with pytest.raises(ModelFileError) as info:
        save_model(_keras_model(), tmp_path / "out")
    assert str(info.value) == (
        f"{tmp_path / 'out'}: writing a SavedModel folder needs tf_keras, which is not installed "
        "(pip install 'bnkit[tensorflow]')"
    )
    assert list(tmp_path.iterdir()) == []
