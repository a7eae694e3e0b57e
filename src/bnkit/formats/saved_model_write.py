"""Writing a Keras 3 model as a tf-keras 2 SavedModel folder (``saved_model.pb``, ``keras_metadata.pb``,
``variables/``), as tf-keras 2's ``model.save("dir")`` writes one: tf-keras 2
(``tf_keras.models.load_model``), TensorFlow (``tf.saved_model.load``, its ``serving_default``
signature) and bnkit's reader (:mod:`bnkit.formats.saved_model`) load it.

1. The model is translated as for a Keras 2 ``.h5`` (:func:`bnkit.formats.keras2_write.keras2_model`):
   a layer tf-keras 2 could not load as exactly that layer is refused by name, before anything is
   written; the ``.h5`` (:func:`bnkit.formats.keras_h5._write_h5`) goes into a private folder beside
   the target (:func:`~bnkit.formats.atomic.atomic_folder`).
2. A **subprocess** with tf-keras 2 (``TF_USE_LEGACY_KERAS=1``, no GPU) loads that ``.h5`` and saves it
   with ``model.save(folder, save_format="tf")``. TensorFlow and torch in one process are fine in bnkit
   (:func:`bnkit.frameworks.tensorflow_beside_torch`), but tf-keras' SavedModel save traces the model's
   functions into TensorFlow graphs (the global state of ``tf.function``, Keras 2's own layer classes
   registered beside Keras 3's): that is kept out of bnkit's process, and a crash there (an abort in
   TensorFlow's C++ code) cannot take bnkit down. What it prints on stderr is kept (``--verbose``,
   the error's ``framework_warnings``); its failure is one line with its cause.
3. The folder is read back with bnkit's own SavedModel reader and run against the model on a random
   batch (relative tolerance :data:`~bnkit.formats.keras_h5.ROUND_TRIP_TOLERANCE`) before it is
   renamed into place; an existing SavedModel folder is replaced only with ``force`` (the old one
   renamed aside, the new one in, the old one removed), any other existing path never.

A failure leaves nothing behind. TensorFlow and tf-keras (``pip install 'bnkit[tensorflow]'``) are
looked for before any work; the reading back imports TensorFlow into bnkit's process, as reading any
SavedModel does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bnkit.formats import ModelFileError
from bnkit.text import one_line, printable

__all__ = ["write", "NEEDED_FOR", "SAVE_SCRIPT"]

NEEDED_FOR = "writing a SavedModel folder"
MARKER = "saved_model.pb"
WHAT = "tf-keras 2 SavedModel folder"
_KEPT_STDERR = 64 * 2**10  # bytes of the subprocess's stderr kept for --verbose

# run by ``python -c`` in the subprocess: argv[1] the .h5, argv[2] the SavedModel folder to create.
# A Python error is reported on its own last line, marked, for the parent's one-line message.
SAVE_SCRIPT = r"""
import sys
try:
    import tf_keras
    model = tf_keras.models.load_model(sys.argv[1], compile=False)
    model.save(sys.argv[2], save_format="tf", include_optimizer=False)
except BaseException as e:
    import traceback
    traceback.print_exc()
    print("bnkit-save-error: " + type(e).__name__ + ": " + " ".join(str(e).split())[:500], file=sys.stderr)
    sys.exit(3)
"""


def write(model, path: Path, *, force: bool = False, input_shape=None):
    """Write the Keras model ``model`` as a tf-keras 2 SavedModel folder at ``path`` (see the module doc);
    return the :class:`~bnkit.formats.keras_h5.RoundTrip` of its reading back. ``input_shape`` (without
    the batch, PyTorch's layout) sizes the check's batch where the model leaves a dimension open."""
    from bnkit.formats.atomic import atomic_folder, check_folder_writable
    from bnkit.formats.keras2_write import NotWritable, keras2_model
    from bnkit.formats.keras_h5 import _check_batch, _read_back, _write_h5

    path = Path(path)
    shown = printable(str(path))
    check_installed(shown)
    check_folder_writable(path, MARKER, WHAT, force)  # before the translation
    try:
        translated = keras2_model(model)
    except NotWritable as e:
        raise ModelFileError(f"{shown}: not written: tf-keras 2 could not load it exactly: {e}") from e
    batch = _check_batch(model, input_shape, shown)
    with atomic_folder(path, MARKER, WHAT, force) as (folder, work):
        h5 = work / "model.h5"
        _write_h5(translated, h5)
        kept = _save_with_tf_keras(h5, folder, work, shown)
        try:
            from bnkit.formats.saved_model import read

            result = _read_back(model, folder, batch, shown, read_with=read, what="SavedModel folder")
        except ModelFileError as e:
            e.framework_warnings = kept + e.framework_warnings
            raise
    return result


def check_installed(shown: str) -> None:
    """TensorFlow and tf-keras are there (found, not imported), or one line saying how to install them."""
    import importlib.util

    from bnkit.frameworks import MissingFramework, missing_framework

    for package in ("tensorflow", "tf_keras"):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            error: MissingFramework = missing_framework(package, NEEDED_FOR)
            raise ModelFileError(f"{shown}: {error}") from error


def _save_with_tf_keras(h5: Path, folder: Path, work: Path, shown: str) -> list[str]:
    """Run :data:`SAVE_SCRIPT` on ``h5``; what it printed on stderr, a line each. Its failure (an error,
    a crash, no folder) is one :class:`ModelFileError` line with the cause; a stop signal (Ctrl-C,
    SIGTERM) received meanwhile ends it too."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    log = work / "tf_keras.stderr"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", SAVE_SCRIPT, str(h5), str(folder)],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, cwd=work, env=env,
        )  # fmt: skip
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # a stop signal in the wait: the subprocess goes too
                process.kill()
                process.wait()
    with open(log, "rb") as f:
        text = f.read(_KEPT_STDERR).decode("utf-8", "replace")
    lines = [printable(line) for line in text.splitlines() if line.strip()]
    if code == 0 and (folder / MARKER).is_file():
        return lines
    marked = [line.split(": ", 1)[1] for line in lines if line.startswith("bnkit-save-error: ")]
    if marked:
        cause = one_line(marked[-1], 300)
    elif code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        cause = f"it was killed by {name}" + (f"; its last line: {one_line(lines[-1], 200)}" if lines else "")
    elif code != 0:
        cause = f"it exited with status {code}" + (f"; its last line: {one_line(lines[-1], 200)}" if lines else "")
    else:
        cause = f"it wrote no {MARKER}"
    raise ModelFileError(f"{shown}: not written: tf-keras 2 could not save the SavedModel ({cause})", lines)
