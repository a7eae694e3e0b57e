"""The Triton kernels, run on small CPU tensors under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated with ``@triton.jit``, i.e. when
``bnkit.kernels.triton_bn`` is imported: it is set here, before that import. Every result is
checked against the float64 NumPy reference (``bnkit.reference``) and against ``torch.nn``'s
own batch norm on the same tensors.

Tolerances: float32 results agree with the float64 reference to ~1e-6 relative (a handful of
float32 roundings over at most a few hundred values per channel): we allow 2e-5 absolute +
2e-5 relative. Half-precision outputs carry one rounding to the output dtype: bfloat16 has an
8-bit significand (2^-8 = 0.0039 relative), float16 11 bits (2^-11 = 0.00049); we allow about
two units in the last place of values of magnitude up to ~4. Statistics and gamma/beta
gradients stay in float32 for half inputs, so they are checked at float32 tolerances against
the reference evaluated on the half-rounded inputs.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before bnkit.kernels.triton_bn decorates its kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip(
    "triton", reason="Triton is not installed (pip install 'triton==3.9.0'): kernels unchecked"
)

from bnkit import kernels, reference  # noqa: E402
from bnkit.kernels import ops  # noqa: E402
from bnkit.kernels import triton_bn as K  # noqa: E402
from bnkit.torch import BatchNorm2d, BatchNormAct2d, BatchNormAddAct2d  # noqa: E402

if not isinstance(K._normalize_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip(
        "bnkit.kernels.triton_bn was imported before TRITON_INTERPRET=1 was set in this process",
        allow_module_level=True,
    )

F32 = {"atol": 2e-5, "rtol": 2e-5}
HALF = {torch.bfloat16: {"atol": 2e-2, "rtol": 8e-3}, torch.float16: {"atol": 2e-3, "rtol": 1e-3}}

SHAPES = {
    "nchw": ((3, 4, 5, 5), torch.contiguous_format),
    "channels_last": ((3, 4, 5, 5), torch.channels_last),
    "2d": ((6, 5), None),
    "3d": ((2, 3, 7), None),
    "5d_channels_last": ((2, 3, 2, 3, 2), torch.channels_last_3d),
}


@pytest.fixture(params=["default_tiles", "tiny_tiles"])
def tiles(request, monkeypatch):
    """Default tiles, or tiles so small that tiny tensors take the multi-tile, multi-split
    and ragged-edge paths (Chan merges across lanes, splits and finalize blocks)."""
    if request.param == "tiny_tiles":
        monkeypatch.setattr(ops, "_TILE", 16)
        monkeypatch.setattr(ops, "_REDUCE_TILE", 8)
        monkeypatch.setattr(ops, "_RUN_CAP", 4)
        monkeypatch.setattr(ops, "_FINALIZE_TILE", 8)
    return request.param


def make_input(shape, memory_format=None, dtype=torch.float32, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + offset
    x = x.to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def affine(C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)


def close(actual, expected, **tol):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().double().numpy()
    np.testing.assert_allclose(torch.as_tensor(actual).detach().double().numpy(), expected, **tol)


def unbiased(n):
    return n / (n - 1)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", list(SHAPES))
def test_training_forward_and_running_stats_match_reference_and_torch(case, tiles):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt)
    C = shape[1]
    n = x.numel() // C
    w, b = affine(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    ours_rm, ours_rv = rm.clone(), rv.clone()
    y = ops.batch_norm_triton(
        x, ours_rm, ours_rv, w, b, use_batch_stats=True,
        old_weight=0.9, new_weight=0.1, var_factor=unbiased(n), eps=1e-5,
    )  # fmt: skip
    ref_y, stats = reference.forward_train(x.numpy(), w.numpy(), b.numpy(), eps=1e-5, axis=1)
    close(y, ref_y, **F32)
    ref_run = reference.update_running(reference.RunningStats(rm.numpy(), rv.numpy(), 0), stats, 0.1, "torch")
    close(ours_rm, ref_run.mean, **F32)
    close(ours_rv, ref_run.var, **F32)

    torch_rm, torch_rv = rm.clone(), rv.clone()
    expected = F.batch_norm(x, torch_rm, torch_rv, w, b, True, 0.1, 1e-5)
    close(y, expected, **F32)
    close(ours_rm, torch_rm, **F32)
    close(ours_rv, torch_rv, **F32)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype


def test_statistics_are_accurate_for_a_large_mean():
    """mean 1000, std 0.01: E[x^2] - E[x]^2 in float32 would lose every digit of the variance
    (x^2 ~ 1e6 carries an absolute rounding of ~0.06 >> var = 1e-4). Welford summaries
    merged with Chan's update keep it to float32 accuracy."""
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + 0.01 * torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64)).float()
    rm, rv = torch.zeros(2), torch.zeros(2)
    n = x.numel() // 2
    ops.batch_norm_triton(x, rm, rv, use_batch_stats=True, old_weight=0.0, new_weight=1.0, var_factor=1.0)
    stats = reference.batch_stats(x.numpy(), axis=1)
    close(rv, stats.var, rtol=1e-3, atol=0)
    close(rm, stats.mean, rtol=1e-7, atol=0)
    assert n == 288


@pytest.mark.parametrize("case", ["nchw", "channels_last", "2d"])
def test_inference_forward_matches_reference_and_torch(case):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt)
    C = shape[1]
    w, b = affine(C)
    rm, rv = torch.randn(C) + 3.0, torch.rand(C) * 4 + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = ops.batch_norm_triton(x, rm, rv, w, b, use_batch_stats=False, eps=1e-3)
    close(
        y, reference.forward_eval(x.numpy(), rm0.numpy(), rv0.numpy(), w.numpy(), b.numpy(), 1e-3, 1), **F32
    )
    close(y, F.batch_norm(x, rm0, rv0, w, b, False, 0.1, 1e-3), **F32)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # inference never updates
    assert y.stride() == x.stride()


def test_without_affine_parameters():
    x = make_input((4, 3, 2, 3))
    y = ops.batch_norm_triton(x, None, None, use_batch_stats=True)
    close(y, reference.forward_train(x.numpy(), eps=1e-5)[0], **F32)
    close(y, F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), **F32)


# --------------------------------------------------------------------------- module glue


def run_module(module, x, steps=3):
    """Forward ``module`` through the Triton kernels ``steps`` times (as on CUDA)."""
    return [kernels.batch_norm(module, x * (1.0 + 0.5 * i)) for i in range(steps)]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_stats_torch_convention_match_torch_nn(momentum):
    x = make_input((4, 3, 3, 3))
    ours = BatchNorm2d(3, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    w, b = affine(3)
    for m in (ours, theirs):
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    ys = run_module(ours, x)
    expected = [theirs(x * (1.0 + 0.5 * i)) for i in range(3)]
    for y, e in zip(ys, expected, strict=True):
        close(y, e, **F32)
    close(ours.running_mean, theirs.running_mean, **F32)
    close(ours.running_var, theirs.running_var, **F32)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval()
    theirs.eval()
    close(kernels.batch_norm(ours, x), theirs(x), **F32)


def test_module_running_stats_keras_convention_match_reference():
    x = make_input((4, 3, 3, 3), torch.channels_last)
    ours = BatchNorm2d(3, momentum=0.9, convention="keras")
    native = BatchNorm2d(3, momentum=0.9, convention="keras")  # the CPU path, checked against Keras
    running = reference.RunningStats(np.zeros(3), np.ones(3), 0)
    for i in range(3):
        xi = x * (1.0 + 0.5 * i)
        y = kernels.batch_norm(ours, xi)
        ref_y, stats = reference.forward_train(xi.numpy(), eps=1e-3)
        running = reference.update_running(running, stats, 0.9, "keras")
        close(y, ref_y, **F32)
        close(y, native(xi), **F32)
    close(ours.running_mean, running.mean, **F32)
    close(ours.running_var, running.var, **F32)  # biased: no n/(n-1)
    close(ours.running_var, native.running_var, **F32)


def test_module_without_running_stats_uses_batch_stats_in_eval():
    x = make_input((4, 3, 2, 2))
    ours = BatchNorm2d(3, track_running_stats=False).eval()
    theirs = torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    close(kernels.batch_norm(ours, x), theirs(x), **F32)


# --------------------------------------------------------------------------- backward


def torch_reference_grads(x, w, b, dy, training, rm=None, rv=None, eps=1e-5, residual=None, relu=False):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    res = None if residual is None else residual.detach().clone().requires_grad_()
    y = F.batch_norm(x, rm, rv, w, b, training, 0.0, eps)
    if res is not None:
        y = y + res
    if relu:
        y = torch.relu(y)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad, None if res is None else res.grad


def ours_grads(x, w, b, dy, **kwargs):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    residual = kwargs.pop("residual", None)
    res = None if residual is None else residual.detach().clone().requires_grad_()
    y = ops.batch_norm_triton(x, weight=w, bias=b, residual=res, **kwargs)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad, None if res is None else res.grad


@pytest.mark.parametrize("case", ["nchw", "channels_last", "2d"])
def test_training_backward_matches_reference_and_torch(case, tiles):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt)
    dy = make_input(shape, fmt, offset=0.0, seed=5)
    w, b = affine(shape[1])
    _, dx, dw, db, _ = ours_grads(x, w, b, dy, running_mean=None, running_var=None, use_batch_stats=True)
    ref = reference.backward_train(dy.numpy(), x.numpy(), w.numpy(), eps=1e-5)
    close(dx, ref.dx, **F32)
    close(dw, ref.dgamma, **F32)
    close(db, ref.dbeta, **F32)
    _, tdx, tdw, tdb, _ = torch_reference_grads(x, w, b, dy, True)
    close(dx, tdx, **F32)
    close(dw, tdw, **F32)
    close(db, tdb, **F32)
    assert dx.stride() == x.stride()


@pytest.mark.parametrize("case", ["nchw", "channels_last"])
def test_inference_backward_matches_reference_and_torch(case):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt)
    dy = make_input(shape, fmt, offset=0.0, seed=5)
    w, b = affine(shape[1])
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    _, dx, dw, db, _ = ours_grads(x, w, b, dy, running_mean=rm, running_var=rv, use_batch_stats=False)
    ref = reference.backward_eval(dy.numpy(), x.numpy(), rm.numpy(), rv.numpy(), w.numpy(), eps=1e-5)
    close(dx, ref.dx, **F32)
    close(dw, ref.dgamma, **F32)
    close(db, ref.dbeta, **F32)
    _, tdx, tdw, tdb, _ = torch_reference_grads(x, w, b, dy, False, rm, rv)
    close(dx, tdx, **F32)
    close(dw, tdw, **F32)


def test_backward_accepts_an_expanded_gradient():
    """``y.sum().backward()`` hands the kernels a stride-0 gradient: it is made dense first."""
    x = make_input((3, 4, 2, 2), torch.channels_last).requires_grad_()
    ops.batch_norm_triton(x, None, None, use_batch_stats=True).sum().backward()
    # d/dx of sum(xhat) is zero per channel (xhat sums to 0 whatever x is)
    close(x.grad, np.zeros(x.shape), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["nchw", "channels_last"])
def test_half_precision_io_with_float32_math(case, dtype):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt, dtype=dtype)
    dy = make_input(shape, fmt, dtype=dtype, offset=0.0, seed=5)
    w, b = affine(shape[1])
    n = x.numel() // shape[1]
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    xr = x.detach().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = ops.batch_norm_triton(
        xr, rm, rv, wr, br, use_batch_stats=True, old_weight=0.9, new_weight=0.1, var_factor=unbiased(n)
    )
    y.backward(dy)
    assert y.dtype == dtype and xr.grad.dtype == dtype and wr.grad.dtype == torch.float32
    # the reference sees exactly the half-rounded values the kernels read
    x64, dy64 = x.double().numpy(), dy.double().numpy()
    ref_y, stats = reference.forward_train(x64, w.numpy(), b.numpy(), eps=1e-5)
    close(y, ref_y, **HALF[dtype])
    run = reference.update_running(reference.RunningStats(np.zeros(4), np.ones(4), 0), stats, 0.1, "torch")
    close(rm, run.mean, **F32)
    close(rv, run.var, **F32)
    ref = reference.backward_train(dy64, x64, w.numpy(), eps=1e-5)
    close(xr.grad, ref.dx, **HALF[dtype])
    close(wr.grad, ref.dgamma, atol=1e-4, rtol=1e-4)
    close(br.grad, ref.dbeta, atol=1e-4, rtol=1e-4)
    # and torch.nn on the same half tensors (float32 math inside, one rounding of the output)
    close(y, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), **HALF[dtype])


# --------------------------------------------------------------------------- fused activation


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("case", ["nchw", "channels_last"])
def test_fused_relu_forward_and_backward_match_torch(case, with_residual, tiles):
    shape, fmt = SHAPES[case]
    x = make_input(shape, fmt, offset=0.5)
    dy = make_input(shape, fmt, offset=0.0, seed=5)
    residual = make_input(shape, fmt, offset=0.0, seed=7) if with_residual else None
    w, b = affine(shape[1])
    ours = ours_grads(
        x, w, b, dy, running_mean=None, running_var=None, use_batch_stats=True,
        residual=residual, activation="relu",
    )  # fmt: skip
    theirs = torch_reference_grads(x, w, b, dy, True, residual=residual, relu=True)
    assert 0 < int((ours[0] > 0).sum()) < x.numel()  # the mask is neither all-pass nor all-block
    for got, expected in zip(ours, theirs, strict=True):
        if expected is None:
            assert got is None
        else:
            close(got, expected, **F32)
    # the reference: relu(bn(x) + r), gradients through the mask
    ref_y, _ = reference.forward_train(x.numpy(), w.numpy(), b.numpy())
    pre = ref_y + (0 if residual is None else residual.numpy())
    close(ours[0], np.maximum(pre, 0), **F32)
    g = np.where(pre > 0, dy.numpy(), 0.0)
    ref = reference.backward_train(g, x.numpy(), w.numpy())
    close(ours[1], ref.dx, **F32)
    close(ours[2], ref.dgamma, **F32)
    if residual is not None:
        close(ours[4], g, **F32)


def test_fused_add_relu_in_inference_and_bf16():
    shape = (3, 4, 5, 5)
    x = make_input(shape, torch.channels_last, dtype=torch.bfloat16, offset=0.5)
    res = make_input(shape, torch.channels_last, dtype=torch.bfloat16, offset=0.0, seed=7)
    w, b = affine(4)
    rm, rv = torch.full((4,), 0.5), torch.full((4,), 2.0)
    y = ops.batch_norm_triton(x, rm, rv, w, b, use_batch_stats=False, residual=res, activation="relu")
    expected = torch.relu(F.batch_norm(x.float(), rm, rv, w, b, False, 0.0, 1e-5) + res.float())
    close(y, expected, **HALF[torch.bfloat16])


def test_fused_modules_through_the_kernels_match_their_native_path():
    x = make_input((4, 3, 3, 3), offset=0.3)
    res = make_input((4, 3, 3, 3), offset=0.0, seed=9)
    act, act_native = BatchNormAct2d(3), BatchNormAct2d(3)
    add, add_native = BatchNormAddAct2d(3, convention="keras"), BatchNormAddAct2d(3, convention="keras")
    close(kernels.batch_norm(act, x, activation=act.act), act_native(x), **F32)
    close(kernels.batch_norm(add, x, residual=res, activation=add.act), add_native(x, res), **F32)
    close(act.running_var, act_native.running_var, **F32)
    close(add.running_var, add_native.running_var, **F32)


# --------------------------------------------------------------------------- errors


def test_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16.*torch.int64"):
        ops.batch_norm_triton(torch.ones(2, 3, dtype=torch.int64), None, None, use_batch_stats=True)
    with pytest.raises(
        ValueError, match=r"residual must have the input's shape \(2, 3, 4, 4\), got \(2, 3\)"
    ):
        ops.batch_norm_triton(x, None, None, use_batch_stats=True, residual=torch.ones(2, 3))
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        ops.batch_norm_triton(x, None, None, use_batch_stats=True, activation="gelu")
    with pytest.raises(
        ValueError, match="weight must be a contiguous vector of 3 values, got shape \\(4,\\)"
    ):
        ops.batch_norm_triton(x, None, None, torch.ones(4), use_batch_stats=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        ops.batch_norm_triton(x, None, None, use_batch_stats=False)
    with pytest.raises(ValueError, match=r"non-empty input for batch statistics, got shape \(0, 3, 4, 4\)"):
        ops.batch_norm_triton(torch.zeros(0, 3, 4, 4), None, None, use_batch_stats=True)


@pytest.mark.parametrize(
    "shape, make",
    [
        ((2, 3, 4, 5), lambda x: x),
        ((2, 3, 4, 5), lambda x: x.contiguous(memory_format=torch.channels_last)),
        ((2, 3, 2, 3, 2), lambda x: x.contiguous(memory_format=torch.channels_last_3d)),
        ((2, 3, 7), lambda x: x),
        ((6, 5), lambda x: x),
        ((5, 6), lambda x: x.t()),
        ((6, 5, 1, 1), lambda x: x),
        ((2, 3, 4, 5), lambda x: x.transpose(2, 3)),
        ((1, 3, 4, 5), lambda x: x.contiguous(memory_format=torch.channels_last)),  # contiguous too
        ((2, 1, 4, 5), lambda x: x.contiguous(memory_format=torch.channels_last)),
    ],
)
def test_the_dispatch_classifies_the_layout_the_kernels_walk(shape, make):
    from bnkit.kernels.dispatch import memory_format_of

    x = make(torch.randn(shape))
    walked = "channels_last" if ops._layout_of(x)[1].channels_last else "nchw"
    assert memory_format_of(x) == walked
