"""tf-keras 2 SavedModel folders (tf-keras 2.21, ``keras2/make_files.py``) read as tf-keras computes them.

``NAME_saved_model/`` is the same tf-keras model object as ``NAME.h5``, saved with
``model.save(folder, save_format="tf")``; ``NAME.npz`` holds tf-keras' own outputs on a fixed input.
Tolerance: as for the ``.h5`` files (test_keras2_files.py), TensorFlow's and PyTorch's convolutions sum
in different orders, so float32 results differ by a few units in the last place of the largest
intermediate values (outputs here are O(1); measured differences are at most 1.2e-7).

The damaged folders are made from the real ones: files removed or cut, and a checkpoint rewritten by
TensorFlow's own writer (``SaveV2``) with one variable of another shape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnkit.io import ModelFileError, ReadLimits, load_model
from conftest import SRC

FILES = Path(__file__).parent / "keras2"
ATOL = 2e-5
NAMES = ["mobile_blocks", "nested_and_scales", "nested_functional", "normalization"]


def _expected(name: str):
    data = np.load(FILES / f"{name}.npz")
    return data["x"], data["y"]


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FILES / f"{name}_saved_model", tmp_path / f"{name}_saved_model"))


def _refusal(path, **kwargs) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_model(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def test_every_command_reads_or_refuses_them_in_one_line_and_tensorflow_prints_nothing(tmp_path, capfd):
    """Through the command line (in this process, so that TensorFlow is imported here first when this file
    runs alone): the folder or its saved_model.pb read, or refused in one line; nothing TensorFlow's C++
    code prints as it is imported reaches file descriptor 2."""
    from bnkit.cli import main

    damaged = _copy("nested_and_scales", tmp_path)
    (damaged / "variables" / "variables.index").unlink()
    folder = FILES / "nested_functional_saved_model"
    assert main(["summary", str(folder)]) == 0
    out, err = capfd.readouterr()
    assert "BatchNormalization" in out and "1,004" in out and err == ""  # 1,004: tf-keras' count_params()
    assert main(["lint", str(folder / "saved_model.pb")]) in (0, 1)
    assert capfd.readouterr().err == ""
    for path, fragment in (
        (FILES / "plain_saved_model", "no Keras model in it"),
        (damaged, "variables.index is missing"),
    ):
        assert main(["summary", str(path)]) == 2
        err = capfd.readouterr().err
        assert err.startswith(f"bnkit summary: error: {path}: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_model_computes_what_tf_keras_computed(name):
    model = load_model(FILES / f"{name}_saved_model")
    x, expected = _expected(name)
    got = np.asarray(model(x, training=False).detach().cpu())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_the_weights_are_those_the_h5_of_the_same_model_holds(name):
    """Bit for bit: a nested model's variables are listed layer by layer in its SavedModel, trainable
    ones first in its .h5; a Normalization's are not listed at all, only named."""
    saved = load_model(FILES / f"{name}_saved_model")
    h5 = load_model(FILES / f"{name}.h5")
    assert len(saved.weights) == len(h5.weights)
    for a, b in zip(saved.weights, h5.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the batch norms tf-keras runs fused are read as such from both (bnkit.formats.keras2_fused)
    saved_layers, h5_layers = (
        [(layer.name, type(layer).__name__, getattr(layer, "convention", None)) for layer in m._flatten_layers()]
        for m in (saved, h5)
    )
    assert saved_layers == h5_layers


def test_a_nested_model_with_a_frozen_batch_norm_and_a_slash_in_a_name():
    """Named by its saved_model.pb, as by its folder."""
    from bnkit.keras import keras

    block = load_model(FILES / "nested_functional_saved_model" / "saved_model.pb").get_layer("block")
    frozen = block.get_layer("bn_frozen")
    assert isinstance(frozen, keras.layers.BatchNormalization) and not frozen.trainable
    assert frozen.epsilon == 1e-5 and block.get_layer("block_conv_b") is not None
    assert float(np.asarray(frozen.moving_variance).min()) >= 0.5  # the file's statistics, not the initial ones


def test_a_sync_batch_norm_reads_as_a_synchronised_one():
    from bnkit.keras import BatchNormalization

    layer = load_model(FILES / "tf_keras_saved_model").get_layer("sync_bn")
    assert isinstance(layer, BatchNormalization) and layer.synchronized


def test_a_saved_model_with_no_keras_model_is_refused_by_what_it_is_and_what_to_do():
    message = _refusal(FILES / "plain_saved_model")
    assert "a TensorFlow SavedModel with no Keras model in it (no keras_metadata.pb" in message
    assert "save the model as .keras or .h5 instead" in message


def _rewrite_checkpoint(folder: Path, change: dict) -> None:
    """The folder's checkpoint written again by TensorFlow's own writer, ``change`` (key -> value) applied."""
    import tensorflow as tf

    prefix = str(folder / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    keys = sorted(reader.get_variable_to_shape_map())
    values = [change.get(key, reader.get_tensor(key)) for key in keys]
    for path in (folder / "variables").iterdir():
        path.unlink()
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=values)


def test_damaged_folders_are_refused_in_one_line_naming_what(tmp_path):
    gamma = "layer_with_weights-3/gamma/.ATTRIBUTES/VARIABLE_VALUE"  # layer 'bn' of nested_and_scales
    wrong_shape = _copy("nested_and_scales", tmp_path / "shape")
    _rewrite_checkpoint(wrong_shape, {gamma: np.ones(9, "float32")})
    message = _refusal(wrong_shape)
    assert f"layer 'bn' (BatchNormalization): variable '{gamma}' has shape (9,)" in message
    assert "has shape (8,)" in message

    missing = _copy("nested_and_scales", tmp_path / "missing")
    (missing / "variables" / "variables.data-00000-of-00001").unlink()
    assert "variables/ holds no variables.data-* file" in _refusal(missing)
    (missing / "variables" / "variables.index").unlink()
    assert "variables/variables.index is missing" in _refusal(missing)

    cut = _copy("mobile_blocks", tmp_path / "cut")
    data = cut / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    assert "its data files hold 1000 bytes (truncated?)" in _refusal(cut)

    flipped = _copy("mobile_blocks", tmp_path / "flipped")
    data = flipped / "variables" / "variables.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100:104] = b"\xff\xff\xff\xff"
    data.write_bytes(bytes(raw))
    assert "TensorFlow's checkpoint reader failed" in _refusal(flipped)

    metadata = _copy("mobile_blocks", tmp_path / "metadata")
    (metadata / "keras_metadata.pb").write_bytes(b"\xff" * 64)
    assert "keras_metadata.pb is not tf-keras' metadata message" in _refusal(metadata)


def test_reading_stays_within_the_memory_limit():
    """keras_metadata.pb is charged before it is read, then each JSON document in it, then the variables."""
    folder = FILES / "mobile_blocks_saved_model"
    message = _refusal(folder, limits=ReadLimits(max_model_bytes=20_000))
    assert "refused: keras_metadata.pb (30.6 KiB: the file and its parsed message) would take 61.2 KiB" in message
    message = _refusal(folder, limits=ReadLimits(max_model_bytes=200_000))
    assert "refused: keras_metadata.pb's model config (16.2 KiB of JSON)" in message
    assert "over the limit of 195 KiB for a model (raise it with --max-model-bytes)" in message


_ABSENT = r"""
import sys
sys.modules["tensorflow"] = None  # TensorFlow not installed, as bnkit sees it
from bnkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_tensorflow_the_command_says_which_extra_to_install(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    folder = FILES / "nested_functional_saved_model"
    proc = subprocess.run(
        [sys.executable, "-c", _ABSENT, "summary", str(folder)],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr == (
        f"bnkit summary: error: {folder}: reading a SavedModel folder needs tensorflow, which is not installed "
        "(pip install 'bnkit[tensorflow]')\n"
    )


def test_the_framework_output_on_file_descriptor_2_is_kept_off_the_terminal(capfd):
    from bnkit.streams import keep_fd_output

    with keep_fd_output() as kept:
        os.write(2, b"I0000 cudart_stub.cc:31] Could not find cuda drivers\n\n")
    print("after", file=sys.stderr)
    assert kept == ["I0000 cudart_stub.cc:31] Could not find cuda drivers"]
    assert capfd.readouterr().err == "after\n"
