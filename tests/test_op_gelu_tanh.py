"""gelu_tanh, GELU with the tanh approximation of (x + bias), on every implementation
(tests/op_cases.py): the C++ kernel within 1e-6 relative (plus the |x| term torch's own rounding
needs, see op_cases.assert_gelu_close) of the torch twin and of the exact function, the Triton kernel
within 1e-6 of the twin, the twin itself accurate on the same terms; on the gelu shape table with and
without bias, strided and transposed inputs, NaN where the reference has NaN. Then: the full float
range and specials, fp16/bf16 and the launcher's out= (Triton), each implementation's errors, threads;
gelu_tanh_ (in place) against gelu_tanh on every implementation.
"""
import math

import pytest
import torch

from dgfast import ops
from op_cases import (EXT, HALF, INTERPRET, KERNELS, ROW_TOL, assert_each_raises, assert_gelu_close,
                      assert_same_with_nans, assert_thread_count_free, gelu_case_params, gelu_exact, gelu_inputs,
                      backends, poisoned)

cpp_only = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")
# For x below about -10.2, exp(-2a) overflows to inf and x / (1 + inf) = -0, the right limit; under
# the interpreter that is numpy's exp, which warns.
exp_overflow_is_fine = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def assert_agrees(impl, out, ref, v):
    """The implementation's stated accuracy against the twin's result `ref` (v = x + bias)."""
    if impl[0] == "triton":
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    else:
        assert_gelu_close(out, ref, v)


@exp_overflow_is_fine
@pytest.mark.parametrize("impl,shape", gelu_case_params("torch", "cpp", "triton"))
@pytest.mark.parametrize("bias", [False, True])
def test_gelu_tanh(impl, shape, bias):
    x, b = gelu_inputs(shape, bias, impl[1], seed=sum(shape) + bias)
    out = ops.gelu_tanh(x, b, backend=impl[0])
    v = x if b is None else x + b
    assert out.is_contiguous() and bool(torch.isfinite(out).all())
    if impl[0] != "torch":
        assert_agrees(impl, out, ops.gelu_tanh_torch(x, b), v)
    if impl[0] != "triton":  # accurate on its own terms too (Triton: test_triton_accuracy_and_specials)
        assert_gelu_close(out.cpu(), gelu_exact(v).float().cpu(), v.cpu())


@exp_overflow_is_fine
@pytest.mark.parametrize("impl,shape", gelu_case_params("torch", "cpp", "triton"))
def test_gelu_tanh_in_place(impl, shape):
    """gelu_tanh_ writes into x the bits gelu_tanh returns (the same implementation), and returns x."""
    x, b = gelu_inputs(shape, True, impl[1], seed=sum(shape) + 7)
    y = x.clone()
    assert ops.gelu_tanh_(y, b, backend=impl[0]) is y
    assert torch.equal(y, ops.gelu_tanh(x, b, backend=impl[0]))
    z = x[..., :1].contiguous()  # no bias (the same layout on both sides: torch's own GELU rounds by layout)
    assert torch.equal(ops.gelu_tanh_(z.clone(), backend=impl[0]), ops.gelu_tanh(z, backend=impl[0]))


def test_gelu_tanh_in_place_needs_a_contiguous_x():
    x = torch.randn(8, 6).t()
    with pytest.raises(ValueError, match="gelu_tanh_: x must be contiguous"):
        ops.gelu_tanh_(x)


@exp_overflow_is_fine
@pytest.mark.parametrize("impl", backends("cpp", "triton"))
def test_noncontiguous_and_nan(impl):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2 * 97, generator=g)[:, ::2] * 3           # strided last dim
    xt = torch.randn(97, 64, generator=g).t() * 3                  # transposed
    bias = torch.randn(2 * 97, generator=g)[1::2]                  # strided bias
    x, xt, bias = (t.to(impl[1]) for t in (x, xt, bias))
    x[5, 9] = math.nan
    bias[11] = math.nan
    for inp in (x, xt):
        for b in (None, bias):
            out = ops.gelu_tanh(inp, b, backend=impl[0])
            assert_agrees(impl, out, ops.gelu_tanh_torch(inp, b), inp if b is None else inp + b)  # NaN included
    assert ops.gelu_tanh(x, None, backend=impl[0])[5, 9].isnan()
    assert bool(ops.gelu_tanh(xt, bias, backend=impl[0])[:, 11].isnan().all())


@cpp_only
def test_cpp_wide_range_and_specials():
    g = torch.Generator().manual_seed(9)
    x = torch.cat([(torch.rand(300001, generator=g) * 2 - 1) * 25,       # both tails, odd length
                   torch.randn(100000, generator=g) * 1e-3,               # near 0: gelu ~ x/2
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 1e20, -1e20, 3e38, -3e38,
                                 math.inf, -math.inf, math.nan])])
    out = ops.gelu_tanh(x, backend="cpp")
    assert_gelu_close(out, ops.gelu_tanh_torch(x), x)
    assert out[-3] == math.inf and out[-2].isnan() and out[-1].isnan()  # -inf * 0 = NaN, as torch


@exp_overflow_is_fine
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # x^3 for x = 1e20
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # -inf / inf = NaN, as torch
@pytest.mark.parametrize("impl", backends("triton"))
def test_triton_accuracy_and_specials(impl):
    """Against the exact function (float64): ~1e-6 relative wherever the result is not tiny; and
    inf/NaN/large inputs behave as torch's formula does."""
    x = torch.cat([torch.linspace(-9, 9, 4097), torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 4])
    got = ops.gelu_tanh(x.to(impl[1]), backend="triton").double().cpu()
    exact = gelu_exact(x)
    big = exact.abs() > 1e-3
    assert ((got - exact).abs()[big] / exact.abs()[big]).max() < 2e-6
    assert ((got - exact).abs()[~big]).max() < 1e-9
    special = torch.tensor([math.inf, -math.inf, math.nan, -30.0, 30.0, 0.0, -1e20, 1e20], device=impl[1])
    assert_same_with_nans(ops.gelu_tanh(special, backend="triton"), ops.gelu_tanh_torch(special))


@exp_overflow_is_fine
@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("dtype", HALF)
def test_triton_half(impl, dtype):
    x, b = gelu_inputs((3, 72), True, impl[1], dtype=dtype, seed=1)
    got = ops.gelu_tanh(x, b, backend="triton")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ops.gelu_tanh_torch(x.float(), b.float()), rtol=ROW_TOL[dtype], atol=1e-5)


@exp_overflow_is_fine
@pytest.mark.parametrize("impl", backends("triton"))
@pytest.mark.parametrize("shape", [(3, 5, 72), (2, 1152), (7,), (1, 1, 4608)])
def test_triton_launcher_writes_every_element_of_out(impl, shape):
    x, b = gelu_inputs(shape, True, impl[1], seed=1)
    out = poisoned(shape, impl[1])
    assert KERNELS.gelu_tanh(x, b, out=out) is out
    torch.testing.assert_close(out, ops.gelu_tanh_torch(x, b), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET or KERNELS is None, reason="CPU tensors need TRITON_INTERPRET=1")
def test_triton_launcher_errors():
    x, b = gelu_inputs((2, 8), True)
    with pytest.raises(ValueError, match="bias"):
        KERNELS.gelu_tanh(x, b[:4])
    with pytest.raises(TypeError, match="dtype"):
        KERNELS.gelu_tanh(x, b.half())
    with pytest.raises(TypeError, match="float32"):
        KERNELS.gelu_tanh(x.to(torch.int32))
    with pytest.raises(ValueError, match="meta"):
        KERNELS.gelu_tanh(x, b.to("meta"))
    with pytest.raises(ValueError, match="out"):
        KERNELS.gelu_tanh(x, b, out=torch.empty(2, 9))


@cpp_only
def test_cpp_module_errors():
    x = torch.randn(4, 6)
    cases = [
        (lambda: EXT.gelu_tanh(x.double(), None), "x must be float32"),
        (lambda: EXT.gelu_tanh(x, torch.randn(6, dtype=torch.float64)), "bias must be float32"),
        (lambda: EXT.gelu_tanh(x, torch.randn(5)), r"bias must be \(D,\)"),
        (lambda: EXT.gelu_tanh(x, torch.randn(1, 6)), r"bias must be \(D,\)"),
        (lambda: EXT.gelu_tanh(x.to(torch.int64), None), "x must be float32"),
        (lambda: ops.gelu_tanh(x.half(), backend="cpp"), "x must be float32"),
        (lambda: EXT.gelu_tanh(x, None, torch.empty(4, 5)), "out must be a contiguous tensor of x's shape"),
        (lambda: EXT.gelu_tanh(x, None, torch.empty(6, 4).t()), "out must be a contiguous tensor of x's shape"),
        (lambda: EXT.gelu_tanh(x, None, x.double()), "out must be float32"),
    ]
    assert_each_raises(cases)


@cpp_only
def test_cpp_result_does_not_depend_on_thread_count(one_thread):
    x = torch.randn(129, 1536, generator=torch.Generator().manual_seed(21))
    assert_thread_count_free(lambda: EXT.gelu_tanh(x, None), one_thread)
