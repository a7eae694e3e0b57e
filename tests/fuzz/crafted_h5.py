"""Crafted legacy Keras ``.h5`` files: issue 17's findings about HDF5 model files, as files.

Each starts from the valid ``small.h5`` (``make_corpus.valid_sources``: saved by Keras 3) and
changes what an attacker would, with h5py (:mod:`h5_craft`): the ``model_config`` attribute, the
weights' datasets and links. One is saved by Keras itself (a layer named with escape sequences).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5_craft
from crafted import Crafted
from crafted_keras import ESCAPES
from zip_craft import GiB, MiB

KERNEL = "model_weights/conv/conv/kernel"  # (3, 3, 3, 4) float32


def _with_config(source: Path, target: Path, edit) -> Path:
    def change(f) -> None:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)

    return h5_craft.edit_file(source, target, change)


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _set_attribute(name: str, value):
    def edit(f) -> None:
        f.attrs[name] = value

    return edit


def _escaped_layer_h5(target: Path) -> Path:
    """``fuzz_models.small_keras`` saved as ``.h5`` by Keras, its conv layer named with escape sequences."""
    import warnings

    from fuzz_models import small_keras

    model = small_keras()
    model.get_layer("conv").name = "conv" + ESCAPES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saving as HDF5 is legacy"
        model.save(target)
    return target


def cases(folder: Path, sources: dict[str, Path]) -> list[Crafted]:
    source = sources["h5"]
    out = []

    def case(name, finding, path, expect_text, *options, **kw):
        out.append(Crafted(f"h5-{name}", finding, ("summary", str(path), *options), expect_text=expect_text, **kw))

    # ------------------------------------------------------------------------------- memory
    path = h5_craft.edit_file(source, folder / "config-nested.h5", _set_attribute("model_config", "[" * 100_000))
    case(
        "config-nested",
        "model_config is 100,000 nested lists: RecursionError in Python's JSON parser",
        path,
        "nested deeper than",
    )
    config = json.loads(h5_craft.attribute(source, "model_config"))
    spaces = json.dumps(config) + " " * (8 * MiB)
    path = h5_craft.edit_file(source, folder / "config-spaces.h5", _set_attribute("model_config", spaces))
    case(
        "config-spaces",
        "model_config is 8 MiB of JSON, over what --max-model-bytes 64M allows for it (the bound "
        "a 300 MB config meets at the default)",
        path,
        "model_config",
        "--max-model-bytes",
        "64M",
    )
    path = h5_craft.edit_file(source, folder / "weights-fill.h5", h5_craft.fill_bomb(KERNEL, 3 * GiB + 512 * MiB))
    case(
        "weights-fill",
        "the conv kernel's dataset declares 3.5 GiB and stores nothing (its chunks read as the fill "
        "value), under Keras' own 4 GiB guard",
        path,
        "more than the model's variables",
    )
    path = h5_craft.edit_file(source, folder / "vlen-weight.h5", h5_craft.vlen_dataset(KERNEL))
    case(
        "vlen-weight",
        "the kernel is a dataset of variable-length text, whose elements point into a heap",
        path,
        "variable-length",
    )
    path = _with_config(source, folder / "dense-units.h5", lambda c: _layer(c, "fc")["config"].update(units=2**22))
    case(
        "dense-units",
        "the config's Dense has 2**22 units: Keras allocates and initialises a 4 GiB kernel before it reads a weight",
        path,
        "variables",
    )

    # ------------------------------------------------------------------- other files, plugins
    secret = folder / "secret.bin"
    secret.write_bytes(b"SECRET-" * 62)
    path = h5_craft.edit_file(source, folder / "external-storage.h5", h5_craft.external_storage(KERNEL, secret))
    case(
        "external-storage",
        "the kernel's dataset is stored in another file of the machine (HDF5 external storage)",
        path,
        "external files",
    )
    other = h5_craft.other_file(folder / "other.h5")
    path = h5_craft.edit_file(source, folder / "virtual.h5", h5_craft.virtual(KERNEL, other))
    case("virtual", "the kernel is a virtual dataset mapping another HDF5 file", path, "virtual dataset")
    path = h5_craft.edit_file(source, folder / "external-link.h5", h5_craft.external_link("model_weights/conv", other))
    case(
        "external-link",
        "the conv layer's weights group is an external link to another HDF5 file",
        path,
        "external link",
    )
    path = h5_craft.edit_file(source, folder / "filter-plugin.h5", h5_craft.unknown_filter(KERNEL))
    case(
        "filter-plugin",
        "the kernel is compressed with HDF5 filter 32004 (LZ4): HDF5 looks for it in its plugin "
        "folders and loads their shared libraries",
        path,
        "HDF5 filter 32004",
    )

    # ---------------------------------------------------------------------------------- hangs
    path = folder / "heap-loop.h5"
    path.write_bytes(h5_craft.looping_heap(source.read_bytes()))
    case(
        "heap-loop",
        "the global heap holding model_config has a free-space object of size 0: HDF5 loops forever reading it, "
        "in C code no signal handler or watchdog thread interrupts (a byte inserted into the file does it)",
        path,
        "HDF5 would loop on it forever",
    )

    # ------------------------------------------------------------------------ terminal escapes
    path = _with_config(source, folder / "escape-class.h5", lambda c: _layer(c, "conv").update(class_name=ESCAPES))
    case(
        "escape-class",
        "a layer's class name holds escape sequences, which Keras' error quotes",
        path,
        "not a readable Keras model",
        forbidden=("\x1b",),
    )
    path = _escaped_layer_h5(folder / "escape-layer.h5")
    case(
        "escape-layer",
        "a layer's name holds escape sequences: Keras loads it, and the summary table would print it",
        path,
        "control characters in its name",
        forbidden=("\x1b",),
    )

    # ---------------------------------------------------------------------------- not a model
    path = h5_craft.edit_file(source, folder / "no-config.h5", lambda f: f.attrs.__delitem__("model_config"))
    case("no-config", "an HDF5 file without a model_config (weights only)", path, "no model_config")
    path = h5_craft.edit_file(source, folder / "config-array.h5", _set_attribute("model_config", ["{}", "{}"]))
    case("config-array", "model_config is an array of texts, not one", path, "model_config")
    return out
