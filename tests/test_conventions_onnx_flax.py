"""The ONNX and Flax conventions (issue 20, part 3) against the real tools.

ONNX: bnkit's PyTorch and Keras layers with ``convention="onnx"`` against onnxruntime's CPU kernel of
``BatchNormalization`` in training mode (opset 15, ``training_mode=1``, outputs ``Y``, ``running_mean``,
``running_var``), step by step, outputs and running statistics within 1e-6.

Flax: flax is not installable on this machine (checked: not in .venv, no pip install allowed), so the
Flax convention is checked against the NumPy formula of Flax's ``BatchNorm`` as written in
``flax/linen/normalization.py`` (flax 0.12.8: ``ra = momentum * ra + (1 - momentum) * stat``, biased
variance, ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``), and the reference's
``fast_variance=True`` against Flax's ``_compute_stats`` formula run in jax.numpy (jax is installed).
Where flax imports, the layers are also compared with ``flax.linen.BatchNorm`` itself.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import bnkit
from bnkit import reference

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

C = 3
SHAPE = (4, C, 5, 6)
STEPS = 3


def _ort_training_bn(momentum: float, eps: float):
    """An onnxruntime session of one training-mode BatchNormalization node (opset 15)."""
    from onnx import TensorProto, helper

    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        ["Y", "running_mean", "running_var"],
        epsilon=eps,
        momentum=momentum,
        training_mode=1,
    )
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("X", f32, SHAPE)] + [
        helper.make_tensor_value_info(name, f32, (C,)) for name in ("scale", "B", "input_mean", "input_var")
    ]
    outputs = [
        helper.make_tensor_value_info("Y", f32, SHAPE),
        helper.make_tensor_value_info("running_mean", f32, (C,)),
        helper.make_tensor_value_info("running_var", f32, (C,)),
    ]
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=SHAPE) * 2.0 + 0.5).astype(np.float32) for _ in range(STEPS)]


def _ort_steps(momentum: float, eps: float, gamma, beta):
    """ONNX's outputs and running statistics after each step, the statistics fed back."""
    session = _ort_training_bn(momentum, eps)
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
    steps = []
    for x in _batches():
        y, mean, var = session.run(None, {"X": x, "scale": gamma, "B": beta, "input_mean": mean, "input_var": var})
        steps.append((y, mean.copy(), var.copy()))
    return steps


def _affine_params():
    rng = np.random.default_rng(1)
    return rng.uniform(0.5, 1.5, C).astype(np.float32), rng.normal(size=C).astype(np.float32)


@pytest.mark.parametrize("momentum", [None, 0.7])
def test_torch_layer_onnx_convention_matches_onnxruntime(momentum):
    gamma, beta = _affine_params()
    kwargs = {} if momentum is None else {"momentum": momentum}
    layer = bnkit.torch.BatchNorm2d(C, convention="onnx", **kwargs)
    assert layer.momentum == (0.9 if momentum is None else momentum) and layer.eps == 1e-5
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    layer.train()
    expected = _ort_steps(layer.momentum, layer.eps, gamma, beta)
    for x, (y_ort, mean_ort, var_ort) in zip(_batches(), expected, strict=True):
        with torch.no_grad():
            y = layer(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, y_ort, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean_ort, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.numpy(), var_ort, rtol=0, atol=1e-6)


def test_keras_layer_onnx_convention_matches_onnxruntime():
    gamma, beta = _affine_params()
    layer = bnkit.keras.BatchNormalization(axis=1, convention="onnx")
    layer.build(SHAPE)
    assert layer.momentum == 0.9 and layer.epsilon == 1e-5
    layer.set_weights([gamma, beta, np.zeros(C, np.float32), np.ones(C, np.float32)])
    expected = _ort_steps(layer.momentum, layer.epsilon, gamma, beta)
    for x, (y_ort, mean_ort, var_ort) in zip(_batches(), expected, strict=True):
        y = np.asarray(layer(x, training=True).detach().cpu())
        _, _, mean, var = layer.get_weights()
        np.testing.assert_allclose(y, y_ort, rtol=0, atol=1e-6)
        np.testing.assert_allclose(mean, mean_ort, rtol=0, atol=1e-6)
        np.testing.assert_allclose(var, var_ort, rtol=0, atol=1e-6)


def test_onnx_running_variance_is_biased_in_onnxruntime():
    """The fact the convention rests on, read from onnxruntime: the running variance takes the biased one."""
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    session = _ort_training_bn(0.0, 1e-5)  # momentum 0: the running statistics are the batch's
    x = _batches()[0]
    zeros, ones = np.zeros(C, np.float32), np.ones(C, np.float32)
    _, mean, var = session.run(None, {"X": x, "scale": gamma, "B": beta, "input_mean": zeros, "input_var": ones})
    stats = reference.batch_stats(x, axis=1)
    np.testing.assert_allclose(mean, stats.mean, rtol=1e-6)
    np.testing.assert_allclose(var, stats.var, rtol=1e-6)  # n, not n - 1
    assert bnkit.ONNX.running_var_estimator == "biased" and bnkit.ONNX.momentum_weighs == "old"


def _flax_steps(xs, gamma, beta, momentum=0.99, eps=1e-5):
    """Flax BatchNorm's formulas (flax/linen/normalization.py, use_fast_variance=False), features last."""
    ra_mean, ra_var = np.zeros(C), np.ones(C)
    steps = []
    for x in xs:
        x = x.astype(np.float64)
        mean = x.mean(axis=(0, 1, 2))
        var = np.square(x - mean).mean(axis=(0, 1, 2))
        y = (x - mean) * (1 / np.sqrt(var + eps)) * gamma + beta
        ra_mean = momentum * ra_mean + (1 - momentum) * mean
        ra_var = momentum * ra_var + (1 - momentum) * var
        steps.append((y, ra_mean, ra_var))
    return steps


def _nhwc_batches():
    return [np.ascontiguousarray(x.transpose(0, 2, 3, 1)) for x in _batches()]


def test_keras_layer_flax_convention_matches_flax_formula():
    gamma, beta = _affine_params()
    layer = bnkit.keras.BatchNormalization(convention="flax")  # features last, as Flax
    layer.build((4, 5, 6, C))
    assert (layer.momentum, layer.epsilon) == (0.99, 1e-5)
    layer.set_weights([gamma, beta, np.zeros(C, np.float32), np.ones(C, np.float32)])
    for x, (y_ref, mean_ref, var_ref) in zip(_nhwc_batches(), _flax_steps(_nhwc_batches(), gamma, beta), strict=True):
        y = np.asarray(layer(x, training=True).detach().cpu())
        _, _, mean, var = layer.get_weights()
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
        np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(var, var_ref, rtol=0, atol=1e-6)


def test_torch_layer_flax_convention_matches_flax_formula():
    gamma, beta = _affine_params()
    layer = bnkit.torch.BatchNorm2d(C, convention="flax", dtype=torch.float64)
    assert (layer.momentum, layer.eps) == (0.99, 1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    for x, (y_ref, mean_ref, var_ref) in zip(_nhwc_batches(), _flax_steps(_nhwc_batches(), gamma, beta), strict=True):
        with torch.no_grad():
            y = layer(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), var_ref, rtol=0, atol=1e-12)


def test_flax_convention_statistics_are_two_pass_on_offset_data():
    """bnkit's own numerics keep the accurate variance where Flax's fast formula cancels (mean 1e4, std 1e-3)."""
    rng = np.random.default_rng(2)
    x = 1e4 + 1e-3 * rng.normal(size=(16, C, 4, 4))
    layer = bnkit.torch.BatchNorm2d(C, convention="flax", momentum=0.0, dtype=torch.float64)  # keeps the batch's
    with torch.no_grad():
        layer(torch.from_numpy(x))
    two_pass = reference.batch_stats(x, axis=1).var
    np.testing.assert_allclose(layer.running_var.numpy(), two_pass, rtol=1e-9)
    fast32 = reference.batch_stats(x.astype(np.float32), axis=1, fast_variance=True).var
    assert np.max(np.abs(fast32 - two_pass) / two_pass) >= 0.5  # Flax's default in float32: 0 here (cancelled)


def test_reference_fast_variance_is_flax_compute_stats_in_jax():
    """``fast_variance=True`` against Flax's ``_compute_stats`` (use_fast_variance=True) written in jax.numpy."""
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(3)
    for offset in (0.0, 3.0):
        x = (offset + rng.normal(size=(8, 5, 5, C))).astype(np.float32)
        xj = jnp.asarray(x, jnp.float32)
        mu, mu2 = xj.mean((0, 1, 2)), jnp.square(xj).mean((0, 1, 2))
        var_flax = np.asarray(jnp.maximum(0.0, mu2 - jnp.square(mu)))
        stats = reference.batch_stats(x, axis=-1, fast_variance=True)
        np.testing.assert_allclose(stats.mean, np.asarray(mu), rtol=1e-6)
        np.testing.assert_allclose(stats.var, var_flax, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed here")
def test_keras_layer_flax_convention_matches_flax_itself():  # pragma: no cover - only where flax installs
    import jax.numpy as jnp
    from flax import linen

    gamma, beta = _affine_params()
    module = linen.BatchNorm(use_running_average=False, use_fast_variance=False)
    x0 = _nhwc_batches()[0]
    variables = module.init({"params": __import__("jax").random.PRNGKey(0)}, jnp.asarray(x0))
    params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    stats = variables["batch_stats"]
    layer = bnkit.keras.BatchNormalization(convention="flax")
    layer.build(x0.shape)
    layer.set_weights([gamma, beta, np.zeros(C, np.float32), np.ones(C, np.float32)])
    for x in _nhwc_batches():
        variables = {"params": params, "batch_stats": stats}
        y_flax, updated = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        stats = updated["batch_stats"]
        y = np.asarray(layer(x, training=True).detach().cpu())
        np.testing.assert_allclose(y, np.asarray(y_flax), atol=1e-5)
        np.testing.assert_allclose(layer.get_weights()[3], np.asarray(stats["var"]), atol=1e-6)


def test_convention_names_round_trip():
    assert bnkit.get_convention("onnx") is bnkit.ONNX and bnkit.get_convention("FLAX") is bnkit.FLAX
    assert (bnkit.ONNX.eps, bnkit.ONNX.momentum, bnkit.ONNX.running_var_estimator) == (1e-5, 0.9, "biased")
    assert (bnkit.FLAX.eps, bnkit.FLAX.momentum, bnkit.FLAX.momentum_weighs) == (1e-5, 0.99, "old")
    assert bnkit.translate_momentum(0.9, "onnx", "torch") == 0.1
    assert bnkit.translate_momentum(0.1, "torch", "onnx") == 0.9
    assert bnkit.translate_momentum(0.99, "flax", "keras") == 0.99
    with pytest.raises(ValueError, match="no equivalent in the onnx convention"):
        bnkit.translate_momentum(None, "torch", "onnx")
    settings = bnkit.translate_settings("torch", "onnx")
    assert settings == {"eps": 1e-5, "momentum": 0.9, "running_var_factor": "(n-1)/n"}
    for name in ("onnx", "flax"):
        layer = bnkit.keras.BatchNormalization(convention=name)
        config = layer.get_config()
        assert config["convention"] == name
        again = bnkit.keras.BatchNormalization.from_config(config)
        assert again.convention is bnkit.get_convention(name)
        module = bnkit.torch.BatchNorm1d(4, convention=name)
        assert module.convention is bnkit.get_convention(name) and f"convention={name!r}" in repr(module._name())


def test_explain_onnx_layer_against_onnxruntime():
    """explain(source="onnx"): the given layer's step is ONNX's (onnxruntime), its PyTorch equivalent agrees."""
    from bnkit.explain import explain, random_batch

    result = explain(source="onnx", channels=C, momentum=0.9, input_shape=SHAPE)
    given, equivalent, literal = result.settings
    assert (given.framework, given.eps, given.new_weight) == ("onnx", 1e-5, pytest.approx(0.1))
    assert (equivalent.framework, equivalent.momentum, literal.momentum) == ("torch", 0.1, 0.9)
    assert "convention='onnx'" in given.bnkit_code and given.code.startswith("onnx.helper.make_node(")
    assert [c.framework for c in result.counts] == ["onnx", "torch"] and result.counts[0].total == 4 * C
    assert result.difference("running mean", "equivalent").max_abs == 0.0
    assert result.difference("running mean", "literal copy").relative > 0.1
    assert any("ONNX's momentum=0.9 is the weight of the old running value" in note for note in result.notes)
    # the given layer's running variance after the step is onnxruntime's
    x = random_batch(SHAPE, 0).numpy()
    session = _ort_training_bn(0.9, 1e-5)
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    _, _, var = session.run(None, {"X": x, "scale": ones, "B": zeros, "input_mean": zeros, "input_var": ones})
    n = SHAPE[0] * SHAPE[2] * SHAPE[3]
    torch_var = 0.9 * 1 + 0.1 * reference.batch_stats(x, axis=1).var * n / (n - 1)
    assert result.difference("running variance", "equivalent").max_abs == pytest.approx(
        np.max(np.abs(var - torch_var)), rel=1e-3)


def test_explain_cli_flax(capsys):
    from bnkit.cli import main

    assert main(["explain", "--from", "flax", "--channels", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "flax.linen.BatchNorm(momentum=0.99) on 4 channels, in Flax's terms" in out
    assert "Flax's momentum=0.99 is the weight of the old running value" in out and "use_fast_variance=True" in out
    assert main(["explain", "--from", "flax", "--channels", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"][1]["code"] == "torch.nn.BatchNorm2d(4, eps=1e-05, momentum=0.01)"
    assert data["counts"][0]["total"] == 8 and data["counts"][0]["not_counted"] == 8  # batch_stats apart
    assert main(["explain", "--from", "onnx", "--no-center"]) == 2
    assert "--no-center / --no-scale are keras and flax options" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["onnx", "flax"])
def test_explain_tables_keep_every_figure_at_80_columns(source):
    import io

    from rich.console import Console

    from bnkit.cli.commands.explain import render
    from bnkit.explain import explain

    out = io.StringIO()
    render(explain(source=source, channels=32, momentum=bnkit.get_convention(source).momentum),
           Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80 and "…" not in text
    assert ("input_var: 32 initializer" if source == "onnx" else "64 (batch_stats)") in text


def test_compare_names_the_onnx_momentum_convention():
    """A PyTorch model with convention='onnx' against torch.nn with the same number: compare's causes say why."""
    from bnkit.diagnose.compare import compare

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.9))
    onnx_like = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnkit.torch.BatchNorm2d(4, convention="onnx"))
    onnx_like[0].load_state_dict(plain[0].state_dict())
    x = torch.randn(4, 3, 8, 8)
    report = compare(plain, onnx_like, x, training=True)
    codes = [c.code for c in report.causes]
    assert "momentum-convention" in codes and "running-variance-estimator" in codes
    text = next(c.explanation for c in report.causes if c.code == "momentum-convention")
    assert "both say momentum=0.9, but it weighs the new value in model A and the old value in model B" in text
    assert "Keras', ONNX's and Flax's the weight of the old value" in text
    fixed = bnkit.torch.BatchNorm2d(4, momentum=bnkit.translate_momentum(0.9, "torch", "onnx"), convention="onnx")
    onnx_like[1] = fixed
    codes = [c.code for c in compare(plain, onnx_like, x, training=True).causes]
    assert "momentum-convention" not in codes and codes == ["running-variance-estimator"]


def test_convert_keeps_the_onnx_convention():
    """Keras (bnkit layer, convention='onnx') -> PyTorch -> Keras: the convention and a training step survive."""
    from bnkit.convert import keras_to_torch, torch_to_keras
    from bnkit.keras import keras

    inputs = keras.Input((5, 6, C))
    outputs = bnkit.keras.BatchNormalization(convention="onnx", momentum=0.8)(inputs)
    model = keras.Model(inputs, outputs)
    module = keras_to_torch(model)
    (bn,) = [m for m in module.modules() if hasattr(m, "convention")]
    assert bn.convention == bnkit.ONNX and bn.momentum == 0.8
    x = _nhwc_batches()[0]
    y_keras = np.asarray(model(x, training=True).detach().cpu())
    module.train()
    with torch.no_grad():
        y_torch = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()  # PyTorch's NCHW
    np.testing.assert_allclose(y_torch.transpose(0, 2, 3, 1), y_keras, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), model.layers[-1].get_weights()[3], atol=1e-6)
    back = torch_to_keras(module.eval(), (C, 5, 6))
    (layer,) = [la for la in back.layers if hasattr(la, "convention")]
    assert layer.convention == bnkit.ONNX and layer.momentum == 0.8
