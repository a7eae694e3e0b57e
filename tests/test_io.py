"""Model files: every format round-trips, and bad files fail with one clear line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit.io import ModelFileError, load_model, save_model
from bnkit.torch import BatchNorm2d


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = BatchNorm2d(8, momentum=0.9, convention="keras")
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-3, momentum=None)
        self.shortcut = nn.Conv2d(3, 8, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn(self.conv(x)))))
        y = self.act(y + self.shortcut(x))
        return self.fc(torch.flatten(self.pool(y), 1))


def trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16))
    return model.eval()


def test_pt2_round_trip_rebuilds_real_layers(tmp_path):
    model = trained(Residual())
    path = save_model(model, tmp_path / "m.pt2", input_shape=(3, 16, 16))
    loaded = load_model(path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert isinstance(loaded.bn, BatchNorm2d) and loaded.bn.convention.name == "keras"
    assert loaded.bn.momentum == 0.9 and loaded.bn.eps == model.bn.eps
    assert type(loaded.bn2) is nn.BatchNorm2d and loaded.bn2.momentum is None and loaded.bn2.eps == 1e-3
    assert isinstance(loaded.conv, nn.Conv2d) and loaded.conv.stride == (2, 2) and loaded.conv.bias is None
    # training semantics come back with the layers: one training step matches the original's
    loaded.train(), model.train()
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(loaded.bn.running_var, model.bn.running_var)
    torch.testing.assert_close(loaded.bn2.running_var, model.bn2.running_var)


def test_existing_output_is_never_replaced_without_force(tmp_path):
    model = trained(Residual())
    target = tmp_path / "m.pt"
    target.write_bytes(b"precious")
    with pytest.raises(ModelFileError, match="already exists; pass --force"):
        save_model(model, target)
    assert target.read_bytes() == b"precious"
    save_model(model, target, force=True)
    assert torch.load(target, weights_only=True).keys() == model.state_dict().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary files left


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_factory_spec_with_weights(tmp_path, suffix):
    model = trained(Residual())
    weights = save_model(model, tmp_path / f"w{suffix}")
    loaded = load_model(f"{__name__}:Residual", weights=weights)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_pickled_module_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(Residual(), path)  # a pickle of a module, not a state dict
    with pytest.raises(ModelFileError, match="weights_only=True"):
        load_model(f"{__name__}:Residual", weights=path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("truncated.pt2", b"PK\x03\x04garbage", "not a torch.export program .not a zip archive"),
        ("bad.keras", b"not a zip", "not a Keras .keras archive .not a zip file"),
        ("bad.h5", b"not hdf5", "not a legacy Keras .h5 model .not an HDF5 file"),
        ("model.onnx", b"whatever", "not a readable ONNX model .DecodeError"),
        ("model.tflite", b"whatever", "unknown model format"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_a_zip_that_holds_no_exported_program(tmp_path, capfd):
    path = tmp_path / "weights.pt2"
    torch.save(Residual().state_dict(), path)  # a zip archive too, but no torch.export program
    with pytest.raises(ModelFileError, match="holds no exported program") as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""  # torch.export's logged traceback is silenced


def _raising_factory():
    raise RuntimeError("no GPU here")


def test_missing_file_and_bad_factory(tmp_path):
    with pytest.raises(ModelFileError, match="factory raised RuntimeError: no GPU here"):
        load_model(f"{__name__}:_raising_factory")
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "absent.keras")
    with pytest.raises(ModelFileError, match="cannot import"):
        load_model("no_such_package_xyz:build")
    with pytest.raises(ModelFileError, match="no callable"):
        load_model("torch.nn:not_there")


def test_keras_formats_round_trip(tmp_path):
    from bnkit.keras import keras

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    outputs = keras.layers.BatchNormalization(momentum=0.15)(x)
    model = keras.Model(inputs, outputs)
    x = torch.randn(2, 6, 6, 2)
    model(x, training=True)
    for name in ("m.keras", "m.h5"):
        path = tmp_path / name
        model.save(path) if name.endswith(".h5") else save_model(model, path)
        loaded = load_model(path)
        torch.testing.assert_close(loaded(x), model(x))
        assert loaded.layers[-1].momentum == 0.15


def test_folders_empty_and_truncated_files_are_named(tmp_path):
    folder = tmp_path / "model.pt2"
    folder.mkdir()
    with pytest.raises(ModelFileError, match="is a folder, not a model file"):
        load_model(folder)
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"the file is empty \(0 bytes"):
        load_model(empty)
    good = save_model(trained(Residual()), tmp_path / "good.pt2", input_shape=(3, 16, 16))
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="not a torch.export program") as info:
        load_model(truncated)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="no such weights file"):
        load_model(f"{__name__}:Residual", weights=tmp_path / "absent.pt")
    with pytest.raises(ModelFileError, match="expected package.module:factory"):
        load_model("torch.nn:")


def test_outputs_are_checked_before_any_work(tmp_path):
    from bnkit.io import check_writable

    with pytest.raises(ModelFileError, match="is a folder; give a file name inside it"):
        check_writable(tmp_path)
    with pytest.raises(ModelFileError, match="no such folder"):
        check_writable(tmp_path / "absent" / "m.pt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFileError, match="is not a folder"):
        check_writable(tmp_path / "file" / "m.pt")
    assert check_writable(tmp_path / "m.pt") == tmp_path / "m.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the write probe is gone
