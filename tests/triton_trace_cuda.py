"""Trace dgfast's custom ops as torch.compile does (AOT autograd's functionalization) on fake CUDA
tensors, on a machine without a GPU, and report what the traced graphs call (one JSON object).

    python tests/triton_trace_cuda.py

On CUDA each op must decompose into its Triton kernel (a triton_kernel_wrapper_functional node that
inductor compiles); on CPU it must stay one dgfast op (the C++ kernel runs in the compiled graph).
Fake tensors carry no data, so nothing runs; Triton still compiles each kernel to TTIR for the
mutation analysis, through tests/triton_compile_cuda.py's compile-only driver.
tests/test_compile.py runs this in a subprocess (TRITON_INTERPRET must be unset before triton loads).
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT kernels, not interpreted ones

import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime import driver  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from triton_compile_cuda import CompileOnlyDriver  # noqa: E402

from dgfast import ops  # noqa: E402


def ddpm(x, ft, pre, z, c, c1, h, y, m, b):
    return ops.guided_step(x, ft, pre, z, c, scale=1.5, guidance_channels=3)


def linear_multistep(x, ft, pre, z, c, c1, h, y, m, b):
    x1, x0 = ops.guided_step(x, ft, pre, z, c, scale=1.5, guidance_channels=4, step_mode="linear", return_state=True)
    return ops.guided_step(x1, ft, pre, None, c, scale=1.5, guidance_channels=4, step_mode="linear", prev=x0)


def heun(x, ft, pre, z, c, c1, h, y, m, b):
    x1, d = ops.guided_step(x, ft, pre, None, c1, scale=1.5, guidance_channels=3, step_mode="flow_euler",
                            return_state=True)
    return ops.guided_step(x1, ft, pre, None, c1, scale=1.5, guidance_channels=3, step_mode="flow_heun", prev=d)


def block(x, ft, pre, z, c, c1, h, y, m, b):
    h_new, xm = ops.gated_residual_modulate(h, m[2], y, m[0], m[1])
    return ops.adaln_modulate(h_new, m[0], m[1]) + ops.gelu_tanh(xm, b)


def calls(fn, mode, device):
    """The dgfast ops and Triton kernel nodes in fn's forward graph, traced on fake `device` tensors."""
    with mode:
        def r(*shape):
            return torch.randn(*shape, device=device)
        args = (r(2, 4, 5, 7), r(2, 8, 5, 7), r(2, 8, 5, 7), r(2, 4, 5, 7), r(7), r(1), r(2, 3, 72), r(2, 3, 72),
                [r(2, 72) for _ in range(3)], r(72))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    with mode:
        aot_function(fn, fw_compiler=capture)(*args)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    return {"dgfast": sorted(t for t in targets if t.startswith("dgfast.")),
            "triton_kernels": sum("triton_kernel_wrapper" in t for t in targets)}


def main():
    driver.set_active(CompileOnlyDriver(90))
    report = {}
    for fn in (ddpm, linear_multistep, heun, block):
        for device in ("cuda", "cpu"):
            report[f"{fn.__name__} {device}"] = calls(fn, FakeTensorMode(allow_non_fake_inputs=True), device)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
