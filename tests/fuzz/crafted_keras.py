"""Crafted ``.keras`` archives: issue 17's findings about Keras 3 archives, as files.

Each starts from the valid ``small.keras`` (``make_corpus.valid_sources``: saved by Keras 3) and
changes what an attacker would: a member's size, nesting or compression, the zip directory, the
weights file's HDF5 objects (rewritten with h5py), the config's names and sizes. A few are saved by
Keras itself (a layer named with escape sequences, weights as ``.npz``). Members of gigabytes are
deflated runs of one byte (:mod:`zip_craft`): a few megabytes on disk.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5_craft
from crafted import Crafted
from zip_craft import GiB, MiB, copy_zip, patch_member, repeated

# sets the window title, clears the screen, then prints a green "OK": what a raw error line would do
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[32mOK\x1b[0m"
WEIGHTS = "model.weights.h5"
KERNEL = "layers/conv2d/vars/0"  # the conv layer's kernel, (3, 3, 3, 4) float32, in model.weights.h5


def _config(source: Path) -> dict:
    with zipfile.ZipFile(source) as archive:
        return json.loads(archive.read("config.json"))


def _with_config(source: Path, target: Path, edit) -> Path:
    config = _config(source)
    edit(config)
    return copy_zip(source, target, replace={"config.json": json.dumps(config).encode()})


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _with_weights(source: Path, target: Path, edit) -> Path:
    """The archive with ``edit(h5py.File)`` applied to a copy of its ``model.weights.h5``."""
    with zipfile.ZipFile(source) as archive:
        weights = archive.read(WEIGHTS)
    return copy_zip(source, target, replace={WEIGHTS: h5_craft.edited(weights, edit)})


def small_keras_saved(target: Path, conv_name: str = "conv", **save_options) -> Path:
    """``fuzz_models.small_keras`` saved by Keras, its conv layer named ``conv_name``; ``save_options``
    go to Keras' own saving function (``weights_format="npz"``)."""
    from fuzz_models import small_keras
    from keras.src.saving import saving_lib

    model = small_keras()
    if conv_name != "conv":
        model.get_layer("conv").name = conv_name
    saving_lib.save_model(model, str(target), **save_options)
    return target


def cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    source = sources["keras"]
    out = []

    def case(name, finding, path, expect_text, **kw):
        out.append(Crafted(f"keras-{name}", finding, ("summary", str(path)), expect_text=expect_text, **kw))

    # ------------------------------------------------------------------------------- memory
    valid_config = json.dumps(_config(source)).encode()
    path = copy_zip(
        source, folder / "config-spaces.keras", replace={"config.json": repeated(3 * GiB, valid_config, b" ")}
    )
    case(
        "config-spaces",
        "config.json is 3 GiB of spaces deflated to 3 MB (valid JSON): Keras reads and parses it whole, 4+ GB",
        path,
        "config.json",
    )
    path = copy_zip(source, folder / "config-nested.keras", replace={"config.json": b"[" * 100_000 + b"]" * 100_000})
    case(
        "config-nested",
        "config.json is 100,000 nested lists: RecursionError in Python's JSON parser",
        path,
        "nested deeper than",
    )
    path = copy_zip(source, folder / "metadata-spaces.keras", replace={"metadata.json": repeated(3 * GiB, b"{}", b" ")})
    case(
        "metadata-spaces",
        "metadata.json is 3 GiB of spaces deflated: bnkit reads it, bounded like config.json",
        path,
        "metadata.json",
    )
    path = copy_zip(source, folder / "weights-zeros.keras", replace={WEIGHTS: repeated(3 * GiB + 512 * MiB)})
    case(
        "weights-zeros",
        "model.weights.h5 is 3.5 GiB of deflated zeros, under Keras' own 4 GiB guard: Keras reads "
        "it into memory before h5py finds it is no HDF5 file",
        path,
        "model.weights.h5",
    )
    path = _with_weights(source, folder / "weights-fill.keras", h5_craft.fill_bomb(KERNEL, 3 * GiB + 512 * MiB))
    case(
        "weights-fill",
        "the conv kernel's dataset declares 3.5 GiB and stores nothing (its chunks read as the fill "
        "value), under Keras' own 4 GiB guard",
        path,
        "more than the model's variables",
    )
    path = _with_config(source, folder / "dense-units.keras", lambda c: _layer(c, "fc")["config"].update(units=2**22))
    case(
        "dense-units",
        "the config's Dense has 2**22 units: Keras allocates and initialises a 4 GiB kernel before it reads a weight",
        path,
        "variables",
    )
    path = _with_config(
        source, folder / "dense-units-in-budget.keras", lambda c: _layer(c, "fc")["config"].update(units=2**20)
    )
    case(
        "dense-units-in-budget",
        "the config's Dense has 2**20 units (a 1 GiB kernel, within the budget) and the "
        "weights hold 2: Keras allocates the kernel, then fails on its shape",
        path,
        "do not belong together",
    )
    names = {f"assets/part{i}": repeated(255 * MiB) for i in range(17)}
    path = copy_zip(source, folder / "assets-to-disk.keras", add=names)
    case(
        "assets-to-disk",
        "17 members of 255 MiB of deflated zeros (under Keras' 256 MiB guard): Keras extracts "
        "every member of an archive with assets to a temporary folder, 4.3 GB of disk",
        path,
        "extracts the archive to disk",
    )

    # ------------------------------------------------------------------- other files, plugins
    secret = folder / "secret.bin"
    secret.write_bytes(b"SECRET-" * 62)  # 434 bytes: the kernel's 432 come from here
    path = _with_weights(source, folder / "weights-external-storage.keras", h5_craft.external_storage(KERNEL, secret))
    case(
        "weights-external-storage",
        "the kernel's dataset is stored in another file of the machine (HDF5 external "
        "storage): its bytes would become weights",
        path,
        "external files",
    )
    other = h5_craft.other_file(folder / "other.h5")
    path = _with_weights(source, folder / "weights-virtual.keras", h5_craft.virtual(KERNEL, other))
    case("weights-virtual", "the kernel is a virtual dataset mapping another HDF5 file", path, "virtual dataset")
    path = _with_weights(
        source, folder / "weights-external-link.keras", h5_craft.external_link("layers/conv2d/vars", other)
    )
    case(
        "weights-external-link",
        "the conv layer's group is an external link to another HDF5 file",
        path,
        "external link",
    )
    path = _with_weights(source, folder / "weights-filter-plugin.keras", h5_craft.unknown_filter(KERNEL))
    case(
        "weights-filter-plugin",
        "the kernel is compressed with HDF5 filter 32004 (LZ4): HDF5 looks for it in its "
        "plugin folders and loads their shared libraries",
        path,
        "HDF5 filter 32004",
    )

    # ---------------------------------------------------------------------------------- hangs
    with zipfile.ZipFile(source) as archive:
        weights = h5_craft.edited(archive.read(WEIGHTS), lambda f: f[KERNEL].attrs.__setitem__("dtype", "float32"))
    path = copy_zip(source, folder / "weights-heap-loop.keras", replace={WEIGHTS: h5_craft.looping_heap(weights)})
    case(
        "weights-heap-loop",
        "the kernel's 'dtype' attribute, which Keras reads, lives in a global heap whose free-space object has the "
        "size 0: HDF5 loops forever reading it, in C code no signal handler or watchdog thread interrupts",
        path,
        "HDF5 would loop on it forever",
    )

    # ------------------------------------------------------------------------ terminal escapes
    path = _with_config(source, folder / "escape-class.keras", lambda c: _layer(c, "conv").update(class_name=ESCAPES))
    case(
        "escape-class",
        "a layer's class name holds escape sequences, which Keras' error quotes",
        path,
        "not a readable Keras model",
        forbidden=("\x1b",),
    )
    path = small_keras_saved(folder / "escape-layer.keras", conv_name="conv" + ESCAPES)
    case(
        "escape-layer",
        "a layer's name holds escape sequences: Keras loads it, and the summary table would print it",
        path,
        "control characters in its name",
        forbidden=("\x1b",),
    )

    # --------------------------------------------------------------------------- zip directory
    path = patch_member(copy_zip(source, folder / "encrypted.keras"), "config.json", flag_bits=0x1)
    case("encrypted", "config.json is flagged encrypted", path, "is encrypted")
    path = patch_member(copy_zip(source, folder / "method-93.keras"), "config.json", method=93)
    case("method-93", "config.json claims compression method 93 (Zstandard)", path, "compression method 93")
    path = patch_member(copy_zip(source, folder / "method-99.keras"), WEIGHTS, method=99)
    case("method-99", "model.weights.h5 claims compression method 99 (AES)", path, "compression method 99")
    path = copy_zip(source, folder / "name-not-utf8.keras", add={"assets/ab": b"x"})
    patch_member(path, "assets/ab", raw_name=b"assets/\xff\xfe")
    case("name-not-utf8", "a member's name is flagged UTF-8 and is not", path, "zip")
    path = _duplicate_config(source, folder / "duplicate-config.keras")
    case(
        "duplicate-config",
        "two members named config.json: a checker reads one, Keras the other",
        path,
        "two members named",
    )
    path = small_keras_saved(folder / "npz-weights.keras", weights_format="npz")
    case("npz-weights", "the weights are model.weights.npz: pickled NumPy objects", path, "model.weights.npz")
    return out


def _duplicate_config(source: Path, target: Path) -> Path:
    """A second config.json after the first: the same model, renamed."""
    import warnings

    config = _config(source)
    other = dict(config, config=dict(config["config"], name="other"))
    copy_zip(source, target)
    with zipfile.ZipFile(target, "a") as archive, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        archive.writestr("config.json", json.dumps(other))
    return target
