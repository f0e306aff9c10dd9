"""guided_step on every implementation (tests/op_cases.py): the C++ and the Triton kernels against the
torch twin, bit for bit, on the step shape table in every memory layout: each DiT step kind (last,
first, middle), guided-channel count and clip setting; every other sampler mode; the scale rounded
as torch rounds it; NaN exactly where the reference has NaN; exp of the ddpm variance with torch's
bits over its whole range. Then what only one implementation has: fp16/bf16 (Triton), the Triton
launcher's out= and errors, the interpreter's exp, the C++ module's errors, exp paths and threads.
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
from op_cases import (DDIM, DDPM, EXT, FUSED, HALF, INTERPRET, KERNELS, ROWS, SCALE, STEP_VARIANTS, assert_bits,
                      assert_same_with_nans, assert_thread_count_free, backends, combos, numpy_exp, poisoned,
                      reference_step, rounded, run_step, step_case_params, step_inputs)

S = len(DDPM)
interp_only = pytest.mark.skipif(not INTERPRET or KERNELS is None, reason="documents the Triton interpreter")
cpp_only = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")


def check_steps(impl, inputs, row, settings, **kw):
    """For each (k, clip): the implementation's step, contiguous and finite, has the reference's bits."""
    x, ft, pre, z = inputs
    for k, clip in settings:
        args = (x, ft, pre if k else None, z, row)
        opts = dict(scale=SCALE, guidance_channels=k, clip_denoised=clip, **kw)
        got = run_step(impl, *args, **opts)
        assert got.is_contiguous() and bool(torch.isfinite(got).all()), (k, clip)
        assert_bits(got, reference_step(impl, *args, **opts))


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("i,shape,layout", step_case_params())
def test_ddpm_bit_equal(impl, i, shape, layout):
    C = shape[1]
    for j, k, clip in combos(impl, i, (S - 1, S // 2, 1, 0), (0, C - 1, C), (False, True)):
        inputs = step_inputs(shape, layout, impl[1], seed=1000 * j + i)[:4]
        check_steps(impl, inputs, DDPM[j], [(k, clip)])


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("i,shape,layout", step_case_params())
def test_ddim_bit_equal(impl, eta, i, shape, layout):
    """DDIM reads eps only: out_ft may have just C channels."""
    C, rows = shape[1], DDIM[eta]
    for j, ft_channels, k, clip in combos(impl, i, (len(rows) - 1, 20, 1, 0), (C, 2 * C), (0, C - 1, C),
                                          (False, True)):
        inputs = step_inputs(shape, layout, impl[1], seed=j + int(eta * 7), ft_channels=ft_channels)[:4]
        check_steps(impl, inputs, rows[j], [(k, clip)], step_mode="ddim")


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("variant", STEP_VARIANTS[2:], ids=lambda v: f"{v[0]}{'-prev' * v[1]}{'-noise' * v[2]}"
                         f"{'-state' * v[3]}")
@pytest.mark.parametrize("i,shape,layout", step_case_params())
def test_sampler_modes_bit_equal(impl, variant, i, shape, layout):
    """linear / flow_euler / flow_heun, each with and without its optional prev, noise and state."""
    mode, reads_prev, takes_noise, state = variant
    x, ft, pre, z, prev = step_inputs(shape, layout, impl[1], seed=11 + i)
    C = shape[1]
    for k, clip in combos(impl, i, (0, C - 1, C), (False, True) if mode == "linear" else (False,)):
        args = (x, ft, pre if k else None, z if takes_noise else None, ROWS[mode])
        opts = dict(scale=SCALE, guidance_channels=k, step_mode=mode, clip_denoised=clip,
                    prev=prev if reads_prev else None, return_state=state)
        got, want = run_step(impl, *args, **opts), ops.guided_step_torch(*args, **opts)
        for g, w in zip(got if state else [got], want if state else [want]):
            assert g.is_contiguous() and bool(torch.isfinite(g).all()), (k, clip)
            assert_bits(g, w)


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("scale", [1.37, 4.0, 0.1, -2.5, 1.0])
def test_scale_is_rounded_like_torch(impl, scale):
    """The scale is rounded to float32 once, as torch's scalar multiply does (1.37 is not a float32)."""
    x, ft, pre, z, _ = step_inputs((2, 4, 11, 3), "contiguous", impl[1], seed=7)
    got = run_step(impl, x, ft, pre, z, DDPM[100], scale=scale, guidance_channels=3)
    assert_bits(got, reference_step(impl, x, ft, pre, z, DDPM[100], scale=scale, guidance_channels=3))


@pytest.mark.parametrize("impl", [b for b in backends(*FUSED) if b.values[0] != ("triton", "cpu")])
@pytest.mark.parametrize("shape", [(3, 4, 257, 255), (1, 4, 1, 1021), (2, 4, 3, 3)])
def test_exp_bits_over_the_whole_range(impl, shape):
    """std = exp(0.5 * logvar) must have torch.exp's bits for any variance value, also where exp
    overflows or underflows, and in every position of a SIMD vector and chunk (odd sizes leave tails).
    (The interpreter's exp is numpy's: test_interpreter_exp_is_the_only_difference.)"""
    g = torch.Generator().manual_seed(shape[-1])
    n, C, H, W = shape
    x = torch.randn(shape, generator=g)
    v = (torch.rand(n * C * H * W, generator=g) * 2 - 1) * 300  # logvar from about -2000 to 2000
    v[:64] = torch.rand(64, generator=g) * 4 - 2
    ft = torch.cat([torch.randn(shape, generator=g), v.view(shape)], dim=1)
    z = torch.randn(shape, generator=g)
    x, ft, z = (t.to(impl[1]) for t in (x, ft, z))
    for j in (S - 1, 3, 0):
        for coefs in (DDPM[j], [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0]):  # second: out = exp((v+1)/2) * z
            assert_bits(run_step(impl, x, ft, None, z, coefs), ops.guided_step_torch(x, ft, None, z, coefs))


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", [False, True])
def test_nan_propagates(impl, mode, clip):
    rows = DDPM if mode == "ddpm" else DDIM[1.0]
    for j in (len(rows) - 1, 0):  # j = 0: mask 0, and 0 * NaN (std or noise) is still NaN
        x, ft, pre, z, _ = step_inputs((2, 4, 5, 7), "contiguous", impl[1], seed=3 + j)
        x[0, 0, 0, 0] = math.nan
        ft[0, 1, 1, 1] = math.nan      # guided eps channel
        ft[1, 5, 2, 2] = math.nan      # variance channel (read by ddpm only)
        pre[1, 2, 3, 3] = math.nan     # guided channel of the pre-trained model
        pre[1, 3, 4, 4] = math.nan     # channel 3: not guided with k = 3, so ignored
        z[1, 0, 0, 6] = math.nan
        got = run_step(impl, x, ft, pre, z, rows[j], scale=SCALE, guidance_channels=3, step_mode=mode,
                       clip_denoised=clip)
        want = reference_step(impl, x, ft, pre, z, rows[j], scale=SCALE, guidance_channels=3, step_mode=mode,
                              clip_denoised=clip)
        nan = got.isnan()
        assert nan[0, 0, 0, 0] and nan[0, 1, 1, 1] and nan[1, 2, 3, 3] and nan[1, 0, 0, 6]
        assert bool(nan[1, 1, 2, 2]) == (mode == "ddpm") and not nan[1, 3, 4, 4]
        assert_same_with_nans(got, want)


@pytest.mark.parametrize("impl", backends(*FUSED))
def test_empty_batch(impl):
    x, ft, pre, z, _ = step_inputs((2, 4, 3, 3), "contiguous", impl[1])
    for mode, row in (("ddpm", DDPM[5]), ("ddim", DDIM[1.0][5])):
        out = run_step(impl, x[:0], ft[:0], pre[:0], z[:0], row, guidance_channels=3, step_mode=mode)
        assert out.shape == (0, 4, 3, 3)


# ----------------------------------------------------------------------------------------------
# Triton only: half precision, the launcher's out= and errors, the interpreter's exp
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_triton_half_inputs(impl, dtype, mode):
    """fp16/bf16 in and out, float32 inside: exactly the float32 reference on the upcast inputs,
    rounded once to the output dtype (see op_cases.rounded for the interpreter's bf16 cast)."""
    x, ft, pre, z, _ = step_inputs((2, 4, 5, 7), "strided", impl[1], dtype=dtype)
    row = DDPM[200] if mode == "ddpm" else DDIM[1.0][20]
    got = run_step(impl, x, ft, pre, z, row, scale=SCALE, guidance_channels=3, step_mode=mode)
    want = reference_step(impl, *(t.float() for t in (x, ft, pre, z)), row, scale=SCALE, guidance_channels=3,
                          step_mode=mode)
    assert got.dtype == dtype and torch.equal(got, rounded(want, dtype, impl[1]))


@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=lambda v: f"{v[0]}{'-state' * v[3]}")
def test_triton_launcher_writes_every_element_of_out(impl, variant):
    """A preallocated out (full of NaN) is the result, every element written."""
    mode, reads_prev, takes_noise, state = variant
    x, ft, pre, z, prev = step_inputs((2, 4, 5, 7), "strided", impl[1], seed=2)
    out = poisoned(x.shape, impl[1])
    got = KERNELS.guided_step(x, ft, pre, z if takes_noise else None, ROWS[mode], scale=SCALE, k=3, step_mode=mode,
                              out=out, prev=prev if reads_prev else None, return_state=state)
    want = reference_step(impl, x, ft, pre, z if takes_noise else None, ROWS[mode], scale=SCALE,
                          guidance_channels=3, step_mode=mode, prev=prev if reads_prev else None, return_state=state)
    assert (got[0] if state else got) is out
    for g, w in zip(got if state else [got], want if state else [want]):
        assert_bits(g, w)


@interp_only
def test_interpreter_exp_is_the_only_difference():
    """Against the untouched torch reference, the interpreted ddpm step differs exactly where
    numpy's and torch's float32 exp round the step's exp(0.5 * logvar) differently."""
    x, ft, pre, z, _ = step_inputs((2, 4, 16, 16), "contiguous", v_range=1.0)
    c = DDPM[150]
    got = run_step(("triton", "cpu"), x, ft, pre, z, c, scale=SCALE, guidance_channels=3)
    want = ops.guided_step_torch(x, ft, pre, z, c, scale=SCALE, guidance_channels=3)
    frac = (ft[:, 4:8] + 1) / 2  # the reference's exp argument, same ops
    arg = 0.5 * (frac * torch.tensor(c[5]) + (1 - frac) * torch.tensor(c[4]))
    exp_differs = numpy_exp(arg) != torch.exp(arg)
    differs = got != want
    assert differs.any() and not (differs & ~exp_differs).any()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET or KERNELS is None, reason="CPU tensors need TRITON_INTERPRET=1")
def test_triton_launcher_errors():
    x, ft, pre, z, _ = step_inputs((2, 4, 5, 7), "contiguous")
    ft = ft[:, :8]
    c = DDPM[5].tolist()
    with pytest.raises(ValueError, match="mode"):
        KERNELS.guided_step(x, ft, pre, z, c, step_mode="euler")
    with pytest.raises(ValueError, match="out_ft"):
        KERNELS.guided_step(x, ft[:, :4], pre, z, c, k=3)  # ddpm needs the variance channels
    with pytest.raises(ValueError, match="noise"):
        KERNELS.guided_step(x, ft, pre, z[:, :, :4], c, k=3)
    with pytest.raises(ValueError, match="out_guide"):
        KERNELS.guided_step(x, ft, pre[:, :2], z, c, k=3)
    with pytest.raises(ValueError, match="out_guide"):
        KERNELS.guided_step(x, ft, None, z, c, k=3)
    with pytest.raises(ValueError, match="k must"):
        KERNELS.guided_step(x, ft, pre, z, c, k=5)
    with pytest.raises(TypeError, match="float32"):
        KERNELS.guided_step(x, ft.double(), pre, z, c, k=3)
    with pytest.raises(ValueError, match="meta"):
        KERNELS.guided_step(x, ft.to("meta"), pre, z, c, k=3)
    with pytest.raises(ValueError, match="coefs"):
        KERNELS.guided_step(x, ft, pre, z, c * 2, k=3)
    with pytest.raises(ValueError, match="out"):
        KERNELS.guided_step(x, ft, pre, z, c, k=3, out=torch.empty_like(x, dtype=torch.float16))
    assert KERNELS.guided_step(x[:0], ft[:0], pre[:0], z[:0], c, k=3).shape == (0, 4, 5, 7)


@pytest.mark.parametrize("fn", [ops.guided_step, ops.guided_step_torch], ids=lambda f: f.__name__)
def test_old_keyword_names_warn_for_one_release(fn):
    """mode= and out_pre= (step_mode= and out_guide= before the rename) still work, with a
    DeprecationWarning naming the new name, and give the new names' step; both names at once raise."""
    x, ft, pre, z, _ = step_inputs((2, 4, 5, 7), "contiguous", seed=7)
    row = ROWS["ddim"].tolist()  # not the default step_mode: a dropped mode= would give ddpm's step
    want = fn(x, ft, pre, z, row, scale=SCALE, guidance_channels=3, step_mode="ddim")
    with pytest.warns(DeprecationWarning, match=r"mode= is deprecated.*use step_mode="):
        got = fn(x, ft, pre, z, row, scale=SCALE, guidance_channels=3, mode="ddim")
    assert_bits(got, want)
    with pytest.warns(DeprecationWarning, match=r"out_pre= is deprecated.*use out_guide="):
        got = fn(x, ft, noise=z, coefs=row, out_pre=pre, scale=SCALE, guidance_channels=3, step_mode="ddim")
    assert_bits(got, want)
    with pytest.raises(TypeError, match="both mode= and step_mode="):
        fn(x, ft, pre, z, row, step_mode="ddim", mode="ddim")
    with pytest.raises(TypeError, match="both out_pre= and out_guide="):
        fn(x, ft, pre, z, row, out_pre=pre)  # out_guide given by position
    with pytest.raises(TypeError, match="both out_pre= and out_guide="):
        fn(x, ft, noise=z, coefs=row, out_guide=pre, out_pre=pre)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET, reason="checks compiled Triton: unset TRITON_INTERPRET")
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_cuda_full_size(mode):
    """The production shape (DiT-XL/2 at 512px latents, batch 64): bit-equal over every step kind."""
    x, ft, pre, z, _ = step_inputs((64, 4, 64, 64), "strided", "cuda")
    table = DDPM if mode == "ddpm" else DDIM[1.0]
    for j in (0, 1, len(table) // 2, len(table) - 1):
        got = run_step(("triton", "cuda"), x, ft, pre, z, table[j], scale=SCALE, guidance_channels=3, step_mode=mode)
        want = ops.guided_step_torch(x, ft, pre, z, table[j], scale=SCALE, guidance_channels=3, step_mode=mode)
        assert torch.equal(got, want), f"step {j}"


# ----------------------------------------------------------------------------------------------
# C++ only: the module's own errors, its exp paths, threads
# ----------------------------------------------------------------------------------------------

@cpp_only
def test_cpp_module_errors():
    x, ft, pre, z, _ = step_inputs((2, 4, 4, 4), "contiguous")
    ft, pre = ft[:, :8], torch.cat([pre, pre], dim=1)
    row = [float(c) for c in DDPM[5]]
    bad = [
        (dict(x=x.double()), "x must be float32"),
        (dict(ft=ft.double()), "out_ft must be float32"),
        (dict(pre=pre.double()), "out_guide must be float32"),
        (dict(z=z.to(torch.int32)), "noise must be float32"),
        (dict(z=z[:, :3]), "noise must have x's shape"),
        (dict(ft=ft[:, :7]), "out_ft must be"),
        (dict(ft=ft[:1]), "out_ft must be"),
        (dict(pre=pre[:, :2]), "out_guide must be"),
        (dict(pre=pre[:, :, :3]), "out_guide must be"),
        (dict(coefs=row[:6]), "7 values"),
        (dict(k=5), r"k \(guided channels\)"),
        (dict(k=-1), r"k \(guided channels\)"),
        (dict(pre=None), "out_guide is None"),
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


@cpp_only
def test_cpp_result_does_not_depend_on_thread_count(one_thread):
    x, ft, pre, z, _ = step_inputs((4, 4, 64, 64), "contiguous", seed=21)

    row = [float(c) for c in DDPM[77]]
    assert_thread_count_free(lambda: EXT.guided_step(x, ft, pre, z, row, SCALE, 3, False, False), one_thread)


@cpp_only
def test_cpp_exp_backend_reported():
    assert EXT.exp_backend() in ("mkl-vml", "at::exp")


@cpp_only
def test_cpp_exp_fallback_path_is_bit_equal_too():
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
