"""Triton kernels (kernels/, installed as dgfast.kernels) against their plain-torch twins in dgfast.ops.

Every test runs on two devices:
- "cpu": the kernels under TRITON_INTERPRET=1 (set by conftest.py on GPU-less machines);
- "cuda": compiled Triton on a GPU (marked `cuda`, skipped without one; run by bench/gpu_check.sh).

guided_step is checked bit for bit (torch.equal). The one op the interpreter cannot make bit-equal
to torch on the CPU is exp: the interpreter evaluates tl.exp with numpy's float32 exp (numpy's own
SIMD routine, up to ~3 ulp from correctly rounded), torch's CPU exp is SLEEF's expf (<= 1 ulp), and
the two disagree in the last bits for ~40% of arguments. So on "cpu" the ddpm reference is
ops.guided_step_torch with torch.exp replaced by numpy's float32 exp, and
test_interpreter_exp_is_the_only_difference shows that against the untouched reference every
differing element is one whose exp argument numpy and torch round differently. On "cuda" the
kernel calls libdevice __nv_expf, the function torch's CUDA exp uses, so there the comparison is
against the untouched reference.
"""
import math
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import dgfast  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=.
    sys.path.insert(0, str(ROOT))
from dgfast import ops  # noqa: E402
from dgfast.schedule import Schedule  # noqa: E402

pytest.importorskip("triton")
K = ops.triton_kernels()  # dgfast.kernels: installed, or the checkout's kernels/ (what ops dispatches to)
if K is None:
    raise ImportError("dgfast.ops.triton_kernels() found no kernels package")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        INTERPRET, reason="checks compiled Triton: unset TRITON_INTERPRET")]),
]
HALF = [torch.float16, torch.bfloat16]
DDPM = Schedule.from_steps("250").ddpm_coefs()      # (250, 7) float32 rows, j = 0 .. 249
DDIM = {eta: Schedule.from_steps("ddim25").ddim_coefs(eta) for eta in (0.0, 1.0)}
SCALE = 1.37


def rand(shape, dev, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dev, dtype)


def poisoned(shape, dev, dtype=torch.float32):
    """Output buffer full of NaN: any element the kernel fails to write fails the comparison."""
    return torch.full(shape, float("nan"), device=dev, dtype=dtype)


def numpy_exp(t):
    return torch.from_numpy(np.exp(t.detach().cpu().numpy())).to(t.device)


def reference_step(dev, *args, **kwargs):
    """ops.guided_step_torch with exp as the kernel evaluates it (see the module docstring)."""
    if dev == "cpu":
        with mock.patch.object(torch, "exp", numpy_exp):
            return ops.guided_step_torch(*args, **kwargs)
    return ops.guided_step_torch(*args, **kwargs)


def step_inputs(n, C, H, W, dev, dtype=torch.float32, layout="strided", seed=0):
    """x, out_ft, out_pre, noise as the sampler holds them.

    strided:    the two models' outputs interleaved per sample (batch stride 4C*HW), x a channel
                slice of a wider tensor, noise the first n rows of a 2n draw taken channel-major;
    contiguous: plain tensors, out_pre with only the channels the kernel may read;
    planes:     (H, W) planes not contiguous (transposed / channels_last): the launcher copies.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dev, dtype)

    if layout == "contiguous":
        return r(n, C, H, W), r(n, 2 * C, H, W), r(n, C, H, W), r(n, C, H, W)
    if layout == "strided":
        both = r(n, 2, 2 * C, H, W)
        return r(n, C + 2, H, W)[:, 1:C + 1], both[:, 0], both[:, 1], r(C, 2 * n, H, W).transpose(0, 1)[:n]
    if layout == "planes":
        return (r(n, C, W, H).transpose(2, 3), r(n, 2 * C, H, W).to(memory_format=torch.channels_last),
                r(n, 2 * C, W, H).transpose(2, 3), r(n, C, H, W))
    raise ValueError(layout)


def run_step(dev, inputs, coefs, *, k, mode, clip, dtype=torch.float32):
    x, ft, pre, z = inputs
    out = poisoned(x.shape, dev, dtype)
    got = K.guided_step(x, ft, pre, z, [float(c) for c in coefs], scale=SCALE, k=k, mode=mode,
                        clip_denoised=clip, out=out)
    assert got is out
    return got


def rounded(t, dtype, dev):
    """float32 t rounded to dtype as the kernels' final cast does. Compiled Triton rounds to nearest
    even (cvt.rn), as torch does. The Triton 3.9 interpreter truncates float32 -> bfloat16 instead
    (InterpreterBuilder.cast_impl calls _convert_float with no rounding mode), so on "cpu" a bf16
    result is its float32 value with the low 16 bits dropped."""
    if dev == "cpu" and dtype == torch.bfloat16:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return t.to(dtype)


def assert_same_with_nans(got, want):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan])


# ----------------------------------------------------------------------------------------------
# guided_step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("j", [0, 1, 124, 249])
@pytest.mark.parametrize("k", [0, 3, 4])
@pytest.mark.parametrize("clip", [False, True])
def test_guided_step_ddpm_bitwise(dev, j, k, clip):
    inputs = step_inputs(2, 4, 5, 7, dev, seed=j)
    got = run_step(dev, inputs, DDPM[j], k=k, mode="ddpm", clip=clip)
    want = reference_step(dev, *inputs, DDPM[j].tolist(), scale=SCALE, guidance_channels=k, mode="ddpm",
                          clip_denoised=clip)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("j", [0, 12, 24])
@pytest.mark.parametrize("k", [0, 3, 4])
@pytest.mark.parametrize("clip", [False, True])
def test_guided_step_ddim_bitwise(dev, eta, j, k, clip):
    inputs = step_inputs(2, 4, 5, 7, dev, seed=j)
    coefs = DDIM[eta][j]
    got = run_step(dev, inputs, coefs, k=k, mode="ddim", clip=clip)
    want = ops.guided_step_torch(*inputs, coefs.tolist(), scale=SCALE, guidance_channels=k, mode="ddim",
                                 clip_denoised=clip)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "planes"])
@pytest.mark.parametrize("shape", [(1, 4, 32, 33), (3, 4, 1, 9), (2, 3, 17, 1)])
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_guided_step_layouts(dev, layout, shape, mode):
    n, C, H, W = shape
    inputs = step_inputs(n, C, H, W, dev, layout=layout)
    coefs = DDPM[100] if mode == "ddpm" else DDIM[1.0][10]
    got = run_step(dev, inputs, coefs, k=3, mode=mode, clip=False)
    want = reference_step(dev, *inputs, coefs.tolist(), scale=SCALE, guidance_channels=3, mode=mode)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dev", DEVICES)
def test_guided_step_unguided_and_default_out(dev):
    x, ft, _, z = step_inputs(2, 4, 6, 6, dev)
    got = K.guided_step(x, ft, None, z, DDPM[7].tolist(), k=0, mode="ddpm")
    want = reference_step(dev, x, ft, None, z, DDPM[7].tolist(), mode="ddpm")
    assert got.shape == x.shape and torch.equal(got, want)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_guided_step_half_inputs(dev, dtype, mode):
    """fp16/bf16 in and out, float32 inside: exactly the float32 reference on the upcast inputs,
    rounded once to the output dtype (see `rounded` for the interpreter's bf16 cast)."""
    inputs = step_inputs(2, 4, 5, 7, dev, dtype=dtype)
    coefs = DDPM[200] if mode == "ddpm" else DDIM[1.0][20]
    got = run_step(dev, inputs, coefs, k=3, mode=mode, clip=False, dtype=dtype)
    want = reference_step(dev, *(t.float() for t in inputs), coefs.tolist(), scale=SCALE, guidance_channels=3,
                          mode=mode)
    assert got.dtype == dtype and torch.equal(got, rounded(want, dtype, dev))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", [False, True])
def test_guided_step_nan_propagates(dev, mode, clip):
    x, ft, pre, z = step_inputs(2, 4, 5, 7, dev, layout="contiguous")
    x[0, 0, 0, 0] = ft[0, 1, 2, 3] = pre[1, 2, 4, 6] = z[1, 3, 1, 1] = float("nan")
    ft[1, 4 + 2, 3, 3] = float("nan")  # a variance value (read by ddpm only)
    coefs = DDPM[0] if mode == "ddpm" else DDIM[0.0][0]  # j = 0: the noise is multiplied by 0 and still NaN
    got = run_step(dev, (x, ft, pre, z), coefs, k=3, mode=mode, clip=clip)
    want = reference_step(dev, x, ft, pre, z, coefs.tolist(), scale=SCALE, guidance_channels=3, mode=mode,
                          clip_denoised=clip)
    assert torch.isnan(got).sum() >= 4
    assert_same_with_nans(got, want)


@pytest.mark.skipif(not INTERPRET, reason="documents the interpreter's exp")
def test_interpreter_exp_is_the_only_difference():
    """Against the untouched torch reference, the interpreted ddpm step differs exactly where
    numpy's and torch's float32 exp round the step's exp(0.5 * logvar) differently."""
    x, ft, pre, z = step_inputs(2, 4, 16, 16, "cpu", layout="contiguous")
    c = DDPM[150]
    got = run_step("cpu", (x, ft, pre, z), c, k=3, mode="ddpm", clip=False)
    want = ops.guided_step_torch(x, ft, pre, z, c.tolist(), scale=SCALE, guidance_channels=3, mode="ddpm")
    frac = (ft[:, 4:] + 1) / 2  # the reference's exp argument, same ops
    arg = 0.5 * (frac * torch.tensor(c[5]) + (1 - frac) * torch.tensor(c[4]))
    exp_differs = numpy_exp(arg) != torch.exp(arg)
    differs = got != want
    assert not (differs & ~exp_differs).any()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
def test_guided_step_errors():
    x, ft, pre, z = step_inputs(2, 4, 5, 7, "cpu", layout="contiguous")
    c = DDPM[5].tolist()
    with pytest.raises(ValueError, match="mode"):
        K.guided_step(x, ft, pre, z, c, mode="euler")
    with pytest.raises(ValueError, match="out_ft"):
        K.guided_step(x, ft[:, :4], pre, z, c, k=3)  # ddpm needs the variance channels
    with pytest.raises(ValueError, match="noise"):
        K.guided_step(x, ft, pre, z[:, :, :4], c, k=3)
    with pytest.raises(ValueError, match="out_pre"):
        K.guided_step(x, ft, pre[:, :2], z, c, k=3)
    with pytest.raises(ValueError, match="out_pre"):
        K.guided_step(x, ft, None, z, c, k=3)
    with pytest.raises(ValueError, match="k must"):
        K.guided_step(x, ft, pre, z, c, k=5)
    with pytest.raises(TypeError, match="float32"):
        K.guided_step(x, ft.double(), pre, z, c, k=3)
    with pytest.raises(ValueError, match="meta"):
        K.guided_step(x, ft.to("meta"), pre, z, c, k=3)
    with pytest.raises(ValueError, match="coefs"):
        K.guided_step(x, ft, pre, z, c * 2, k=3)
    with pytest.raises(ValueError, match="out"):
        K.guided_step(x, ft, pre, z, c, k=3, out=torch.empty_like(x, dtype=torch.float16))
    assert K.guided_step(x[:0], ft[:0], pre[:0], z[:0], c, k=3).shape == (0, 4, 5, 7)


# ----------------------------------------------------------------------------------------------
# adaln_modulate, gated_residual_modulate
# ----------------------------------------------------------------------------------------------

def row_inputs(N, T, D, dev, dtype=torch.float32, strided=True, seed=0):
    """h, y (N, T, D) and gate/shift/scale (N, D); strided: h and y non-contiguous, the three rows
    chunks of an (N, 6D) adaLN projection as DiT makes them (row stride 6D)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dev, dtype)

    if not strided:
        return r(N, T, D), r(N, T, D), r(N, D), r(N, D), r(N, D)
    mod = r(N, 6 * D)
    shift, scale, gate = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
    return r(N, 2 * T, D)[:, ::2], r(T, N, D).transpose(0, 1), gate, shift, scale


ROW_SHAPES = [(2, 3, 1152), (1, 4, 72), (3, 2, 33)]
TOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # one rounding to the dtype


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_adaln_modulate(dev, shape, strided):
    h, _, _, shift, scale = row_inputs(*shape, dev, strided=strided)
    got = K.adaln_modulate(h, shift, scale, eps=1e-6, out=poisoned(shape, dev))
    want = ops.adaln_modulate_torch(h, shift, scale, eps=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_gated_residual_modulate(dev, shape, strided):
    h, y, gate, shift, scale = row_inputs(*shape, dev, strided=strided)
    got_h, got_x = K.gated_residual_modulate(h, gate, y, shift, scale, eps=1e-6,
                                             out=(poisoned(shape, dev), poisoned(shape, dev)))
    want_h, want_x = ops.gated_residual_modulate_torch(h, gate, y, shift, scale, eps=1e-6)
    assert torch.equal(got_h, want_h)  # mul then add, no FMA: exact in float32
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_row_ops_half(dev, dtype):
    """float32 inside, one rounding out: within one ulp of the dtype of the float32 reference on
    the upcast inputs (the residual is rounded before it is normalised, as the reference does)."""
    shape = (2, 3, 1152)
    h, y, gate, shift, scale = row_inputs(*shape, dev, dtype=dtype)
    f = [t.float() for t in (h, y, gate, shift, scale)]
    got = K.adaln_modulate(h, shift, scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ops.adaln_modulate_torch(f[0], f[3], f[4]), rtol=TOL[dtype], atol=1e-5)
    got_h, got_x = K.gated_residual_modulate(h, gate, y, shift, scale)
    want_h = ops.gated_residual_modulate_torch(f[0], f[2], f[1], f[3], f[4])[0]
    assert got_h.dtype == got_x.dtype == dtype
    assert torch.equal(got_h, rounded(want_h, dtype, dev))
    want_x = ops.adaln_modulate_torch(rounded(want_h, dtype, dev).float(), f[3], f[4])
    torch.testing.assert_close(got_x.float(), want_x, rtol=TOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_row_ops_nan(dev):
    h, y, gate, shift, scale = row_inputs(2, 3, 72, dev, strided=False)
    h[0, 1, 5] = y[1, 2, 7] = float("nan")
    got = K.adaln_modulate(h, shift, scale)
    assert torch.isnan(got[0, 1]).all() and not torch.isnan(got[0, 0]).any()
    got_h, got_x = K.gated_residual_modulate(h, gate, y, shift, scale)
    want_h, want_x = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
    assert_same_with_nans(got_h, want_h)
    assert torch.equal(torch.isnan(got_x), torch.isnan(want_x))
    assert torch.isnan(got_x[0, 1]).all() and torch.isnan(got_x[1, 2]).all()


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
def test_row_ops_errors():
    h, y, gate, shift, scale = row_inputs(2, 3, 8, "cpu", strided=False)
    with pytest.raises(ValueError, match="shift"):
        K.adaln_modulate(h, shift[:, :4], scale)
    with pytest.raises(ValueError, match="3-d"):
        K.adaln_modulate(h[0], shift, scale)
    with pytest.raises(TypeError, match="dtype"):
        K.adaln_modulate(h, shift.half(), scale)
    with pytest.raises(TypeError, match="float32"):
        K.adaln_modulate(h.double(), shift.double(), scale.double())
    with pytest.raises(ValueError, match="meta"):
        K.adaln_modulate(h, shift.to("meta"), scale)
    with pytest.raises(ValueError, match="y must"):
        K.gated_residual_modulate(h, gate, y[:, :2], shift, scale)
    with pytest.raises(ValueError, match="gate"):
        K.gated_residual_modulate(h, gate[:1], y, shift, scale)
    with pytest.raises(ValueError, match="out"):
        K.adaln_modulate(h, shift, scale, out=torch.empty(2, 3, 7))


# ----------------------------------------------------------------------------------------------
# gelu_tanh
# ----------------------------------------------------------------------------------------------

# For x below about -10.2, exp(-2a) overflows to inf and x / (1 + inf) = -0, the right limit; under
# the interpreter that is numpy's exp, which warns.
exp_overflow_is_fine = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def gelu_inputs(shape, dev, dtype=torch.float32, bias=True):
    x = rand(shape, dev, dtype, seed=1) * 3
    return x, (rand(shape[-1:], dev, dtype, seed=2) if bias else None)


@exp_overflow_is_fine
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 72), (2, 1152), (7,), (1, 1, 4608)])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_tanh(dev, shape, bias):
    """Within 1e-6 (relative, and absolute near 0) of F.gelu(approximate="tanh")."""
    x, b = gelu_inputs(shape, dev, bias=bias)
    got = K.gelu_tanh(x, b, out=poisoned(shape, dev))
    torch.testing.assert_close(got, ops.gelu_tanh_torch(x, b), rtol=1e-6, atol=1e-6)


@exp_overflow_is_fine
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # x^3 for x = 1e20
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # -inf / inf = NaN, as torch
@pytest.mark.parametrize("dev", DEVICES)
def test_gelu_tanh_accuracy_and_specials(dev):
    """Against the exact function (float64): ~1e-6 relative wherever the result is not tiny; and
    inf/NaN/large inputs behave as torch's formula does."""
    x = torch.cat([torch.linspace(-9, 9, 4097), rand((1024,), "cpu") * 4]).to(dev)
    got = K.gelu_tanh(x).double()
    xd = x.double()
    exact = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    big = exact.abs() > 1e-3
    assert ((got - exact).abs()[big] / exact.abs()[big]).max() < 2e-6
    assert ((got - exact).abs()[~big]).max() < 1e-9
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -30.0, 30.0, 0.0, -1e20, 1e20], device=dev)
    got = K.gelu_tanh(special)
    want = ops.gelu_tanh_torch(special)
    assert_same_with_nans(got, want)


@exp_overflow_is_fine
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_gelu_tanh_half(dev, dtype):
    x, b = gelu_inputs((3, 72), dev, dtype=dtype)
    got = K.gelu_tanh(x, b)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ops.gelu_tanh_torch(x.float(), b.float()), rtol=TOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_gelu_tanh_noncontiguous(dev):
    x = rand((6, 2 * 72), dev)[:, ::2]
    torch.testing.assert_close(K.gelu_tanh(x), ops.gelu_tanh_torch(x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
def test_gelu_tanh_errors():
    x, b = gelu_inputs((2, 8), "cpu")
    with pytest.raises(ValueError, match="bias"):
        K.gelu_tanh(x, b[:4])
    with pytest.raises(TypeError, match="dtype"):
        K.gelu_tanh(x, b.half())
    with pytest.raises(TypeError, match="float32"):
        K.gelu_tanh(x.to(torch.int32))
    with pytest.raises(ValueError, match="meta"):
        K.gelu_tanh(x, b.to("meta"))
    with pytest.raises(ValueError, match="out"):
        K.gelu_tanh(x, b, out=torch.empty(2, 9))


# ----------------------------------------------------------------------------------------------
# Through the dispatch point
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
def test_ops_dispatch_reaches_the_kernels(dev):
    if ops.triton_kernels() is None:
        pytest.skip("dgfast.kernels is not importable (not installed and not wired into dgfast/)")
    x, ft, pre, z = step_inputs(2, 4, 5, 7, dev)
    got = ops.guided_step(x, ft, pre, z, DDPM[3], scale=SCALE, guidance_channels=3, backend="triton")
    assert torch.equal(got, reference_step(dev, x, ft, pre, z, DDPM[3].tolist(), scale=SCALE, guidance_channels=3))
    h, y, gate, shift, scale = row_inputs(1, 2, 72, dev)
    torch.testing.assert_close(ops.adaln_modulate(h, shift, scale, backend="triton"),
                               ops.adaln_modulate_torch(h, shift, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gelu_tanh(h, None, backend="triton"), ops.gelu_tanh_torch(h), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET, reason="checks compiled Triton: unset TRITON_INTERPRET")
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_cuda_guided_step_full_size(mode):
    """The production shape (DiT-XL/2 at 512px latents, batch 64): bit-equal over every step kind."""
    inputs = step_inputs(64, 4, 64, 64, "cuda")
    table = DDPM if mode == "ddpm" else DDIM[1.0]
    for j in (0, 1, len(table) // 2, len(table) - 1):
        got = run_step("cuda", inputs, table[j], k=3, mode=mode, clip=False)
        want = ops.guided_step_torch(*inputs, table[j].tolist(), scale=SCALE, guidance_channels=3, mode=mode)
        assert torch.equal(got, want), f"step {j}"
