"""Crafted ``.pt2`` archives, as an attacker would make them, for the safety tests.

Each starts from a real archive ``bnkit.io.save_model`` wrote and changes one part so that
``torch.export.load`` (or the module it returns) runs a payload; the payload writes a marker
file, so a test can tell whether it ran.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch
from torch import nn

INPUT_SHAPE = (3, 8, 8)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def small_pt2(folder: Path, name: str = "small.pt2") -> Path:
    from bnkit.io import save_model

    torch.manual_seed(0)
    return save_model(Small().eval(), Path(folder) / name, input_shape=INPUT_SHAPE)


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def payload_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('the payload ran')"


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite(source: Path, target: Path, change) -> Path:
    """Copy the archive, passing each record (name relative to the archive's folder) through ``change``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            zout.writestr(info, change(info.filename[len(root) :], zin.read(info.filename)))
    return target


def with_pickled_sample_inputs(source: Path, target: Path, marker: Path) -> Path:
    """The sample inputs replaced by a pickle whose ``__reduce__`` runs the payload.

    torch.export.load tries ``weights_only=True``, fails, and retries with ``weights_only=False``.
    """
    payload = _torch_saved(((Payload(marker),), {}))
    return rewrite(source, target, lambda name, data: payload if name == "data/sample_inputs/model.pt" else data)


def with_pickled_weight(source: Path, target: Path, marker: Path) -> Path:
    """The first weight marked ``use_pickle: true`` and replaced by the payload's pickle.

    torch.export.load reads such a weight with ``torch.load(weights_only=False)``.
    """
    config_name = "data/weights/model_weights_config.json"
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0] + "/"
        config = json.loads(archive.read(root + config_name))
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    replaced = {
        config_name: json.dumps(config).encode(),
        "data/weights/" + meta["path_name"]: _torch_saved(Payload(marker)),
    }
    return rewrite(source, target, lambda name, data: replaced.get(name, data))


def with_program(source: Path, target: Path, edit) -> Path:
    """The program's JSON (``models/model.json``) passed through ``edit(program_dict)``."""

    def change(name: str, data: bytes) -> bytes:
        if name != "models/model.json":
            return data
        program = json.loads(data)
        edit(program)
        return json.dumps(program).encode()

    return rewrite(source, target, change)
