"""adaln_modulate, LayerNorm(h) (no affine) * (1 + scale) + shift, on every implementation
(tests/op_cases.py): the C++ and Triton kernels within 1e-5 of the torch twin, and the twin within 1e-5
of the float64 formula, on the row shape table in every layout, the modulation rows chunks of one adaLN
output or transposed views; NaN where the reference has NaN. Then: fp16/bf16 and the launcher's out=
(Triton), a row mean far above its spread (C++), each implementation's errors, threads (C++).
"""
import math

import pytest
import torch

from dgfast import ops
from op_cases import (EXT, FUSED, HALF, INTERPRET, KERNELS, ROW_TOL, assert_each_raises, assert_thread_count_free,
                      backends, close, gen, modulation, poisoned, row_case_params, row_inputs)

cpp_only = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")


def exact(h, shift, scale, eps=1e-6):
    hd = h.double()
    z = (hd - hd.mean(-1, keepdim=True)) / (hd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return z * (1 + scale.double()[:, None]) + shift.double()[:, None]


@pytest.mark.parametrize("impl", backends("torch", *FUSED))
@pytest.mark.parametrize("i,shape,layout", row_case_params())
def test_adaln_modulate(impl, i, shape, layout):
    for transposed in (False, True):
        h, _, _, shift, scale = row_inputs(shape, layout, impl[1], seed=sum(shape) + i, transposed=transposed)
        got = ops.adaln_modulate(h, shift, scale, backend=impl[0])
        assert bool(torch.isfinite(got).all())
        if impl[0] == "torch":
            torch.testing.assert_close(got.double(), exact(h, shift, scale), rtol=1e-5, atol=1e-5)
        else:
            assert got.is_contiguous()
            close(got, ops.adaln_modulate_torch(h, shift, scale))


@pytest.mark.parametrize("impl", backends(*FUSED))
def test_nan_propagates(impl):
    g = gen(5)
    N, T, D = 2, 3, 40
    h = torch.randn(N, T, D, generator=g).to(impl[1])
    shift, scale, _ = (t.to(impl[1]) for t in modulation(g, N, D))
    h[0, 1, 7] = math.nan  # poisons row (0, 1) entirely: its mean and variance are NaN
    shift = shift.clone()
    shift[1, 3] = math.nan  # poisons column 3 of sample 1 only
    got = ops.adaln_modulate(h, shift, scale, backend=impl[0])
    ref = ops.adaln_modulate_torch(h, shift, scale)
    assert torch.equal(got.isnan(), ref.isnan())
    assert bool(got[0, 1].isnan().all()) and bool(got[1, :, 3].isnan().all()) and not got[0, 0].isnan().any()
    assert int(got.isnan().sum()) == D + T
    close(got.nan_to_num(0.0), ref.nan_to_num(0.0))


@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("dtype", HALF)
def test_triton_half(impl, dtype):
    """float32 inside, one rounding out: within one ulp of the dtype of the float32 reference."""
    h, _, _, shift, scale = row_inputs((2, 3, 1152), "transposed", impl[1], dtype=dtype)
    got = ops.adaln_modulate(h, shift, scale, backend="triton")
    assert got.dtype == dtype
    want = ops.adaln_modulate_torch(h.float(), shift.float(), scale.float())
    torch.testing.assert_close(got.float(), want, rtol=ROW_TOL[dtype], atol=1e-5)


@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("shape", [(2, 3, 1152), (1, 4, 72), (3, 2, 33)])
def test_triton_launcher_writes_every_element_of_out(impl, shape):
    h, _, _, shift, scale = row_inputs(shape, "every-other-token", impl[1])
    out = poisoned(shape, impl[1])
    assert KERNELS.adaln_modulate(h, shift, scale, eps=1e-6, out=out) is out
    close(out, ops.adaln_modulate_torch(h, shift, scale, eps=1e-6))


@pytest.mark.skipif(not INTERPRET or KERNELS is None, reason="CPU tensors need TRITON_INTERPRET=1")
def test_triton_launcher_errors():
    h, _, _, shift, scale = row_inputs((2, 3, 8), "plain")
    with pytest.raises(ValueError, match="shift"):
        KERNELS.adaln_modulate(h, shift[:, :4], scale)
    with pytest.raises(ValueError, match="3-d"):
        KERNELS.adaln_modulate(h[0], shift, scale)
    with pytest.raises(TypeError, match="dtype"):
        KERNELS.adaln_modulate(h, shift.half(), scale)
    with pytest.raises(TypeError, match="float32"):
        KERNELS.adaln_modulate(h.double(), shift.double(), scale.double())
    with pytest.raises(ValueError, match="meta"):
        KERNELS.adaln_modulate(h, shift.to("meta"), scale)
    with pytest.raises(ValueError, match="out"):
        KERNELS.adaln_modulate(h, shift, scale, out=torch.empty(2, 3, 7))


@cpp_only
def test_cpp_row_mean_far_above_its_spread():
    """The float rounding of the mean must not leak into z (corrected two-pass moments)."""
    g = gen(11)
    h = 1000 + torch.randn(2, 9, 1152, generator=g) * 1e-2
    shift, scale, _ = modulation(g, 2, 1152)
    out = ops.adaln_modulate(h, shift, scale, backend="cpp")
    torch.testing.assert_close(out.double(), exact(h, shift, scale), rtol=1e-5, atol=1e-5)


@cpp_only
def test_cpp_module_errors():
    h, _, _, shift, scale = row_inputs((2, 3, 8), "plain")
    cases = [
        (lambda: EXT.adaln_modulate(h.double(), shift, scale, 1e-6), "h must be float32"),
        (lambda: EXT.adaln_modulate(h, shift.double(), scale, 1e-6), "shift must be float32"),
        (lambda: EXT.adaln_modulate(h[0], shift, scale, 1e-6), r"h must be \(N, T, D\)"),
        (lambda: EXT.adaln_modulate(h, shift[:, :7], scale, 1e-6), r"shift must be \(N, D\)"),
        (lambda: EXT.adaln_modulate(h, shift, scale[:1], 1e-6), r"scale must be \(N, D\)"),
        (lambda: ops.adaln_modulate(h.double(), shift, scale, backend="cpp"), "h must be float32"),
    ]
    assert_each_raises(cases)


@cpp_only
def test_cpp_result_does_not_depend_on_thread_count(one_thread):
    h, _, _, shift, scale = row_inputs((2, 65, 384), "plain", seed=21)
    assert_thread_count_free(lambda: EXT.adaln_modulate(h, shift, scale, 1e-6), one_thread)
