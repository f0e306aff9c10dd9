"""gated_residual_modulate, (h + gate * y, adaln_modulate(h + gate * y, shift, scale)), on every
implementation (tests/op_cases.py): the C++ and Triton kernels' residual bit-equal to the torch twin's
(mul then add, the same two roundings) and their modulated output within 1e-5, on the row shape table
with h and y in different layouts; NaN where the reference has NaN. Then: fp16/bf16 and the
launcher's out= (Triton), each implementation's errors, threads (C++).
"""
import math

import pytest
import torch

from dgfast import ops
from op_cases import (EXT, FUSED, HALF, INTERPRET, KERNELS, ROW_TOL, assert_bits, assert_each_raises,
                      assert_same_with_nans, assert_thread_count_free, backends, close, gen, modulation, poisoned,
                      rounded, row_case_params, row_inputs)

cpp_only = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")


@pytest.mark.parametrize("impl", backends(*FUSED))
@pytest.mark.parametrize("i,shape,layout", row_case_params())
def test_gated_residual_modulate(impl, i, shape, layout):
    for transposed in (False, True):
        h, y, gate, shift, scale = row_inputs(shape, layout, impl[1], seed=3 * sum(shape) + i, transposed=transposed)
        h_new, out = ops.gated_residual_modulate(h, gate, y, shift, scale, backend=impl[0])
        ref_h, ref = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
        assert h_new.is_contiguous() and out.is_contiguous()
        assert bool(torch.isfinite(h_new).all() and torch.isfinite(out).all())
        assert_bits(h_new, ref_h.contiguous())
        close(out, ref)


@pytest.mark.parametrize("impl", backends(*FUSED))
def test_nan_propagates(impl):
    g = gen(5)
    N, T, D = 2, 3, 40
    h, y = (torch.randn(N, T, D, generator=g).to(impl[1]) for _ in range(2))
    shift, scale, gate = (t.to(impl[1]) for t in modulation(g, N, D))
    h[0, 1, 7] = math.nan   # poisons row (0, 1) of the residual and of its LayerNorm
    y[1, 2, 9] = math.nan   # poisons row (1, 2) likewise, through gate * y
    shift = shift.clone()
    shift[1, 3] = math.nan  # poisons column 3 of sample 1's modulated output only
    h_new, out = ops.gated_residual_modulate(h, gate, y, shift, scale, backend=impl[0])
    ref_h, ref = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
    assert_same_with_nans(h_new, ref_h)
    assert int(h_new.isnan().sum()) == 2
    assert torch.equal(out.isnan(), ref.isnan())
    assert bool(out[0, 1].isnan().all()) and bool(out[1, 2].isnan().all()) and bool(out[1, :, 3].isnan().all())
    close(out.nan_to_num(0.0), ref.nan_to_num(0.0))


@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("dtype", HALF)
def test_triton_half(impl, dtype):
    """float32 inside, one rounding out; the residual is rounded before it is normalised, as the reference."""
    h, y, gate, shift, scale = row_inputs((2, 3, 1152), "transposed", impl[1], dtype=dtype)
    f = [t.float() for t in (h, y, gate, shift, scale)]
    got_h, got_x = ops.gated_residual_modulate(h, gate, y, shift, scale, backend="triton")
    assert got_h.dtype == got_x.dtype == dtype
    want_h = ops.gated_residual_modulate_torch(f[0], f[2], f[1], f[3], f[4])[0]
    assert torch.equal(got_h, rounded(want_h, dtype, impl[1]))
    want_x = ops.adaln_modulate_torch(rounded(want_h, dtype, impl[1]).float(), f[3], f[4])
    torch.testing.assert_close(got_x.float(), want_x, rtol=ROW_TOL[dtype], atol=1e-5)


@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("shape", [(2, 3, 1152), (1, 4, 72), (3, 2, 33)])
def test_triton_launcher_writes_every_element_of_out(impl, shape):
    h, y, gate, shift, scale = row_inputs(shape, "every-other-token", impl[1])
    out = (poisoned(shape, impl[1]), poisoned(shape, impl[1]))
    got_h, got_x = KERNELS.gated_residual_modulate(h, gate, y, shift, scale, eps=1e-6, out=out)
    assert got_h is out[0] and got_x is out[1]
    want_h, want_x = ops.gated_residual_modulate_torch(h, gate, y, shift, scale, eps=1e-6)
    assert torch.equal(got_h, want_h)  # mul then add, no FMA: exact in float32
    close(got_x, want_x)


@pytest.mark.skipif(not INTERPRET or KERNELS is None, reason="CPU tensors need TRITON_INTERPRET=1")
def test_triton_launcher_errors():
    h, y, gate, shift, scale = row_inputs((2, 3, 8), "plain")
    with pytest.raises(ValueError, match="y must"):
        KERNELS.gated_residual_modulate(h, gate, y[:, :2], shift, scale)
    with pytest.raises(ValueError, match="gate"):
        KERNELS.gated_residual_modulate(h, gate[:1], y, shift, scale)


@cpp_only
def test_cpp_module_errors():
    h, y, gate, shift, scale = row_inputs((2, 3, 8), "plain")
    cases = [
        (lambda: EXT.gated_residual_modulate(h, gate, y[:, :2], shift, scale, 1e-6), "y must have h's shape"),
        (lambda: EXT.gated_residual_modulate(h, gate[:, None], y, shift, scale, 1e-6), r"gate must be \(N, D\)"),
        (lambda: EXT.gated_residual_modulate(h, gate, y.half(), shift, scale, 1e-6), "y must be float32"),
        (lambda: ops.gated_residual_modulate(h, gate.double(), y, shift, scale, backend="cpp"), "gate must be float32"),
    ]
    assert_each_raises(cases)


@cpp_only
def test_cpp_result_does_not_depend_on_thread_count(one_thread):
    h, y, gate, shift, scale = row_inputs((2, 65, 384), "plain", seed=21)
    assert_thread_count_free(lambda: EXT.gated_residual_modulate(h, gate, y, shift, scale, 1e-6), one_thread)
