"""Keras 2 ``.h5`` files (or SavedModel folders) of every keras.applications network: read by bnkit,
converted to PyTorch.

    KERAS_BACKEND=torch python benchmarks/keras2_files.py [--networks ResNet50,NASNetLarge | --all]
        [--folder DIR] [--tf-python /tmp/tfvenv/bin/python] [--saved-model]

The files are written by the real tf-keras 2 (``tf_keras.applications``, ``weights=None``, 96x96x3
inputs, logits: ``classifier_activation=None``), in a helper process run with ``--tf-python``
(tensorflow + tf-keras, ``TF_USE_LEGACY_KERAS=1``; it needs neither torch nor bnkit). There every
BatchNormalization gets random statistics and affine weights (seeded: moving_mean ~ N(0, 0.1),
moving_variance ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1)), and ConvNeXt's LayerScale gammas
U(0.5, 1.5) (1e-6 at init would hide the blocks), so that getting them wrong shows; tf-keras' own
``model(x, training=False)`` on a seeded N(0, 1) batch of 2 is kept beside the file (``NAME.npz``).
Here, per network: the time of ``bnkit.io.load_model(NAME.h5)`` (a Keras 3 model), its output's
error, the Keras 3 model converted with ``bnkit.convert.keras_to_torch`` and written with
``bnkit.io.save_model`` (``.pt2``, ``torch.export``; "convert s" is both), that file read back with
``load_model`` and run on the batch in PyTorch's layout (N, C, H, W). Errors are relative to tf-keras:
max |got - tf-keras| / max |tf-keras|. A file bnkit refuses is listed with its ModelFileError.

Default: one network of each family (about 5-10 minutes on 2 cores). ``--all`` takes every network
(SLOWEST, the largest files, last; ConvNeXtXLarge's ``.h5`` alone is 1.4 GB). Files go to a
temporary folder, removed at the end, unless ``--folder`` names one: its files are kept and reused.
``--saved-model``: tf-keras saves each network as a SavedModel folder (``model.save(NAME_saved_model,
save_format="tf")``, TF 2.0-2.15's default) instead of an ``.h5``, and bnkit reads that folder.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (96, 96, 3)
BATCH = 2
READY = "keras2_files: written "  # the helper's answer on stdout, one line per network
V3 = {"MobileNetV3Small": {}, "MobileNetV3Large": {}}
V3.update({f"{n}Minimalistic": {"minimalistic": True} for n in list(V3)})
FAMILIES = {
    "Xception": [""], "VGG": ["16", "19"], "ResNet": ["50", "101", "152", "50V2", "101V2", "152V2"],
    "ResNetRS": ["50", "101", "152", "200", "270", "350", "420"], "Inception": ["V3", "ResNetV2"],
    "MobileNet": ["", "V2"], "DenseNet": ["121", "169", "201"], "NASNet": ["Mobile", "Large"],
    "EfficientNet": [f"B{i}" for i in range(8)], "EfficientNetV2": ["B0", "B1", "B2", "B3", "S", "M", "L"],
    "ConvNeXt": ["Tiny", "Small", "Base", "Large", "XLarge"],
    "RegNet": [f"{k}{n:03d}" for k in "XY" for n in (2, 4, 6, 8, 16, 32, 40, 64, 80, 120, 160, 320)],
}  # fmt: skip
NETWORKS = {f"{family}{v}": (f"{family}{v}", {}) for family, variants in FAMILIES.items() for v in variants}
NETWORKS.update({name: (name.removesuffix("Minimalistic"), kwargs) for name, kwargs in V3.items()})
DEFAULT = (
    "Xception,VGG16,ResNet50,ResNet50V2,ResNetRS50,InceptionV3,InceptionResNetV2,MobileNet,MobileNetV2,"
    "MobileNetV3Small,MobileNetV3LargeMinimalistic,DenseNet121,NASNetMobile,EfficientNetB0,EfficientNetV2B0,"
    "ConvNeXtTiny,RegNetX002,RegNetY002"
).split(",")
DRAW = {  # a BatchNormalization's weights, by name
    "moving_mean": lambda rng, shape: rng.normal(0, 0.1, shape),
    "moving_variance": lambda rng, shape: rng.uniform(0.5, 2, shape),
    "gamma": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "beta": lambda rng, shape: rng.normal(0, 0.1, shape),
}
SLOWEST = ["NASNetLarge", "EfficientNetB7", "EfficientNetV2L", "ConvNeXtXLarge", "RegNetY320", "ResNetRS420"]


# ------------------------------------------------------------- the helper (tensorflow + tf-keras 2)


def _model_path(folder: Path, name: str, saved_model: bool) -> Path:
    return folder / (f"{name}_saved_model" if saved_model else f"{name}.h5")


def write_tf_keras(folder: Path, name: str, saved_model: bool = False) -> None:
    """NAME.h5 (or the SavedModel folder NAME_saved_model) and NAME.npz (x, y: tf-keras' output), or
    NAME.error (one line) if tf-keras fails."""
    import numpy as np
    import tf_keras as keras

    builder, kwargs = NETWORKS[name]
    try:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, builder)(
            weights=None, input_shape=SHAPE, classifier_activation=None, **kwargs
        )
        rng = np.random.default_rng(0)
        for layer in model.submodules:
            if isinstance(layer, keras.layers.BatchNormalization):
                for weight in layer.weights:  # "bn/gamma:0"; a layer with scale=False has no gamma
                    values = DRAW[weight.name.rsplit("/", 1)[-1].split(":")[0]](rng, weight.shape)
                    weight.assign(values.astype("float32"))
            elif type(layer).__name__ == "LayerScale":
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
        x = rng.normal(size=(BATCH, *SHAPE)).astype("float32")
        if saved_model:
            model.save(_model_path(folder, name, True), save_format="tf")
        else:
            model.save(folder / f"{name}.h5")
        np.savez(folder / f"{name}.npz", x=x, y=model(x, training=False).numpy())
    except Exception as e:  # noqa: BLE001 - reported in the table
        (folder / f"{name}.error").write_text(f"tf-keras: {type(e).__name__}: {' '.join(str(e).split())}"[:300])


def helper(folder: Path, saved_model: bool) -> None:
    """Network names on stdin, one a line; each answered on stdout once its files are written."""
    for line in sys.stdin:
        write_tf_keras(folder, line.strip(), saved_model)
        print(READY + line.strip(), flush=True)


# ------------------------------------------------------------------------- this process (bnkit)


def _short(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _relative(got, expected) -> float:
    import numpy as np

    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _batch_norms(layer) -> int:
    from bnkit.keras import keras

    return sum(isinstance(s, keras.layers.BatchNormalization) + _batch_norms(s) for s in getattr(layer, "layers", []))


def measure(folder: Path, name: str, saved_model: bool = False) -> dict:
    import numpy as np
    import torch

    from bnkit.convert import UnsupportedLayerError, keras_to_torch
    from bnkit.io import ModelFileError, load_model, save_model
    from bnkit.keras import keras

    row = {"network": name}
    if (folder / f"{name}.error").exists():
        return {**row, "status": _short((folder / f"{name}.error").read_text())}
    data = np.load(folder / f"{name}.npz")
    x, expected = data["x"], data["y"]
    start = time.perf_counter()
    try:
        model = load_model(_model_path(folder, name, saved_model))
    except ModelFileError as e:
        return {**row, "status": "refused: " + _short(str(e).replace(str(folder) + os.sep, ""))}
    row["read_s"] = time.perf_counter() - start
    row["bn"] = _batch_norms(model)
    with torch.no_grad():
        row["keras3"] = _relative(keras.ops.convert_to_numpy(model(x, training=False)), expected)
    row["status"] = "read"
    pt2 = folder / f"{name}.pt2"
    pt2.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        save_model(keras_to_torch(model), pt2, input_shape=(SHAPE[-1], *SHAPE[:-1]))
    except (UnsupportedLayerError, ModelFileError) as e:
        return {**row, "status": "read; conversion refused: " + _short(str(e))}
    row["convert_s"] = time.perf_counter() - start
    del model
    program = load_model(pt2)
    with torch.no_grad():
        y = program(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))).numpy()
    row["pytorch"] = _relative(np.moveaxis(y, 1, -1) if y.ndim > 2 else y, expected)
    return row


def _cell(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "—"


HEADER = (
    "| network | BN layers | read s | Keras 3 read − tf-keras (rel.) | PyTorch .pt2 − tf-keras (rel.) "
    "| convert s | status |"
)


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    print("|---|--:|--:|--:|--:|--:|---|")
    for r in rows:
        cells = [r["network"], _cell(r, "bn", "d"), _cell(r, "read_s", ".2f"), _cell(r, "keras3", ".1e"),
                 _cell(r, "pytorch", ".1e"), _cell(r, "convert_s", ".2f"), r["status"].replace("|", "\\|")]  # fmt: skip
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", help=f"comma-separated names (default: {','.join(DEFAULT)})")
    parser.add_argument("--all", action="store_true", help=f"every network ({len(NETWORKS)}; the slowest last)")
    parser.add_argument("--folder", type=Path, help="where the files go (kept; default: a temporary folder)")
    parser.add_argument("--tf-python", default="/tmp/tfvenv/bin/python", help="a Python with tensorflow + tf-keras")
    parser.add_argument("--saved-model", action="store_true", help="SavedModel folders instead of .h5 files")
    parser.add_argument("--helper", type=Path, help=argparse.SUPPRESS)  # run by --tf-python
    args = parser.parse_args(argv)
    if args.helper:
        helper(args.helper, args.saved_model)
        return 0
    if args.all:
        names = [n for n in NETWORKS if n not in SLOWEST] + SLOWEST
    else:
        names = args.networks.split(",") if args.networks else DEFAULT
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown networks {unknown}; known: {', '.join(NETWORKS)}")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the bnkit command sets it
    import torch

    from bnkit.io import load_model

    first = "mobile_blocks_saved_model" if args.saved_model else "mobile_blocks.h5"
    load_model(Path(__file__).resolve().parents[1] / "tests/formats/keras2" / first)  # first-use costs (TensorFlow)
    temporary = None if args.folder else tempfile.TemporaryDirectory(prefix="keras2_files_")
    folder = args.folder or Path(temporary.name)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"keras2_files: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"files in {folder}", flush=True)  # fmt: skip
    # one tf-keras process for all networks, idle (blocked on its stdin) while this one measures
    with open(folder / "tf_keras.log", "w") as log:
        tf = subprocess.Popen(
            [args.tf_python, __file__, "--helper", str(folder), *(["--saved-model"] * args.saved_model)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log, text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
        )  # fmt: skip
    rows = []
    try:
        for name in names:
            if not (_model_path(folder, name, args.saved_model).exists() and (folder / f"{name}.npz").exists()):
                tf.stdin.write(name + "\n")
                tf.stdin.flush()
                while (line := tf.stdout.readline()) and line.strip() != READY + name:
                    pass
                if not line:
                    raise RuntimeError(f"the tf-keras process ended; see {folder / 'tf_keras.log'}")
            rows.append(measure(folder, name, args.saved_model))
            print(f"  {name}: {rows[-1]['status']}", file=sys.stderr, flush=True)
            gc.collect()
            if temporary:
                for suffix in (".h5", ".pt2"):
                    (folder / f"{name}{suffix}").unlink(missing_ok=True)
                shutil.rmtree(_model_path(folder, name, True), ignore_errors=True)
    finally:
        tf.stdin.close()
        tf.wait()
        print_table(rows)
        if temporary:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
