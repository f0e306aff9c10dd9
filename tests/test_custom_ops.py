"""torch.ops.dgfast.<op>: the custom ops of dgfast.ops, and what backend= / DGFAST_BACKEND select.

Every op passes torch.library.opcheck (schema, no aliasing, the fake implementation against the
real one, AOT tracing) on the shape tables of tests/op_cases.py, strided inputs and every step mode,
and equals its torch twin: bit for bit where the C++ kernel is (guided_step, the residual of
gated_residual_modulate), within the per-op tests' tolerances otherwise (LayerNorm 1e-5, GELU 1e-6;
tests/test_op_<op>.py). Float32 CPU inputs run the C++ kernel, other dtypes the twin.
backend="torch" runs no dgfast op; DGFAST_BACKEND replaces "auto" only and an error it causes names it.
CUDA tests (marked cuda) check the Triton implementation the same way.
"""
import numpy as np
import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from dgfast import ops
from dgfast.models import DiT
from op_cases import (DDIM, DDPM, EXT, ROW_CASES, ROWS, STEP_CASES, STEP_LAYOUTS, STEP_VARIANTS, assert_bits,
                      assert_gelu_close, gelu_inputs, gen, row_inputs, step_inputs)

OPS = ("guided_step", "guided_step_with_state", "adaln_modulate", "gated_residual_modulate", "gelu_tanh")
HAS_CPP = EXT is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension could not be built or loaded")


def step_args(variant, shape, layout, k, seed=0, dtype=torch.float32):
    """The op's schema arguments (x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip)."""
    mode, reads_prev, takes_noise, _ = variant
    x, ft, pre, z, prev = step_inputs(shape, layout, dtype=dtype, seed=seed)
    return (x, ft, pre if k else None, z if takes_noise else None, prev if reads_prev else None,
            torch.as_tensor(ROWS[mode]), 1.37, k, mode, mode == "linear" and k == shape[1])


def step_cases():
    """Each variant in each layout (the table's shapes for it, alternating), with k changing along."""
    cases = []
    for v, variant in enumerate(STEP_VARIANTS):
        for j, layout in enumerate(STEP_LAYOUTS):
            shape = [s for s, lay in STEP_CASES if lay == layout][v % 2]
            k = (shape[1], shape[1] - 1, 0)[(v + 2 * j) % 3]
            name = f"{variant[0]}-{'prev' * variant[1]}{'noise' * variant[2]}{'state' * variant[3]}"
            dims = "x".join(map(str, shape))
            cases.append(pytest.param(variant, shape, layout, k, id=f"{name}-{layout}-{dims}-k{k}"))
    return cases


def step_op(variant):
    return torch.ops.dgfast.guided_step_with_state.default if variant[3] else torch.ops.dgfast.guided_step.default


def row_cases():
    """Every third row case of the table: each layout, most shapes."""
    return [pytest.param(shape, layout, id=f"{layout}-{'x'.join(map(str, shape))}") for shape, layout in ROW_CASES[::3]]


def row_args(shape, layout, seed=0, dtype=torch.float32):
    return row_inputs(shape, layout, dtype=dtype, seed=seed)


GELU_CASES = [((3, 5, 7), True, "plain"), ((1,), False, "plain"), ((65, 33), True, "strided"),
              ((4, 97), False, "transposed"), ((2, 1, 1536), True, "plain")]


def gelu_args(shape, bias, layout, seed=0, dtype=torch.float32):
    return gelu_inputs(shape, bias, dtype=dtype, seed=seed, layout=layout)


# ----------------------------------------------------------------------------------------------
# Registration and opcheck
# ----------------------------------------------------------------------------------------------

def test_every_fused_op_is_registered_under_dgfast():
    for name in OPS:
        op = getattr(torch.ops.dgfast, name).default
        assert op.namespace == "dgfast" and op._schema.name == f"dgfast::{name}"
        assert not op._schema.is_mutable  # functional: outputs are new tensors
    in_place = torch.ops.dgfast.gelu_tanh_.default  # the one in-place op: it says so in its schema
    assert in_place._schema.is_mutable and [a.alias_info.is_write for a in in_place._schema.arguments
                                            if a.alias_info is not None] == [True]


def test_guided_step_schema_names_the_guiding_output_and_the_step_mode():
    """The schema's names are the package's: out_guide (the guiding branch) and step_mode (ddpm, ddim, ...)."""
    for name in ("guided_step", "guided_step_with_state"):
        names = [a.name for a in getattr(torch.ops.dgfast, name).default._schema.arguments]
        assert names == ["x", "out_ft", "out_guide", "noise", "prev", "coefs", "scale", "k", "step_mode",
                         "clip_denoised"]


@pytest.mark.parametrize("variant,shape,layout,k", step_cases())
def test_guided_step_opcheck(variant, shape, layout, k):
    opcheck(step_op(variant), step_args(variant, shape, layout, k))


@pytest.mark.parametrize("shape,layout", row_cases())
def test_row_ops_opcheck(shape, layout):
    h, y, gate, shift, scale = row_args(shape, layout)
    opcheck(torch.ops.dgfast.adaln_modulate.default, (h, shift, scale, 1e-6))
    opcheck(torch.ops.dgfast.gated_residual_modulate.default, (h, gate, y, shift, scale, 1e-5))


@pytest.mark.parametrize("shape,bias,layout", GELU_CASES)
def test_gelu_tanh_opcheck(shape, bias, layout):
    opcheck(torch.ops.dgfast.gelu_tanh.default, gelu_args(shape, bias, layout))
    x, b = gelu_args(shape, bias, layout)
    opcheck(torch.ops.dgfast.gelu_tanh_.default, (x.contiguous(), b))  # in place: x must be contiguous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_opcheck_on_the_twin_path(dtype):
    """Inputs the C++ kernels do not take run the twin inside the op: same promises (fresh, contiguous)."""
    opcheck(step_op(STEP_VARIANTS[2]), step_args(STEP_VARIANTS[2], (2, 3, 5, 4), "strided", 2, dtype=dtype))
    h, y, gate, shift, scale = row_args((2, 3, 7), "transposed", dtype=dtype)
    opcheck(torch.ops.dgfast.gated_residual_modulate.default, (h, gate, y, shift, scale, 1e-6))
    opcheck(torch.ops.dgfast.gelu_tanh.default, gelu_args((4, 97), True, "transposed", dtype=dtype))


# ----------------------------------------------------------------------------------------------
# The ops against their twins, and which implementation runs
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """spy(backend, name) -> list that grows by one per call of that implementation of op `name`."""
    def watch(backend, name):
        calls, impl = [], ops._IMPLS[backend][name]

        def counted(*args, **kwargs):
            calls.append(name)
            return impl(*args, **kwargs)
        monkeypatch.setitem(ops._IMPLS[backend], name, counted)
        return calls
    return watch


def twin_step(args, variant):
    x, ft, pre, z, prev, coefs, scale, k, mode, clip = args
    if mode in ops.DIT_MODES and z is None:
        z = torch.zeros_like(x)
    return ops.guided_step_torch(x, ft, pre, z, coefs.tolist(), scale=scale, guidance_channels=k, step_mode=mode,
                                 clip_denoised=clip, prev=prev, return_state=variant[3])


@needs_cpp
@pytest.mark.parametrize("variant,shape,layout,k", step_cases())
def test_guided_step_op_is_the_cpp_kernel_and_bit_equal_to_the_twin(variant, shape, layout, k, spy):
    args = step_args(variant, shape, layout, k, seed=7)
    calls = spy("cpp", step_op(variant)._opname)
    got = step_op(variant)(*args)
    assert calls, "float32 CPU inputs must run the C++ kernel"
    want = twin_step(args, variant)
    for g, w in zip(got if variant[3] else [got], want if variant[3] else [want]):
        assert g.is_contiguous() and bool(torch.isfinite(g).all())
        assert_bits(g, w)


@needs_cpp
@pytest.mark.parametrize("shape,layout", row_cases())
def test_row_ops_op_is_the_cpp_kernel_and_matches_the_twin(shape, layout, spy):
    h, y, gate, shift, scale = row_args(shape, layout, seed=3)
    adaln_calls, gated_calls = spy("cpp", "adaln_modulate"), spy("cpp", "gated_residual_modulate")
    out = torch.ops.dgfast.adaln_modulate(h, shift, scale, 1e-6)
    h_new, out2 = torch.ops.dgfast.gated_residual_modulate(h, gate, y, shift, scale, 1e-6)
    assert adaln_calls and gated_calls, "float32 CPU inputs must run the C++ kernels"
    torch.testing.assert_close(out, ops.adaln_modulate_torch(h, shift, scale), rtol=1e-5, atol=1e-5)
    ref_h, ref = ops.gated_residual_modulate_torch(h, gate, y, shift, scale)
    assert_bits(h_new, ref_h)  # h + gate*y: the same two roundings as torch
    torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)
    assert all(t.is_contiguous() for t in (out, h_new, out2))


@needs_cpp
@pytest.mark.parametrize("shape,bias,layout", GELU_CASES)
def test_gelu_tanh_op_is_the_cpp_kernel_and_matches_the_twin(shape, bias, layout, spy):
    x, b = gelu_args(shape, bias, layout, seed=5)
    calls = spy("cpp", "gelu_tanh")
    got = torch.ops.dgfast.gelu_tanh(x, b)
    assert calls and got.is_contiguous()
    assert_gelu_close(got, ops.gelu_tanh_torch(x, b), x if b is None else x + b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_cpu_dtypes_run_the_twin(dtype, spy):
    """The C++ kernels are float32 only: other CPU dtypes get the twin's bits, in their own dtype."""
    cpp_calls = [spy("cpp", name) for name in OPS]
    variant = STEP_VARIANTS[0]
    args = step_args(variant, (2, 4, 5, 3), "strided", 3, dtype=dtype)
    assert_bits(torch.ops.dgfast.guided_step(*args), twin_step(args, variant).contiguous())
    h, y, gate, shift, scale = row_args((2, 3, 7), "transposed", dtype=dtype)
    assert_bits(torch.ops.dgfast.adaln_modulate(h, shift, scale, 1e-6), ops.adaln_modulate_torch(h, shift, scale))
    for got, want in zip(torch.ops.dgfast.gated_residual_modulate(h, gate, y, shift, scale, 1e-6),
                         ops.gated_residual_modulate_torch(h, gate, y, shift, scale)):
        assert_bits(got, want.contiguous())
    x, b = gelu_args((4, 97), True, "transposed", dtype=dtype)
    assert_bits(torch.ops.dgfast.gelu_tanh(x, b), ops.gelu_tanh_torch(x, b).contiguous())
    x = x.contiguous()
    assert_bits(ops.gelu_tanh_(x.clone(), b), ops.gelu_tanh_torch(x, b))
    assert not any(cpp_calls) and not spy("cpp", "gelu_tanh_")


@needs_cpp
def test_mixed_dtypes_run_the_twin_and_return_the_first_inputs_dtype():
    x, ft, pre, z, _ = step_inputs((2, 4, 3, 3), "contiguous")
    out = torch.ops.dgfast.guided_step(x, ft.double(), pre, z, None, torch.as_tensor(DDPM[9]), 1.5, 3, "ddpm", False)
    want = ops.guided_step_torch(x, ft.double(), pre, z, DDPM[9], scale=1.5, guidance_channels=3)
    assert out.dtype == torch.float32 and torch.equal(out, want.float())


def test_outputs_never_alias_inputs():
    """Unguided flow_euler's state is the model's eps: the op hands out a copy (the twin clones it)."""
    x, ft, _, _, _ = step_inputs((2, 4, 3, 3), "contiguous")
    for backend in ("auto", "torch"):
        out, d = ops.guided_step(x, ft, None, None, (0.5,), step_mode="flow_euler", return_state=True, backend=backend)
        assert d.untyped_storage().data_ptr() != ft.untyped_storage().data_ptr()
        assert torch.equal(d, ft[:, :4])


def test_dit_modes_without_noise_read_zeros():
    """A DiT step with no draw (the last step's noise is multiplied by 0 anyway) reads zeros, called
    through the public op or the custom op directly."""
    x, ft, pre, _, _ = step_inputs((2, 4, 3, 3), "contiguous")
    zeros = torch.zeros_like(x)
    for mode, row in (("ddpm", DDPM[0]), ("ddim", DDIM[1.0][0])):
        want = ops.guided_step_torch(x, ft, pre, zeros, row, scale=2.0, guidance_channels=3, step_mode=mode)
        assert torch.equal(ops.guided_step(x, ft, pre, None, row, scale=2.0, guidance_channels=3, step_mode=mode), want)
        got = torch.ops.dgfast.guided_step(x, ft, pre, None, None, torch.as_tensor(row), 2.0, 3, mode, False)
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_coefficient_rows(backend):
    """A row may be a numpy row, a list, a tuple or a tensor: the same float32 values, the same step.
    Too short or too long a row is an error naming coefs; so is prev for a mode that reads none."""
    x, ft, pre, z, prev = step_inputs((2, 4, 3, 3), "strided")
    row = DDPM[50]
    want = ops.guided_step(x, ft, pre, z, row, scale=1.5, guidance_channels=3, backend=backend)
    for same in (row.tolist(), tuple(row.tolist()), torch.from_numpy(row), torch.from_numpy(row).double()):
        assert torch.equal(ops.guided_step(x, ft, pre, z, same, scale=1.5, guidance_channels=3, backend=backend), want)
    for bad in (row[:6], np.append(row, 0.0), row[None], []):
        with pytest.raises(ValueError, match="coefs"):
            ops.guided_step(x, ft, pre, z, bad, scale=1.5, guidance_channels=3, backend=backend)
    with pytest.raises(ValueError, match="prev"):
        ops.guided_step(x, ft, pre, z, row, scale=1.5, guidance_channels=3, prev=prev, backend=backend)
    ops.guided_step(x, ft, pre, None, (0.5,), step_mode="flow_heun", prev=prev, backend=backend)  # h alone is a row


# ----------------------------------------------------------------------------------------------
# backend= and DGFAST_BACKEND
# ----------------------------------------------------------------------------------------------

class DgfastOps(TorchDispatchMode):
    """Records the dgfast:: ops that run under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dgfast":
            self.seen.append(func._opname)
        return func(*args, **(kwargs or {}))


def tiny_dit():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def forward_and_every_step(model, backend):
    """One DiT forward and one guided step of each mode, with `backend`."""
    x = torch.randn(2, 4, 8, 8, generator=gen(1))
    with torch.no_grad():
        out = model(x, torch.tensor([3, 700]), torch.tensor([1, 10]))
        for mode, reads_prev, takes_noise, state in STEP_VARIANTS:
            ops.guided_step(x, out, out, torch.randn_like(x) if takes_noise else None, ROWS[mode], scale=2.0,
                            guidance_channels=3, step_mode=mode, prev=x if reads_prev else None, return_state=state,
                            backend=backend)


def dgfast_ops_run(model, backend):
    with DgfastOps() as mode:
        forward_and_every_step(model, backend)
    return mode.seen


def test_backend_torch_runs_no_dgfast_op(monkeypatch):
    model = tiny_dit()
    assert {"adaln_modulate", "gated_residual_modulate", "gelu_tanh", "guided_step",
            "guided_step_with_state"} <= set(dgfast_ops_run(model, "auto"))  # what the check below would see
    assert dgfast_ops_run(model.set_backend("torch"), "torch") == []
    monkeypatch.setenv("DGFAST_BACKEND", "triton")  # an explicit argument wins over the variable
    assert dgfast_ops_run(model, "torch") == []
    monkeypatch.setenv("DGFAST_BACKEND", "torch")  # the variable replaces "auto"
    assert dgfast_ops_run(model.set_backend("auto"), "auto") == []


def test_explicit_backend_wins_over_the_variable(monkeypatch, spy):
    x, ft, pre, z, _ = step_inputs((2, 4, 3, 3), "contiguous")
    twin_calls = spy("torch", "guided_step")
    monkeypatch.setenv("DGFAST_BACKEND", "no-such-backend")  # never read for an explicit choice
    want = ops.guided_step_torch(x, ft, pre, z, DDPM[4], scale=1.5, guidance_channels=3)
    assert torch.equal(ops.guided_step(x, ft, pre, z, DDPM[4], scale=1.5, guidance_channels=3, backend="torch"), want)
    assert twin_calls
    if HAS_CPP:
        cpp_calls = spy("cpp", "adaln_modulate")
        h, _, _, shift, scale = row_args((2, 3, 7), "plain")
        monkeypatch.setenv("DGFAST_BACKEND", "torch")
        ops.adaln_modulate(h, shift, scale, backend="cpp")
        assert cpp_calls


def test_errors_caused_by_the_variable_name_it(monkeypatch):
    h, _, _, shift, scale = row_args((2, 3, 7), "plain")
    monkeypatch.setenv("DGFAST_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="DGFAST_BACKEND must be one of"):
        ops.adaln_modulate(h, shift, scale)
    monkeypatch.setenv("DGFAST_BACKEND", "cpp")
    meta = [t.to("meta") for t in (h, shift, scale)]
    with pytest.raises(ValueError, match="DGFAST_BACKEND=cpp runs CPU tensors only"):
        ops.adaln_modulate(*meta)
    ops.adaln_modulate(*meta, backend="torch")  # the twin runs anywhere
    monkeypatch.setenv("DGFAST_BACKEND", "triton")
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="DGFAST_BACKEND=triton needs CUDA tensors"):
        ops.gelu_tanh(h)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        ops.gelu_tanh(h, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gelu_tanh(h, backend="fast")


def test_a_step_mode_a_forced_backend_lacks_is_an_error_naming_the_choice(monkeypatch):
    x, ft, _, _, prev = step_inputs((2, 4, 3, 3), "contiguous")
    monkeypatch.setattr(ops, "backend_modes", lambda which: ops.DIT_MODES)  # an older build
    monkeypatch.setenv("DGFAST_BACKEND", "cpp" if HAS_CPP else "triton")
    with pytest.raises(ValueError, match="DGFAST_BACKEND=(cpp|triton) does not implement step_mode 'linear'"):
        ops.guided_step(x, ft, None, None, ROWS["linear"], step_mode="linear", prev=prev)
    ops.guided_step(x, ft, None, None, ROWS["linear"], step_mode="linear", prev=prev, backend="torch")


def test_empty_variable_means_auto(monkeypatch):
    monkeypatch.setenv("DGFAST_BACKEND", "")
    h, _, _, shift, scale = row_args((2, 3, 7), "plain")
    with DgfastOps() as mode:
        ops.adaln_modulate(h, shift, scale)
    assert mode.seen == ["adaln_modulate"]


# ----------------------------------------------------------------------------------------------
# CUDA: the Triton implementation behind the same ops
# ----------------------------------------------------------------------------------------------

def to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.cuda
@pytest.mark.parametrize("variant,shape,layout,k", step_cases())
def test_cuda_guided_step_op(variant, shape, layout, k, spy):
    """The Triton kernel behind the op, bit-equal to the twin (libdevice exp, no FMA contraction)."""
    args = to_cuda(step_args(variant, shape, layout, k, seed=7))
    opcheck(step_op(variant), args)
    got = step_op(variant)(*args)
    want = twin_step(args, variant)
    for g, w in zip(got if variant[3] else [got], want if variant[3] else [want]):
        assert g.is_cuda and g.is_contiguous()
        assert_bits(g, w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_ops(dtype):
    h, y, gate, shift, scale = to_cuda(row_args((2, 5, 72), "transposed", dtype=dtype))
    x, b = to_cuda(gelu_args((3, 1536), True, "plain", dtype=dtype))
    for op, args in ((torch.ops.dgfast.adaln_modulate.default, (h, shift, scale, 1e-6)),
                     (torch.ops.dgfast.gated_residual_modulate.default, (h, gate, y, shift, scale, 1e-6)),
                     (torch.ops.dgfast.gelu_tanh.default, (x, b))):
        opcheck(op, args)
    kernels = ops.triton_kernels()
    assert_bits(torch.ops.dgfast.adaln_modulate(h, shift, scale, 1e-6), kernels.adaln_modulate(h, shift, scale))
    for got, want in zip(torch.ops.dgfast.gated_residual_modulate(h, gate, y, shift, scale, 1e-6),
                         kernels.gated_residual_modulate(h, gate, y, shift, scale)):
        assert_bits(got, want)
    assert_bits(torch.ops.dgfast.gelu_tanh(x, b), kernels.gelu_tanh(x, b))
