"""What the per-op tests share (tests/test_op_<op>.py, tests/test_custom_ops.py): the implementations
to run, one shape table per kind of op with its memory layouts, input builders and comparisons.

Implementations ("backends", as ops' backend= names them), each paired with the device it runs on:
- torch   the plain twin (dgfast.ops.*_torch): checked against exact float64 formulas where a test says so;
- cpp     the C++ kernels (dgfast._C), CPU float32;
- triton  the Triton kernels (kernels/): interpreted on CPU under TRITON_INTERPRET=1 (set by conftest.py
          on machines without a GPU), compiled on a GPU (marked cuda, run by `make gpu-check`).
The interpreter evaluates exp with numpy's float32 exp, which rounds differently from torch's on
CPU for ~40% of arguments; ddpm's reference on the interpreter therefore runs the twin with numpy's
exp (test_op_guided_step.py::test_interpreter_exp_is_the_only_difference shows it is the only
difference). Compiled on a GPU the kernels call libdevice's expf, torch's CUDA exp: no such swap.
"""
import itertools
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

from dgfast import ops
from dgfast.schedule import Schedule

EXT = ops.cpp_extension()
KERNELS = ops.triton_kernels()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SKIP = {
    "cpp": pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded"),
    ("triton", "cpu"): pytest.mark.skipif(KERNELS is None or not INTERPRET,
                                          reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1"),
    ("triton", "cuda"): [pytest.mark.cuda, pytest.mark.skipif(KERNELS is None or INTERPRET,
                                                              reason="compiled Triton: unset TRITON_INTERPRET")],
}


def backends(*names):
    """pytest params (backend, device) for the named implementations, each skipped where it cannot run."""
    params = []
    for name in names:
        if name == "torch":
            params.append(pytest.param(("torch", "cpu"), id="torch"))
        elif name == "cpp":
            params.append(pytest.param(("cpp", "cpu"), id="cpp", marks=_SKIP["cpp"]))
        elif name == "triton":
            params.append(pytest.param(("triton", "cpu"), id="triton-interp", marks=_SKIP["triton", "cpu"]))
            params.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=_SKIP["triton", "cuda"]))
        else:
            raise ValueError(name)
    return params


FUSED = ("cpp", "triton")
HALF = (torch.float16, torch.bfloat16)
DDPM = Schedule.from_steps("250").ddpm_coefs()     # (250, 7) float32 rows, j = 0 .. 249
DDIM = {eta: Schedule.from_steps("ddim50").ddim_coefs(eta) for eta in (0.0, 1.0)}
ROWS = {"ddpm": DDPM[100], "ddim": DDIM[1.0][20],
        "linear": np.array([1.3, 0.7, 0.9, 0.4, -0.2, 0.25, 0.3], np.float32),
        "flow_euler": np.array([-0.0625], np.float32), "flow_heun": np.array([0.03125], np.float32)}
SCALE = 1.37  # not a float32: the implementations must round it once, as torch's scalar multiply


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_bits(a, b):
    """Same shape, dtype and bit patterns everywhere (NaN, inf and -0 included)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    same = a.contiguous().reshape(-1).view(torch.uint8) == b.contiguous().reshape(-1).view(torch.uint8)
    if not bool(same.all()):
        diff = (a.double() - b.double()).abs()
        raise AssertionError(f"{int((a != b).sum())} of {a.numel()} elements differ, max |diff| {diff.max().item()}")


def assert_each_raises(cases):
    """cases: (callable, message regex) pairs; each raises a RuntimeError (TORCH_CHECK) or ValueError matching."""
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            fn()


def assert_thread_count_free(fn, one_thread):
    """fn()'s outputs (a tensor or a sequence of them) on one thread have the bits of those on all threads."""
    with one_thread():
        one = fn()
    many = fn()
    for a, b in zip(*(out if isinstance(out, (list, tuple)) else [out] for out in (one, many))):
        assert_bits(a, b)


def assert_same_with_nans(got, want):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan])


def poisoned(shape, device, dtype=torch.float32):
    """An output buffer full of NaN: any element a launcher fails to write fails the comparison."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def rounded(t, dtype, device):
    """float32 t rounded to dtype as the Triton kernels' final cast does. Compiled Triton rounds to
    nearest even (cvt.rn), as torch does. The Triton 3.9 interpreter truncates float32 -> bfloat16
    instead (InterpreterBuilder.cast_impl calls _convert_float with no rounding mode), so on "cpu" a
    bf16 result is its float32 value with the low 16 bits dropped."""
    if device == "cpu" and dtype == torch.bfloat16:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return t.to(dtype)


# ----------------------------------------------------------------------------------------------
# guided_step: (n, C, H, W) tensors
# ----------------------------------------------------------------------------------------------

# One table: odd sizes, a 1x1 plane, single rows and columns, 3 channels; each shape with a layout.
STEP_CASES = [((1, 4, 7, 5), "contiguous"), ((3, 4, 17, 19), "strided"), ((2, 4, 33, 37), "rows"),
              ((5, 4, 1, 1), "strided"), ((2, 3, 17, 1), "planes"), ((3, 4, 1, 9), "contiguous"),
              ((1, 4, 32, 33), "planes"), ((2, 4, 5, 7), "rows")]
STEP_LAYOUTS = ("contiguous", "strided", "rows", "planes")
# (mode, reads prev, takes noise, returns state): every mode, with and without its optional parts
STEP_VARIANTS = [("ddpm", False, True, False), ("ddim", False, True, False), ("linear", True, True, True),
                 ("linear", False, False, False), ("flow_euler", False, False, True),
                 ("flow_euler", False, False, False), ("flow_heun", True, False, False)]


def step_case_params():
    """(i, shape, layout) for each row of STEP_CASES; i picks the case's slice of a sweep (combos)."""
    return [pytest.param(i, shape, layout, id=f"{layout}-{'x'.join(map(str, shape))}")
            for i, (shape, layout) in enumerate(STEP_CASES)]


def combos(impl, i, *axes, cases=len(STEP_CASES)):
    """The product of axes for case i of a table of `cases`. Under the Triton interpreter (milliseconds
    per program) case i runs every `cases`-th combination from i: the cases together meet each one once."""
    every = list(itertools.product(*axes))
    return every if impl != ("triton", "cpu") else every[i % cases::cases]


def step_inputs(shape, layout, device="cpu", dtype=torch.float32, seed=0, ft_channels=None, v_range=1.5):
    """x, out_ft, out_guide, noise, prev of `shape` as a sampler holds them, in a memory layout:
    contiguous  plain tensors; out_guide with only the C channels a step may read;
    strided     the two models' outputs interleaved per sample (batch stride 2 * out_ft's), x a channel
                slice, noise the first n rows of a 2n draw taken channel-major, prev every other row;
    rows        every other row of bigger tensors with a channel offset, out_guide with transposed planes;
    planes      (H, W) planes not contiguous (transposed, channels_last): the implementations copy.
    out_ft has ft_channels (default 2C + 1: eps, variance values, one extra); its variance values
    [C, 2C) are mostly in [-1, 1] as the model's (v_range wide)."""
    g = gen(seed)
    n, C, H, W = shape
    F = 2 * C + 1 if ft_channels is None else ft_channels

    def r(*s):
        return torch.randn(*s, generator=g)

    if layout == "contiguous":
        x, ft, pre, z, prev = r(n, C, H, W), r(n, F, H, W), r(n, C, H, W), r(n, C, H, W), r(n, C, H, W)
    elif layout == "strided":
        both = r(n, 2, F, H, W)
        x, ft, pre = r(n, C + 2, H, W)[:, 1:C + 1], both[:, 0], both[:, 1]
        z, prev = r(C, 2 * n, H, W).transpose(0, 1)[:n], r(2 * n, C, H, W)[1::2]
    elif layout == "rows":
        x, ft = r(2 * n, C + 2, H, W)[::2, 2:], r(2 * n, F + 2, H, W)[::2, 2:]
        pre, z, prev = r(n, C + 4, W, H).transpose(2, 3), r(2 * n, C, H, W)[1::2], r(2 * n, C, H, W)[::2]
    elif layout == "planes":
        x, pre, prev = r(n, C, W, H).transpose(2, 3), r(n, F, W, H).transpose(2, 3), r(n, C, W, H).transpose(2, 3)
        ft, z = r(n, F, H, W).to(memory_format=torch.channels_last), r(n, C, H, W)
    else:
        raise ValueError(layout)
    x = x * 2
    if F >= 2 * C:
        ft[:, C:2 * C] = (torch.rand(ft[:, C:2 * C].shape, generator=g) * 2 - 1) * v_range
    return tuple(t.to(device, dtype) for t in (x, ft, pre, z, prev))


def numpy_exp(t):
    return torch.from_numpy(np.exp(t.detach().cpu().numpy())).to(t.device)


def reference_step(impl, *args, **kwargs):
    """ops.guided_step_torch, with exp as the implementation (backend, device) evaluates it."""
    if impl == ("triton", "cpu"):
        with mock.patch.object(torch, "exp", numpy_exp):
            return ops.guided_step_torch(*args, **kwargs)
    return ops.guided_step_torch(*args, **kwargs)


def run_step(impl, x, ft, pre, noise, coefs, **kwargs):
    """ops.guided_step with the implementation forced (the public dispatch for a named backend)."""
    return ops.guided_step(x, ft, pre, noise, coefs, backend=impl[0], **kwargs)


# ----------------------------------------------------------------------------------------------
# adaln_modulate, gated_residual_modulate: (N, T, D) tokens and (N, D) rows
# ----------------------------------------------------------------------------------------------

ROW_SHAPES = [(1, 1, 1), (2, 3, 7), (1, 17, 384), (3, 5, 1152), (2, 1, 33), (1, 4, 72)]
ROW_LAYOUTS = ["plain", "every-other-token", "transposed", "strided-last-dim"]


def tokens(g, N, T, D, layout):
    """(N, T, D) in a memory layout, with a nonzero mean per row as DiT activations have."""
    if layout == "plain":
        h = torch.randn(N, T, D, generator=g)
    elif layout == "every-other-token":
        h = torch.randn(N, 2 * T, D, generator=g)[:, ::2]
    elif layout == "transposed":
        h = torch.randn(T, N, D, generator=g).transpose(0, 1)
    elif layout == "strided-last-dim":
        h = torch.randn(N, T, 2 * D, generator=g)[..., ::2]
    else:
        raise ValueError(layout)
    return h * 3 + torch.randn(N, 1, 1, generator=g) * 5


def modulation(g, N, D, transposed=False):
    """shift, scale, gate: chunks of one (N, 6D) adaLN output (row stride 6D), or transposed views."""
    if transposed:
        return [torch.randn(D, N, generator=g).t() for _ in range(3)]
    return list(torch.randn(N, 6 * D, generator=g).chunk(6, dim=1)[:3])


def row_inputs(shape, layout, device="cpu", dtype=torch.float32, seed=0, transposed=False):
    """h, y (N, T, D) (y in the next layout), gate, shift, scale (N, D)."""
    g = gen(seed)
    h = tokens(g, *shape, layout)
    y = tokens(g, *shape, ROW_LAYOUTS[(ROW_LAYOUTS.index(layout) + 1) % len(ROW_LAYOUTS)])
    shift, scale, gate = modulation(g, shape[0], shape[2], transposed)
    return tuple(t.to(device, dtype) for t in (h, y, gate, shift, scale))


ROW_CASES = [(shape, layout) for shape in ROW_SHAPES for layout in ROW_LAYOUTS]


def row_case_params():
    """(i, shape, layout): every row shape in every layout."""
    return [pytest.param(i, shape, layout, id=f"{layout}-{'x'.join(map(str, shape))}")
            for i, (shape, layout) in enumerate(ROW_CASES)]


ROW_TOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # one rounding to the dtype


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# gelu_tanh: any shape, bias over the last dim
# ----------------------------------------------------------------------------------------------

# (shape, big): a big shape launches too many programs for the Triton interpreter (milliseconds each).
GELU_SHAPES = [((3, 5, 7), False), ((1,), False), ((37, 1536), True), ((2048, 33), True), ((1, 1152), False),
               ((3, 5, 72), False), ((1, 1, 4608), False), ((7,), False)]


def gelu_case_params(*names):
    """(impl, shape) for each named implementation and gelu shape."""
    params = []
    for b in backends(*names):
        impl, = b.values
        for shape, big in GELU_SHAPES:
            marks = list(b.marks)
            if big and impl == ("triton", "cpu"):
                marks.append(pytest.mark.skip(reason="too many programs for the Triton interpreter"))
            params.append(pytest.param(impl, shape, id=f"{b.id}-{'x'.join(map(str, shape))}", marks=marks))
    return params


def gelu_inputs(shape, bias, device="cpu", dtype=torch.float32, seed=0, layout="plain"):
    """x (* 3) in a layout (plain, strided: every other element of the last dim, transposed: the last two
    dims swapped) and a bias (D,) or None."""
    g = gen(seed)
    if layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    elif layout == "transposed":
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    else:
        x = torch.randn(shape, generator=g)
    b = torch.randn(shape[-1], generator=g) if bias else None
    return (x * 3).to(device, dtype), None if b is None else b.to(device, dtype)


def gelu_exact(v):
    v = v.double()
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def assert_gelu_close(out, ref, v):
    """|out - ref| <= 1e-6 |ref| + 1e-7 max(1, |v|), v the GELU input (x + bias).

    The |v| factor is not slack: for v < -3, torch rounds tanh(u) to float (steps of 6e-8 near -1)
    before adding 1, so its own result is 0.5 |v| (1 + tanh) with an absolute error of up to
    0.5 |v| * 6e-8, i.e. relative errors up to 1e-4. Agreeing to a flat 1e-7 there would need
    torch's exact tanh rounding (Sleef's), not just an accurate GELU.
    """
    assert out.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan)
    out, ref, v = out[~nan].double(), ref[~nan].double(), v[~nan].double()
    inf = ref.isinf()
    assert torch.equal(out[inf], ref[inf])
    err = (out - ref).abs()[~inf]
    tol = (1e-6 * ref.abs() + 1e-7 * v.abs().clamp_min(1.0))[~inf]
    assert bool((err <= tol).all()), f"max err/tol {(err / tol).max().item():.3g}"
