"""C++ CPU ops (dgfast._C) against their plain-torch twins in dgfast.ops.

guided_step must be bit-equal to the reference; the LayerNorm ops agree to 1e-5 and GELU to 1e-6
relative. Every op runs both through the dispatch point (ops.<op>(..., backend="cpp")) and
through the raw extension module, on awkward shapes and non-contiguous views.
"""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dgfast import ops
from dgfast.schedule import Schedule

EXT = ops.cpp_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")

VIAS = ("ops", "raw")
DDPM = Schedule.from_steps("250").ddpm_coefs()
S = len(DDPM)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_bits(a, b):
    """Same shape and the same float32 bit patterns everywhere (NaN, inf and -0 included)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    same = a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} elements differ, max |diff| " \
                             f"{(a - b).abs()[~same].max().item()}"


# ----------------------------------------------------------------------------------------------
# guided_step
# ----------------------------------------------------------------------------------------------

def run_step(via, x, ft, pre, z, coefs, *, scale=1.37, k=0, mode="ddpm", clip=False):
    if via == "ops":
        return ops.guided_step(x, ft, pre, z, coefs, scale=scale, guidance_channels=k, mode=mode,
                               clip_denoised=clip, backend="cpp")
    return EXT.guided_step(x, ft, pre, z, [float(c) for c in coefs], float(scale), k if pre is not None else 0,
                           mode == "ddim", clip)


def step_inputs(g, n, hw, *, ft_channels=8, layout="plain", v_range=1.5):
    """x, out_ft, out_pre, noise of batch n and spatial size hw, in one of several memory layouts."""
    H, W = hw
    if layout == "plain":
        x = torch.randn(n, 4, H, W, generator=g) * 2
        ft = torch.randn(n, ft_channels, H, W, generator=g)
        pre = torch.randn(n, 8, H, W, generator=g)  # more channels than k: only [0, k) are read
        z = torch.randn(2 * n, 4, H, W, generator=g)[:n]  # kept rows of the doubled draw
    elif layout == "strided":  # every other row, channel slices, one transposed spatial plane
        x = (torch.randn(n, 6, H, W, generator=g) * 2)[:, 1:5]
        ft = torch.randn(2 * n, ft_channels + 2, H, W, generator=g)[::2, 2:]
        pre = torch.randn(n, 8, W, H, generator=g).transpose(2, 3)
        z = torch.randn(2 * n, 4, H, W, generator=g)[1::2]
    else:
        raise AssertionError(layout)
    if ft_channels >= 8:  # variance values: mostly in [-1, 1] as the model's, some outside
        ft[:, 4:8] = (torch.rand(ft[:, 4:8].shape, generator=g) * 2 - 1) * v_range
    return x, ft, pre, z


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("layout", ["plain", "strided"])
@pytest.mark.parametrize("n,hw", [(1, (7, 5)), (3, (17, 19)), (2, (33, 37)), (5, (1, 1))])
@pytest.mark.parametrize("j", [S - 1, S // 2, 1, 0])
def test_guided_step_ddpm_bit_equal(via, layout, n, hw, j):
    g = gen(1000 * j + 10 * n + hw[0])
    x, ft, pre, z = step_inputs(g, n, hw, layout=layout)
    for k in (0, 3, 4):
        for clip in (False, True):
            out = run_step(via, x, ft, pre if k else None, z, DDPM[j], k=k, clip=clip)
            ref = ops.guided_step_torch(x, ft, pre if k else None, z, DDPM[j], scale=1.37,
                                        guidance_channels=k, clip_denoised=clip)
            assert out.is_contiguous() and bool(torch.isfinite(out).all())
            assert torch.equal(out, ref), (k, clip)
            assert_bits(out, ref)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("layout", ["plain", "strided"])
def test_guided_step_ddim_bit_equal(via, eta, layout):
    coefs = Schedule.from_steps("ddim50").ddim_coefs(eta)
    g = gen(int(eta * 7) + len(layout))
    for j in (len(coefs) - 1, 20, 1, 0):
        for ft_channels in (4, 8):  # DDIM reads eps only: out_ft may have just C channels
            x, ft, pre, z = step_inputs(g, 3, (9, 13), ft_channels=ft_channels, layout=layout)
            for k in (0, 3, 4):
                for clip in (False, True):
                    out = run_step(via, x, ft, pre if k else None, z, coefs[j], k=k, mode="ddim", clip=clip)
                    ref = ops.guided_step_torch(x, ft, pre if k else None, z, coefs[j], scale=1.37,
                                                guidance_channels=k, mode="ddim", clip_denoised=clip)
                    assert bool(torch.isfinite(out).all())
                    assert torch.equal(out, ref), (j, k, clip)


@pytest.mark.parametrize("scale", [1.37, 4.0, 0.1, -2.5, 1.0])
def test_guided_step_scale_cast_like_torch(scale):
    """The scale is rounded to float32 once, as torch's scalar multiply does (1.37 is not a float32)."""
    g = gen(7)
    x, ft, pre, z = step_inputs(g, 2, (11, 3))
    out = run_step("ops", x, ft, pre, z, DDPM[100], scale=scale, k=3)
    ref = ops.guided_step_torch(x, ft, pre, z, DDPM[100], scale=scale, guidance_channels=3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", [(3, 4, 257, 255), (1, 4, 1, 1021), (2, 4, 3, 3)])
def test_guided_step_exp_bits_over_the_whole_range(shape):
    """std = exp(0.5 * logvar) must have torch.exp's bits for any variance value, also where exp
    overflows or underflows, and in every position of a SIMD vector and chunk (odd sizes leave tails)."""
    g = gen(shape[-1])
    n, C, H, W = shape
    x = torch.randn(shape, generator=g)
    v = (torch.rand(n * C * H * W, generator=g) * 2 - 1) * 300  # logvar from about -2000 to 2000
    v[:64] = torch.rand(64, generator=g) * 4 - 2
    ft = torch.cat([torch.randn(shape, generator=g), v.view(shape)], dim=1)
    z = torch.randn(shape, generator=g)
    for j in (S - 1, 3, 0):
        for coefs in (DDPM[j], [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0]):  # second: out = exp((v+1)/2) * z
            out = run_step("raw", x, ft, None, z, coefs)
            ref = ops.guided_step_torch(x, ft, None, z, coefs)
            assert_bits(out, ref)


@pytest.mark.parametrize("via", VIAS)
def test_guided_step_nan_propagates(via):
    g = gen(3)
    n, C, H, W = 2, 4, 5, 7
    for clip in (False, True):
        for j in (S - 1, 0):  # j = 0: mask 0, and 0 * NaN std is still NaN
            x, ft, pre, z = step_inputs(g, n, (H, W))
            x[0, 0, 0, 0] = math.nan
            ft[0, 1, 1, 1] = math.nan      # guided eps channel
            ft[1, 5, 2, 2] = math.nan      # variance channel
            pre[1, 2, 3, 3] = math.nan     # guided channel of the pre-trained model
            pre[1, 3, 4, 4] = math.nan     # channel 3: not guided with k = 3, so ignored
            z[1, 0, 0, 6] = math.nan
            out = run_step(via, x, ft, pre, z, DDPM[j], k=3, clip=clip)
            ref = ops.guided_step_torch(x, ft, pre, z, DDPM[j], scale=1.37, guidance_channels=3,
                                        clip_denoised=clip)
            nan = out.isnan()
            assert torch.equal(nan, ref.isnan())
            assert nan[0, 0, 0, 0] and nan[0, 1, 1, 1] and nan[1, 1, 2, 2] and nan[1, 2, 3, 3]
            assert not nan[1, 3, 4, 4]
            assert nan[1, 0, 0, 6]  # also at the last step: (0 * std) * NaN noise is NaN in the reference
            assert torch.equal(out[~nan], ref[~nan])


def test_guided_step_empty():
    x = torch.randn(0, 4, 3, 3)
    out = run_step("raw", x, torch.randn(0, 8, 3, 3), None, torch.randn(0, 4, 3, 3), DDPM[5])
    assert out.shape == x.shape


def test_guided_step_bad_input():
    g = gen(0)
    x, ft, pre, z = step_inputs(g, 2, (4, 4))
    row = [float(c) for c in DDPM[5]]
    bad = [
        (dict(x=x.double()), "x must be float32"),
        (dict(ft=ft.double()), "out_ft must be float32"),
        (dict(pre=pre.double()), "out_pre must be float32"),
        (dict(z=z.to(torch.int32)), "noise must be float32"),
        (dict(z=z[:, :3]), "noise must have x's shape"),
        (dict(ft=ft[:, :7]), "out_ft must be"),
        (dict(ft=ft[:1]), "out_ft must be"),
        (dict(pre=pre[:, :2]), "out_pre must be"),
        (dict(pre=pre[:, :, :3]), "out_pre must be"),
        (dict(coefs=row[:6]), "7 values"),
        (dict(k=5), r"k \(guided channels\)"),
        (dict(k=-1), r"k \(guided channels\)"),
        (dict(pre=None), "out_pre is None"),
        (dict(x=x[0]), "noise must have"),
        (dict(x=x[0, 0, 0], z=z[0, 0, 0], ft=ft[0, 0, 0]), r"x must be \(n, C, ...\)"),
    ]
    for change, msg in bad:
        a = dict(x=x, ft=ft, pre=pre, z=z, coefs=row, k=3)
        a.update(change)
        with pytest.raises((RuntimeError, ValueError), match=msg):
            EXT.guided_step(a["x"], a["ft"], a["pre"], a["z"], a["coefs"], 1.5, a["k"], False, False)
    with pytest.raises((RuntimeError, ValueError), match="x must be float32"):
        ops.guided_step(x.double(), ft, pre, z, row, scale=1.5, guidance_channels=3, backend="cpp")


# ----------------------------------------------------------------------------------------------
# adaln_modulate / gated_residual_modulate
# ----------------------------------------------------------------------------------------------

def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def token_tensor(g, N, T, D, layout):
    """(N, T, D) in a given memory layout, with a nonzero mean per row as DiT activations have."""
    if layout == "plain":
        h = torch.randn(N, T, D, generator=g)
    elif layout == "every-other-token":
        h = torch.randn(N, 2 * T, D, generator=g)[:, ::2]
    elif layout == "transposed":
        h = torch.randn(T, N, D, generator=g).transpose(0, 1)
    elif layout == "strided-last-dim":
        h = torch.randn(N, T, 2 * D, generator=g)[..., ::2]
    else:
        raise AssertionError(layout)
    return h * 3 + torch.randn(N, 1, 1, generator=g) * 5


def modulation(g, N, D, transposed=False):
    """shift, scale, gate as chunks of one (N, 6D) adaLN output (row stride 6D), or transposed views."""
    if transposed:
        return [torch.randn(D, N, generator=g).t() for _ in range(3)]
    return list(torch.randn(N, 6 * D, generator=g).chunk(6, dim=1)[:3])


SHAPES = [(1, 1, 1), (2, 3, 7), (1, 17, 384), (3, 5, 1152), (2, 1, 33)]
LAYOUTS = ["plain", "every-other-token", "transposed", "strided-last-dim"]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("N,T,D", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adaln_modulate(via, N, T, D, layout):
    g = gen(N * T * D + len(layout))
    h = token_tensor(g, N, T, D, layout)
    for transposed in (False, True):
        shift, scale, _ = modulation(g, N, D, transposed)
        out = (ops.adaln_modulate(h, shift, scale, backend="cpp") if via == "ops"
               else EXT.adaln_modulate(h, shift, scale, ops.LN_EPS))
        ref = ops.adaln_modulate_torch(h, shift, scale)
        assert out.is_contiguous() and bool(torch.isfinite(out).all())
        close(out, ref)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("N,T,D", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gated_residual_modulate(via, N, T, D, layout):
    g = gen(N * T * D + 3 * len(layout))
    h = token_tensor(g, N, T, D, layout)
    y = token_tensor(g, N, T, D, LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)])
    for transposed in (False, True):
        shift, scale, gate = modulation(g, N, D, transposed)
        if via == "ops":
            h_new, out = ops.gated_residual_modulate(h, gate, y, shift, scale, backend="cpp")
        else:
            h_new, out = EXT.gated_residual_modulate(h, gate, y, shift, scale, ops.LN_EPS)
        ref_h, ref = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
        assert bool(torch.isfinite(h_new).all() and torch.isfinite(out).all())
        assert torch.equal(h_new, ref_h)  # h + gate*y: the same two roundings as torch
        close(out, ref)


def test_layernorm_large_mean_small_spread():
    """A row mean far above its spread: the float rounding of the mean must not leak into z."""
    g = gen(11)
    h = 1000 + torch.randn(2, 9, 1152, generator=g) * 1e-2
    shift, scale, _ = modulation(g, 2, 1152)
    out = EXT.adaln_modulate(h, shift, scale, 1e-6)
    hd = h.double()
    z = (hd - hd.mean(-1, keepdim=True)) / (hd.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    exact = z * (1 + scale.double()[:, None]) + shift.double()[:, None]
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("via", VIAS)
def test_modulate_nan_propagates(via):
    g = gen(5)
    N, T, D = 2, 3, 40
    h, y = torch.randn(N, T, D, generator=g), torch.randn(N, T, D, generator=g)
    shift, scale, gate = modulation(g, N, D)
    h[0, 1, 7] = math.nan  # poisons row (0, 1) entirely: its mean and variance are NaN
    shift = shift.clone()
    shift[1, 3] = math.nan  # poisons column 3 of sample 1 only
    if via == "ops":
        out = ops.adaln_modulate(h, shift, scale, backend="cpp")
        h_new, out2 = ops.gated_residual_modulate(h, gate, y, shift, scale, backend="cpp")
    else:
        out = EXT.adaln_modulate(h, shift, scale, 1e-6)
        h_new, out2 = EXT.gated_residual_modulate(h, gate, y, shift, scale, 1e-6)
    ref = ops.adaln_modulate_torch(h, shift, scale)
    ref_h, ref2 = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
    for a, b in ((out, ref), (h_new, ref_h), (out2, ref2)):
        assert torch.equal(a.isnan(), b.isnan())
    assert bool(out[0, 1].isnan().all()) and bool(out[1, :, 3].isnan().all())
    assert int(out.isnan().sum()) == D + T
    close(out.nan_to_num(0.0), ref.nan_to_num(0.0))


def test_modulate_bad_input():
    g = gen(0)
    h, y = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    shift, scale, gate = modulation(g, 2, 8)
    cases = [
        (lambda: EXT.adaln_modulate(h.double(), shift, scale, 1e-6), "h must be float32"),
        (lambda: EXT.adaln_modulate(h, shift.double(), scale, 1e-6), "shift must be float32"),
        (lambda: EXT.adaln_modulate(h[0], shift, scale, 1e-6), r"h must be \(N, T, D\)"),
        (lambda: EXT.adaln_modulate(h, shift[:, :7], scale, 1e-6), r"shift must be \(N, D\)"),
        (lambda: EXT.adaln_modulate(h, shift, scale[:1], 1e-6), r"scale must be \(N, D\)"),
        (lambda: EXT.gated_residual_modulate(h, gate, y[:, :2], shift, scale, 1e-6), "y must have h's shape"),
        (lambda: EXT.gated_residual_modulate(h, gate[:, None], y, shift, scale, 1e-6), r"gate must be \(N, D\)"),
        (lambda: EXT.gated_residual_modulate(h, gate, y.half(), shift, scale, 1e-6), "y must be float32"),
        (lambda: ops.adaln_modulate(h.double(), shift, scale, backend="cpp"), "h must be float32"),
        (lambda: ops.gated_residual_modulate(h, gate.double(), y, shift, scale, backend="cpp"), "gate must be float32"),
    ]
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            fn()


# ----------------------------------------------------------------------------------------------
# gelu_tanh
# ----------------------------------------------------------------------------------------------

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


def gelu_exact(v):
    v = v.double()
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("shape", [(37, 1536), (3, 5, 7), (1,), (2048, 33), (1, 1152)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu_tanh(via, shape, with_bias):
    g = gen(sum(shape) + with_bias)
    x = torch.randn(shape, generator=g) * 3
    bias = torch.randn(shape[-1], generator=g) if with_bias else None
    out = ops.gelu_tanh(x, bias, backend="cpp") if via == "ops" else EXT.gelu_tanh(x, bias)
    ref = ops.gelu_tanh_torch(x, bias)
    v = x if bias is None else x + bias
    assert out.is_contiguous() and bool(torch.isfinite(out).all())
    assert_gelu_close(out, ref, v)
    assert_gelu_close(out, gelu_exact(v).float(), v)  # also accurate on its own terms


def test_gelu_tanh_wide_range_and_specials():
    g = gen(9)
    x = torch.cat([(torch.rand(300001, generator=g) * 2 - 1) * 25,       # both tails, odd length
                   torch.randn(100000, generator=g) * 1e-3,               # near 0: gelu ~ x/2
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 1e20, -1e20, 3e38, -3e38,
                                 math.inf, -math.inf, math.nan])])
    out = EXT.gelu_tanh(x, None)
    assert_gelu_close(out, ops.gelu_tanh_torch(x), x)
    assert out[-3] == math.inf and out[-2].isnan() and out[-1].isnan()  # -inf * 0 = NaN, as torch


@pytest.mark.parametrize("via", VIAS)
def test_gelu_tanh_noncontiguous_and_nan(via):
    g = gen(4)
    x = torch.randn(64, 2 * 97, generator=g)[:, ::2] * 3           # strided last dim
    xt = torch.randn(97, 64, generator=g).t() * 3                  # transposed
    bias = torch.randn(2 * 97, generator=g)[1::2]                  # strided bias
    x[5, 9] = math.nan
    bias[11] = math.nan
    for inp in (x, xt):
        for b in (None, bias):
            out = ops.gelu_tanh(inp, b, backend="cpp") if via == "ops" else EXT.gelu_tanh(inp, b)
            assert_gelu_close(out, ops.gelu_tanh_torch(inp, b), inp if b is None else inp + b)
    assert EXT.gelu_tanh(x, None)[5, 9].isnan() and bool(EXT.gelu_tanh(xt, bias)[:, 11].isnan().all())


def test_gelu_tanh_bad_input():
    x = torch.randn(4, 6)
    cases = [
        (lambda: EXT.gelu_tanh(x.double(), None), "x must be float32"),
        (lambda: EXT.gelu_tanh(x, torch.randn(6, dtype=torch.float64)), "bias must be float32"),
        (lambda: EXT.gelu_tanh(x, torch.randn(5)), r"bias must be \(D,\)"),
        (lambda: EXT.gelu_tanh(x, torch.randn(1, 6)), r"bias must be \(D,\)"),
        (lambda: EXT.gelu_tanh(x.to(torch.int64), None), "x must be float32"),
        (lambda: ops.gelu_tanh(x.half(), backend="cpp"), "x must be float32"),
    ]
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError), match=msg):
            fn()


# ----------------------------------------------------------------------------------------------
# Threads and the exp path
# ----------------------------------------------------------------------------------------------

def test_results_do_not_depend_on_thread_count():
    g = gen(21)
    x, ft, pre, z = step_inputs(g, 4, (64, 64))
    h, y = token_tensor(g, 2, 65, 384, "plain"), token_tensor(g, 2, 65, 384, "plain")
    shift, scale, gate = modulation(g, 2, 384)
    xg = torch.randn(129, 1536, generator=g)

    def all_ops():
        return [EXT.guided_step(x, ft, pre, z, [float(c) for c in DDPM[77]], 1.37, 3, False, False),
                EXT.adaln_modulate(h, shift, scale, 1e-6),
                *EXT.gated_residual_modulate(h, gate, y, shift, scale, 1e-6),
                EXT.gelu_tanh(xg, None)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = all_ops()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, all_ops()):
        assert_bits(a, b)


def test_exp_backend_reported():
    assert EXT.exp_backend() in ("mkl-vml", "at::exp")


def test_exp_fallback_path_is_bit_equal_too():
    """Where MKL's vmsExp is missing (non-MKL torch builds) or disagrees with torch.exp, guided_step
    runs its exp through at::exp_out; force that path in a fresh process and check the bits."""
    code = textwrap.dedent("""
        import torch
        from dgfast import ops
        from dgfast.schedule import Schedule
        m = ops.cpp_extension()
        assert m.exp_backend() == "at::exp", m.exp_backend()
        g = torch.Generator().manual_seed(0)
        shape = (3, 4, 67, 65)
        x, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        v = (torch.rand(shape, generator=g) * 2 - 1) * 300
        ft = torch.cat([torch.randn(shape, generator=g), v], dim=1)
        for j in (249, 7, 0):
            row = Schedule.from_steps("250").ddpm_coefs()[j]
            a = m.guided_step(x, ft, None, z, [float(c) for c in row], 1.0, 0, False, False)
            b = ops.guided_step_torch(x, ft, None, z, row)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), j
        print("ok")
    """)
    root = str(Path(ops.__file__).resolve().parents[1])
    env = dict(os.environ, DGFAST_CPP_EXP="torch",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
