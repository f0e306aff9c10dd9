"""torch.compile composes with dgfast: the fused ops are custom ops (torch.ops.dgfast.<op>), so a
dgfast DiT forward and a guided step each trace into one graph (0 graph breaks: torch._dynamo.explain,
which only traces), one compiled step serves every step of a schedule (the coefficient row is a
tensor input, not a constant), and a compiled run (inductor, CPU) matches eager, with the C++ kernels
still running inside the compiled graph. On CUDA the ops trace into their Triton kernels: run on a GPU
(marked cuda), and dry-run here on fake CUDA tensors (tests/triton_trace_cuda.py).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch._functorch.config
import torch._inductor.config

from dgfast import ops
from dgfast.models import DiT
from dgfast.schedule import Schedule

DDPM = Schedule.from_steps("50").ddpm_coefs()
LINEAR = np.array([1.3, 0.7, 0.9, 0.4, -0.2, 0.25, 0.3], np.float32)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_dit(**kw):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def dit_inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([1, 500, 999][:n]), torch.tensor([0, 3, 10][:n])


def step_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, 8, 8, generator=g),
            torch.randn(3, 8, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g))


def dgfast_ops_in(graphs):
    return {n.target._opname for g in graphs for n in g.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "dgfast"}


def assert_one_graph(explained):
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_dit_forward_traces_as_one_graph():
    with torch.no_grad():
        explained = torch._dynamo.explain(tiny_dit())(*dit_inputs())
    assert_one_graph(explained)
    assert dgfast_ops_in(explained.graphs) == {"adaln_modulate", "gated_residual_modulate", "gelu_tanh"}


def test_compiled_dit_forward_is_traced_once():
    """Later calls (new inputs, the timestep frequencies already cached) reuse the first graph."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_dit()
    compiled = torch.compile(model, backend=count, fullgraph=True)
    with torch.no_grad():
        for seed in (0, 1, 2):
            x, t, y = dit_inputs(seed=seed)
            assert torch.equal(compiled(x, t, y), model(x, t, y))
    assert len(graphs) == 1


def test_dit_forward_with_the_torch_backend_traces_without_dgfast_ops():
    with torch.no_grad():
        explained = torch._dynamo.explain(tiny_dit().set_backend("torch"))(*dit_inputs())
    assert_one_graph(explained)
    assert dgfast_ops_in(explained.graphs) == set()


def ddpm(x, ft, pre, z, row):
    return ops.guided_step(x, ft, pre, z, row, scale=1.5, guidance_channels=3)


def ddim(x, ft, pre, z, row):
    return ops.guided_step(x, ft[:, :4], pre, z, row, scale=1.5, guidance_channels=3, step_mode="ddim",
                           clip_denoised=True)


def linear_multistep(x, ft, pre, z, row):
    """Two DPM-Solver++(2M)-like steps: the first returns its x0, the second reads it as prev."""
    x1, x0 = ops.guided_step(x, ft, pre, z, row, scale=1.5, guidance_channels=4, step_mode="linear", return_state=True)
    return ops.guided_step(x1, ft, pre, None, row, scale=1.5, guidance_channels=4, step_mode="linear", prev=x0)


def heun(x, ft, pre, z, row):
    x1, d = ops.guided_step(x, ft, pre, None, row[:1], scale=1.5, guidance_channels=3, step_mode="flow_euler",
                            return_state=True)
    return ops.guided_step(x1, ft, pre, None, row[:1] * 0.5, scale=1.5, guidance_channels=3, step_mode="flow_heun",
                           prev=d)


STEPS = [(ddpm, DDPM[20]), (ddim, Schedule.from_steps("ddim50").ddim_coefs(1.0)[20]), (linear_multistep, LINEAR),
         (heun, LINEAR)]


@pytest.mark.parametrize("step,row", STEPS, ids=[s.__name__ for s, _ in STEPS])
def test_guided_step_traces_as_one_graph(step, row):
    explained = torch._dynamo.explain(step)(*step_inputs(), torch.from_numpy(row))
    assert_one_graph(explained)
    assert dgfast_ops_in(explained.graphs) <= {"guided_step", "guided_step_with_state"}
    assert dgfast_ops_in(explained.graphs)


@pytest.mark.parametrize("step,row", STEPS, ids=[s.__name__ for s, _ in STEPS])
def test_one_compiled_step_serves_every_step(step, row):
    """Rows of a schedule are tensor inputs: new values reuse the graph, and the graph runs the same
    op (bit-equal to eager)."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, backend=count, fullgraph=True)
    inputs = step_inputs()
    for j in (3, 17, 40):
        r = torch.from_numpy(DDPM[j] if step is ddpm else row * (1 + j / 100))
        assert torch.equal(compiled(*inputs, r), step(*inputs, r)), j
    assert len(graphs) == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor's CPU code needs a C++ compiler")
@torch._inductor.config.patch(fx_graph_cache=False)  # compile now: a cached graph would hide how the
@torch._functorch.config.patch(enable_autograd_cache=False)  # ops trace today (the key ignores dgfast's code)
def test_compiled_forward_and_step_match_eager():
    """inductor on CPU (compiles C++ for the rest of the graph; the dgfast ops stay calls of the C++
    kernels): the forward within 1e-5 of eager, the step bit-equal on the same inputs."""
    model = tiny_dit()
    x, t, y = dit_inputs()
    step_args = step_inputs()
    row = torch.from_numpy(DDPM[20])
    forward = torch.compile(model, fullgraph=True)
    step = torch.compile(ddpm, fullgraph=True)
    with torch.no_grad():
        want = model(x, t, y)
        with torch.profiler.profile() as prof:
            got = forward(x, t, y)
            got_step = step(*step_args, row)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_step, ddpm(*step_args, row))
    ran = {e.name for e in prof.events()}
    assert {"dgfast::adaln_modulate", "dgfast::gated_residual_modulate", "dgfast::gelu_tanh",
            "dgfast::guided_step"} <= ran, sorted(n for n in ran if "dgfast" in n)


def _triton_has_nvidia_backend():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _triton_has_nvidia_backend(), reason="needs triton with its nvidia backend (compiles, no GPU)")
def test_compile_traces_into_the_triton_kernels_on_cuda_and_keeps_the_op_on_cpu():
    """A dry run of the CUDA path without a GPU (tests/triton_trace_cuda.py): torch.compile's tracing
    on fake CUDA tensors turns every op into its Triton kernel, on CPU tensors it keeps the op."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_trace_cuda.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout)
    kernels = {"ddpm": 1, "linear_multistep": 2, "heun": 2, "block": 3}
    ops_on_cpu = {"ddpm": ["dgfast.guided_step.default"],
                  "linear_multistep": ["dgfast.guided_step.default", "dgfast.guided_step_with_state.default"],
                  "heun": ["dgfast.guided_step.default", "dgfast.guided_step_with_state.default"],
                  "block": ["dgfast.adaln_modulate.default", "dgfast.gated_residual_modulate.default",
                            "dgfast.gelu_tanh.default"]}
    for case, n in kernels.items():
        assert report[f"{case} cuda"] == {"dgfast": [], "triton_kernels": n}, case
        assert report[f"{case} cpu"] == {"dgfast": ops_on_cpu[case], "triton_kernels": 0}, case


@pytest.mark.cuda
def test_cuda_compiled_step_traces_into_the_triton_kernel():
    """On CUDA the op's functional form is the Triton kernel itself: inductor's code launches it."""
    from torch._inductor.utils import run_and_get_code
    args = tuple(t.cuda() for t in step_inputs()) + (torch.from_numpy(DDPM[20]).cuda(),)
    got, code = run_and_get_code(torch.compile(ddpm, fullgraph=True), *args)
    assert "_guided_step_kernel" in "\n".join(code)
    torch.testing.assert_close(got, ddpm(*args), rtol=1e-5, atol=1e-5)
    model = tiny_dit().cuda()
    x, t, y = (v.cuda() for v in dit_inputs())
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), x, t, y)
        torch.testing.assert_close(got, model(x, t, y), rtol=1e-5, atol=1e-5)
    for kernel in ("_adaln_modulate_kernel", "_gated_residual_modulate_kernel", "_gelu_tanh_kernel"):
        assert kernel in "\n".join(code)
