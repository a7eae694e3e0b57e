"""``--weights`` files for a factory spec: ``.pt`` state dicts written by ``torch.save`` itself (what
``torch.load(weights_only=True)`` lets through), then their archives and ``.safetensors`` headers
changed as an attacker would (the builders of ``tests/fuzz/crafted_weights.py``). Every one is one
``ModelFileError``, never another exception (a traceback on the command line)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))

import crafted_weights  # noqa: E402
from zip_craft import copy_zip, repeated  # noqa: E402

from bnkit.io import ModelFileError, load_model  # noqa: E402

FACTORY = "fuzz_models:small"


def _state(**changes):
    state = crafted_weights._state_dict()
    for key, value in changes.items():
        state[key] = value
    return state


def _with_metadata(metadata):
    state = crafted_weights._state_dict()
    state._metadata = metadata
    return state


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (lambda: _with_metadata([1, 2]), r"_metadata \(module versions\) is not a dict but list"),
        (lambda: _with_metadata({"": 5}), "_metadata entry '' is not a dict of module settings"),
        (lambda: _with_metadata({"bn": {"version": "x"}}), "_metadata gives module 'bn' the version 'x'"),
        (lambda: {**_state(), 1: torch.zeros(2)}, r"key 1 \(int\) is not a parameter name"),
        (lambda: _state(**{"conv.weight": "weights"}), "'conv.weight' is not a tensor but str"),
        (lambda: [torch.zeros(1)], "expected a state dict, got list"),
    ],
    ids=["metadata-list", "metadata-int", "metadata-version-text", "int-key", "value-text", "a-list"],
)
def test_a_hostile_state_dict_is_one_error(tmp_path, state, expected):
    path = tmp_path / "w.pt"
    torch.save(state(), path)
    with pytest.raises(ModelFileError, match=expected):
        load_model(FACTORY, weights=path)


def test_a_weight_that_warns_while_loading_keeps_the_warning_for_verbose(tmp_path):
    """A complex bias for a real parameter: torch warns (the imaginary part is dropped) and loads it.
    The warning goes to ``on_warning`` (``--verbose``), not to the caller's warnings (printed)."""
    import warnings

    path = tmp_path / "complex.pt"
    state = _state()
    state["fc.bias"] = state["fc.bias"].to(torch.complex64) + 1j
    torch.save(state, path)
    shown = []
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        model = load_model(FACTORY, weights=path, on_warning=shown.append)
    assert not escaped, [str(w.message) for w in escaped]
    assert torch.equal(model.fc.bias, state["fc.bias"].real)
    assert any("Casting complex values to real discards the imaginary part" in line for line in shown), shown


def test_records_are_charged_before_torch_reads_them(tmp_path):
    """A record of 256 MiB of deflated zeros (256 KB): torch.load would read it whole, then find its size wrong."""
    from bnkit.formats.limits import ReadLimits

    source = tmp_path / "w.pt"
    torch.save(_state(), source)
    path = copy_zip(
        source, tmp_path / "zeros.pt", replace={crafted_weights._largest_record(source): repeated(256 * 2**20)}
    )
    with pytest.raises(ModelFileError, match=r"record '.*data/\d+' would take 256 MiB.*over the limit of 64 MiB"):
        load_model(FACTORY, weights=path, limits=ReadLimits(max_model_bytes=64 * 2**20))


def test_an_error_quoting_megabytes_of_control_characters_is_cut_before_it_is_escaped(tmp_path):
    """The byteorder record is 16 MiB of NUL bytes, which torch's error quotes whole."""
    import time

    source = tmp_path / "w.pt"
    torch.save(_state(), source)
    byteorder = next(name for name in zipfile.ZipFile(source).namelist() if name.endswith("/byteorder"))
    path = copy_zip(source, tmp_path / "nul.pt", replace={byteorder: repeated(16 * 2**20)})
    started = time.monotonic()
    with pytest.raises(ModelFileError, match=r"Unknown endianness type: (\\x00)+\.\.\.") as caught:
        load_model(FACTORY, weights=path)
    assert time.monotonic() - started < 5 and len(str(caught.value)) < 1000 and "\x00" not in str(caught.value)


def test_the_legacy_format_is_refused(tmp_path):
    path = crafted_weights._legacy_storage_bomb(tmp_path / "legacy.pt")
    with pytest.raises(ModelFileError, match="not a zip archive: bnkit reads the format torch.save writes since"):
        load_model(FACTORY, weights=path)


def test_a_safetensors_header_is_charged_before_safetensors_maps_the_file(tmp_path):
    """The header declares a 256 MiB tensor and the file is that long (sparse: no disk taken)."""
    from bnkit.formats.limits import ReadLimits

    header, size = crafted_weights._small_header()
    big = 256 * 2**20
    header["fc.weight"] = {"dtype": "F32", "shape": [big // 4], "data_offsets": [size, size + big]}
    path = crafted_weights._safetensors(tmp_path / "big.safetensors", header, size + big)
    with pytest.raises(ModelFileError, match=r"tensor 'fc.weight' would take 256 MiB.*over the limit of 64 MiB"):
        load_model(FACTORY, weights=path, limits=ReadLimits(max_model_bytes=64 * 2**20))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda h: h["fc.weight"].update(data_offsets=[0, 10**12]), "data_offsets .* outside the 2572 bytes of data"),
        (lambda h: h["fc.weight"].update(shape=[2, 255]), r"of shape \[2, 255\] \(F32\) takes 2040 bytes"),
        (lambda h: h["fc.weight"].update(dtype="F4"), "a dtype bnkit does not read: 'F4'"),
        (lambda h: h["fc.weight"].update(shape=[2, -256]), "a shape that is not a list of sizes"),
    ],
    ids=["offsets-outside", "shape-lies", "unknown-dtype", "negative-size"],
)
def test_a_lying_safetensors_header_is_named(tmp_path, change, expected):
    header, size = crafted_weights._small_header()
    change(header)
    path = crafted_weights._safetensors(tmp_path / "lies.safetensors", header, size)
    with pytest.raises(ModelFileError, match=expected):
        load_model(FACTORY, weights=path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_real_weights_still_load(tmp_path, suffix):
    from fuzz_models import small

    from bnkit.io import save_model

    torch.manual_seed(1)
    model = small()
    path = save_model(model, tmp_path / f"w{suffix}")
    loaded = load_model(FACTORY, weights=path)
    for (name, expected), (_, got) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(expected, got), name
