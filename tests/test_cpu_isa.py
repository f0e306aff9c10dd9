"""The C++ row and GELU kernels per ISA. csrc/dgfast_ops.cpp instantiates adaln_modulate's,
gated_residual_modulate's and gelu_tanh's loops once per vector width (AVX-512, AVX2, baseline
x86-64) and picks the best the CPU has; set_cpu_isa selects another. Every ISA this CPU runs must
return the bits of the best one: the sums keep the same 32 partial sums and the GELU the same ops
per lane whatever the width. Shapes with tails shorter than a vector and rows shorter than a block.
"""
import pytest
import torch

from op_cases import EXT

pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ extension could not be built or loaded")

ISAS = ("base", "avx2", "avx512f")
ROW_SHAPES = [(2, 3, 1), (1, 5, 7), (3, 2, 31), (2, 3, 33), (2, 4, 389), (1, 3, 1157)]
GELU_SHAPES = [(1,), (5, 7), (3, 31), (2, 33), (4, 389), (3, 1541)]


def outputs(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for N, T, D in ROW_SHAPES:
        h, y = torch.randn(N, T, D, generator=g) * 3 + 2, torch.randn(N, T, D, generator=g)
        gate, shift, scale = torch.randn(3, N, D, generator=g)
        out += [EXT.adaln_modulate(h, shift, scale, 1e-6), *EXT.gated_residual_modulate(h, gate, y, shift, scale, 1e-6)]
    for shape in GELU_SHAPES:
        x, b = torch.randn(shape, generator=g) * 4, torch.randn(shape[-1], generator=g)
        out += [EXT.gelu_tanh(x, None), EXT.gelu_tanh(x, b)]
    return out


def supported():
    """The ISAs this CPU runs, best last (the selection is left as it was)."""
    previous = EXT.set_cpu_isa("best")
    best = EXT.cpu_isa()
    EXT.set_cpu_isa(previous)
    return ISAS[:ISAS.index(best) + 1]


def test_every_isa_returns_the_best_ones_bits():
    best = supported()[-1]
    want = outputs(0)
    try:
        for isa in supported():
            EXT.set_cpu_isa(isa)
            assert EXT.cpu_isa() == isa
            for got, ref in zip(outputs(0), want):
                assert torch.equal(got, ref), isa
    finally:
        EXT.set_cpu_isa(best)
    assert EXT.cpu_isa() == best


def test_set_cpu_isa_errors():
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        EXT.set_cpu_isa("sse9")
    unsupported = [isa for isa in ISAS if isa not in supported()]
    for isa in unsupported:
        with pytest.raises(RuntimeError, match=f"does not support {isa}"):
            EXT.set_cpu_isa(isa)
