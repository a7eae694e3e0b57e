"""The ``.keras`` and legacy ``.h5`` readers on real files Keras 3 saved, then altered as an attacker
would (the builders of ``tests/fuzz``: ``crafted_keras``, ``crafted_h5``, ``h5_craft``, ``zip_craft``).

The memory findings (gigabytes from a few megabytes) run in the crafted corpus
(``tests/fuzz/test_corpus.py``), under the harness' address-space limit; the ones here are safe to
run in the test process on any version of bnkit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _cli_batch import run_cli_batch

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))

import h5_craft  # noqa: E402
from crafted_keras import ESCAPES, small_keras_saved  # noqa: E402
from zip_craft import copy_zip  # noqa: E402

from bnkit.io import ModelFileError, load_model  # noqa: E402
from bnkit.keras import keras  # noqa: E402

KERNEL_KERAS = "layers/conv2d/vars/0"
KERNEL_H5 = "model_weights/conv/conv/kernel"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``fuzz_models.small_keras`` as ``.keras`` and ``.h5``, saved by Keras 3."""
    folder = tmp_path_factory.mktemp("saved")
    keras_path = small_keras_saved(folder / "small.keras")
    from fuzz_models import small_keras

    h5_path = folder / "small.h5"
    small_keras().save(h5_path)
    return {"keras": keras_path, "h5": h5_path}


def _with_keras_weights(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as archive:
        weights = archive.read("model.weights.h5")
    return copy_zip(source, target, replace={"model.weights.h5": h5_craft.edited(weights, edit)})


def _with_keras_config(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as archive:
        config = json.loads(archive.read("config.json"))
    edit(config)
    return copy_zip(source, target, replace={"config.json": json.dumps(config).encode()})


def _layers(config: dict) -> list[dict]:
    return config["config"]["layers"]


# ------------------------------------------------------------------------------- real files


def test_mobilenet_v2_reads_as_keras_and_h5(tmp_path):
    """A keras.applications network, as .keras and as legacy .h5, reads within the default limits
    and computes what the model Keras saved computes."""
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3), classes=10)
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    for name in ("m.keras", "m.h5"):
        model.save(tmp_path / name)
        loaded = load_model(tmp_path / name)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(loaded(x, training=False)), expected, rtol=1e-5, atol=1e-6
        )


def test_a_synchronized_batch_norm_in_an_h5_loads_as_bnkits(saved, tmp_path):
    """The variables are counted on the rerouted config (Keras refuses synchronized=True off TensorFlow)."""
    from bnkit.keras import BatchNormalization

    def synchronized(f) -> None:
        config = json.loads(f.attrs["model_config"])
        next(layer for layer in _layers(config) if layer["class_name"] == "BatchNormalization")["config"][
            "synchronized"
        ] = True
        f.attrs["model_config"] = json.dumps(config)

    path = h5_craft.edit_file(saved["h5"], tmp_path / "sync.h5", synchronized)
    layer = load_model(path).get_layer("bn")
    assert isinstance(layer, BatchNormalization) and layer.synchronized


def test_counting_the_variables_leaves_none_to_initialise(saved):
    """The variables of the model built to count them (without values) are not left for Keras'
    initialize_all_variables(), which would give them values later."""
    from keras.src.backend.common import global_state

    load_model(saved["keras"])
    assert not global_state.get_global_attribute("uninitialized_variables", None)


# ------------------------------------------------------------------------ memory, cheaply


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_a_config_of_nested_lists_is_refused_by_depth(saved, tmp_path, suffix):
    if suffix == "keras":
        path = copy_zip(saved["keras"], tmp_path / "n.keras", replace={"config.json": b"[" * 100_000 + b"]" * 100_000})
    else:
        nested = "[" * 100_000
        path = h5_craft.edit_file(saved["h5"], tmp_path / "n.h5", lambda f: f.attrs.__setitem__("model_config", nested))
    with pytest.raises(ModelFileError, match="nested deeper than 256 levels"):
        load_model(path)


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_a_config_that_declares_more_variables_than_the_weights_hold_is_refused_before_keras_builds_it(
    saved, tmp_path, suffix
):
    """Dense(units=2**16): a 64 MiB kernel Keras would allocate, then fail on the saved (256, 2)."""

    def wider(config) -> None:
        next(layer for layer in _layers(config) if layer["config"]["name"] == "fc")["config"]["units"] = 2**16

    if suffix == "keras":
        path = _with_keras_config(saved["keras"], tmp_path / "wide.keras", wider)
    else:

        def edit(f) -> None:
            config = json.loads(f.attrs["model_config"])
            wider(config)
            f.attrs["model_config"] = json.dumps(config)

        path = h5_craft.edit_file(saved["h5"], tmp_path / "wide.h5", edit)
    from bnkit.formats.limits import format_bytes

    float32 = 4
    conv_and_bn = 3 * 3 * 3 * 4 + 4 + 4 * 4
    variables = float32 * (256 * 2**16 + 2**16 + conv_and_bn)
    weights = float32 * (256 * 2 + 2 + conv_and_bn)
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    assert f"declares {format_bytes(variables)} of variables, the weights hold {format_bytes(weights)}" in str(
        caught.value
    )


def test_variables_over_the_budget_are_refused_before_keras_creates_them(saved, tmp_path):
    """Checked before the weights: the budget, not the weights file, stops them."""
    from bnkit.formats.limits import ReadLimits

    def wider(config) -> None:
        next(layer for layer in _layers(config) if layer["config"]["name"] == "fc")["config"]["units"] = 2**16

    path = _with_keras_config(saved["keras"], tmp_path / "wide.keras", wider)
    with pytest.raises(ModelFileError, match=r"the model's 8 variables \(64.3 MiB.*over the limit of 16 MiB"):
        load_model(path, limits=ReadLimits(max_model_bytes=16 * 2**20))


# ------------------------------------------------------------------------ other files, plugins


@pytest.mark.parametrize(
    ("kind", "expected"), [("external-storage", "is stored in external files"), ("virtual", "is a virtual dataset")]
)
@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_a_dataset_that_reads_another_file_is_refused_by_name(saved, tmp_path, suffix, kind, expected):
    kernel = KERNEL_KERAS if suffix == "keras" else KERNEL_H5
    if kind == "external-storage":
        secret = tmp_path / "secret.bin"
        secret.write_bytes(b"SECRET-" * 62)
        edit = h5_craft.external_storage(kernel, secret)
    else:
        edit = h5_craft.virtual(kernel, h5_craft.other_file(tmp_path / "other.h5"))
    if suffix == "keras":
        path = _with_keras_weights(saved["keras"], tmp_path / "x.keras", edit)
    else:
        path = h5_craft.edit_file(saved["h5"], tmp_path / "x.h5", edit)
    with pytest.raises(ModelFileError, match=f"dataset '/{kernel}' {expected}"):
        load_model(path)


_MARKER_PLUGIN = r"""
#include <stdio.h>
/* HDF5 opens every library in its plugin folders to find a filter: this one says it was loaded */
__attribute__((constructor)) static void loaded(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("an HDF5 plugin was loaded", f); fclose(f); }
}
int H5PLget_plugin_type(void) { return 0; }
const void *H5PLget_plugin_info(void) { return 0; }
"""


def _marker_plugin(folder: Path, marker: Path) -> Path | None:
    """A folder holding an HDF5 "plugin" that writes ``marker`` when loaded; None without a C compiler."""
    if shutil.which("gcc") is None:
        return None
    plugins = folder / "plugins"
    plugins.mkdir()
    source = folder / "marker.c"
    source.write_text(_MARKER_PLUGIN)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(plugins / "libmarker.so")],
        check=True,
    )
    return plugins


@pytest.fixture(scope="module")
def summaries(saved, tmp_path_factory):
    """``bnkit summary`` of each file the command-line tests of this module read, all in one
    subprocess (``run_cli_batch``: starting Python and importing torch and Keras is most of each
    one's time), under ``HDF5_PLUGIN_PATH`` naming a folder whose one library writes ``marker``
    when loaded (where a C compiler can build it): file name -> result, and the marker."""
    folder = tmp_path_factory.mktemp("summaries")
    marker = folder / "marker"
    plugins = _marker_plugin(folder, marker)
    broken = _with_keras_weights(saved["keras"], folder / "broken.keras", lambda f: f.__delitem__("layers/dense"))
    commands = {
        "broken.keras": ("summary", broken),
        "broken.keras --verbose": ("summary", broken, "--verbose"),
        "class.keras": ("summary", _with_keras_config(saved["keras"], folder / "class.keras", _escaped_class_name)),
    }
    if plugins is not None:
        crafted = (
            h5_craft.edit_file(saved["h5"], folder / "f.h5", h5_craft.unknown_filter(KERNEL_H5)),
            _with_keras_weights(saved["keras"], folder / "f.keras", h5_craft.unknown_filter(KERNEL_KERAS)),
        )
        commands.update({path.name: ("summary", path) for path in crafted})
    with pytest.MonkeyPatch.context() as env:
        if plugins is not None:
            env.setenv("HDF5_PLUGIN_PATH", str(plugins))
        procs = run_cli_batch(list(commands.values()), folder)
    runs = dict(zip(commands, procs, strict=True))
    return runs, marker


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler to build the marker plugin")
def test_no_hdf5_filter_plugin_is_loaded(summaries):
    """A weight filtered with an unknown filter (32004, LZ4): HDF5 would look it up in its plugin
    folders and load their shared libraries. Here the folder holds one that writes a marker (checked
    once all of this module's command lines ran: loaded by any of them, it would be there)."""
    runs, marker = summaries
    assert not marker.exists(), "HDF5 loaded a plugin"
    for name in ("f.h5", "f.keras"):
        proc = runs[name]
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, (name, proc.stderr)
        assert "is compressed with HDF5 filter 32004, which is not built in" in proc.stderr, name


def test_the_plugin_path_is_restored_after_reading(saved):
    from h5py import h5pl

    before = [h5pl.get(i) for i in range(h5pl.size())]
    load_model(saved["h5"])
    assert [h5pl.get(i) for i in range(h5pl.size())] == before


# ------------------------------------------------------------------------------------ hangs


def test_a_global_heap_hdf5_would_loop_on_is_refused(saved, tmp_path, run_cli):
    """model_config lives in a global heap whose free-space object says 0 bytes: HDF5 2.0 loops
    forever reading it, holding Python's lock (SIGTERM, SIGALRM and watchdog threads wait on it)."""
    path = tmp_path / "loop.h5"
    path.write_bytes(h5_craft.looping_heap(saved["h5"].read_bytes()))
    proc = run_cli("summary", path, timeout=60)  # the subprocess is killed past it
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    heap = saved["h5"].read_bytes().rindex(b"GCOL")
    assert f"the global heap at byte {heap} is damaged" in proc.stderr and "would loop on it forever" in proc.stderr


# ------------------------------------------------------------------------- terminal escapes


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_a_layer_named_with_escape_sequences_is_refused_by_name(saved, tmp_path, suffix):
    from fuzz_models import small_keras

    model = small_keras()
    model.get_layer("conv").name = "conv" + ESCAPES
    path = tmp_path / f"escaped.{suffix}"
    model.save(path)
    with pytest.raises(ModelFileError, match="control characters in its name") as caught:
        load_model(path)
    assert "\x1b" not in str(caught.value) and "conv\\x1b]0;pwned" in str(caught.value)


def _escaped_class_name(config) -> None:
    next(layer for layer in _layers(config) if layer["config"]["name"] == "conv")["class_name"] = ESCAPES


def test_escape_sequences_in_a_class_name_are_not_printed(summaries):
    runs, _ = summaries
    proc = runs["class.keras"]
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout and "\\x1b]0;pwned\\x07" in proc.stderr


# ---------------------------------------------------------- Keras' warnings while it fails


@pytest.mark.parametrize("verbose", [False, True])
def test_a_broken_keras_file_gives_one_line_and_its_warnings_with_verbose(summaries, verbose):
    """The weights file lacks the last layer's group: Keras warns (UserWarning: Skipping nested
    container) and then fails. The error keeps Keras' cause; the warning shows with --verbose only."""
    runs, _ = summaries
    proc = runs["broken.keras --verbose" if verbose else "broken.keras"]
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Layer 'fc' expected 2 variables, but received 0 variables" in errors[0]
    warnings = [line for line in proc.stderr.splitlines() if line not in errors]
    if verbose:
        assert any("while reading: UserWarning: Skipping nested container" in line for line in warnings), proc.stderr
    else:
        assert warnings == [], proc.stderr
