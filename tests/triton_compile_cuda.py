"""Compile every Triton kernel for a CUDA GPU on a machine without one, through the real launchers.

    python tests/triton_compile_cuda.py [--arch 90] [--fusion-control]   (prints one JSON object)

Triton compiles to PTX and runs ptxas (shipped with triton) without a driver; only loading and
launching need a GPU. This script swaps in a driver that reports a CUDA target, lets each launcher
in kernels/ compile as it would on that card, and stops at the launch. The PTX then shows what no
CPU run can: that the kernels compile (not interpret), that enable_fp_fusion=False leaves no FMA
contraction, and which exp sequence and division the steps use. tests/test_triton_compile.py
runs it in a subprocess (TRITON_INTERPRET must be unset before triton is imported).

--fusion-control compiles the linear step once more with enable_fp_fusion=True, so the FMA check
is shown to detect contraction when it happens.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's dgfast
import dgfast.kernels as kernels  # noqa: E402  (the repo's kernels/, through setup.py's package_dir)
from dgfast.kernels.adaln_modulate import _adaln_modulate_kernel  # noqa: E402
from dgfast.kernels.gated_residual_modulate import _gated_residual_modulate_kernel  # noqa: E402
from dgfast.kernels.gelu_tanh import _gelu_tanh_kernel  # noqa: E402
from dgfast.kernels.guided_step import _guided_step_kernel  # noqa: E402


class Compiled(Exception):
    """Raised where the launch would start: the kernel has compiled to a cubin by then."""


class CompileOnlyDriver:
    """The driver calls a launch makes before the kernel runs, answering for a CUDA card."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    @property
    def launcher_cls(self):  # first touched when the compiled kernel is about to be loaded
        raise Compiled()

    def __getattr__(self, name):
        raise AttributeError(f"compile-only driver has no {name!r} (triton {triton.__version__} asks more "
                             f"of its driver than this harness provides)")


def launch(fn):
    try:
        fn()
    except Compiled:
        return
    raise RuntimeError("the launcher returned without reaching a launch")


def cases():
    """(name, kernel, launcher call): each configuration dgfast's dispatch launches."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        d = str(dtype).split(".")[-1]
        x, ft2, ft, z = r(2, 4, 6, 6, dtype=dtype), r(2, 8, 6, 6, dtype=dtype), r(2, 4, 6, 6, dtype=dtype), \
            r(2, 4, 6, 6, dtype=dtype)

        def step(x=x, ft=ft, pre=ft, z=z, **kw):  # defaults bind this dtype's tensors now
            return lambda: kernels.guided_step(x, ft, pre, z, [0.9, 0.1, 0.5, 0.4, -3.0, -2.0, 1.0], **kw)
        out += [
            (f"guided_step ddpm {d}", _guided_step_kernel, step(ft=ft2, pre=ft2, scale=1.5, k=3, step_mode="ddpm")),
            (f"guided_step ddpm clip {d}", _guided_step_kernel,
             step(ft=ft2, pre=ft2, scale=1.5, k=4, step_mode="ddpm", clip_denoised=True)),
            (f"guided_step ddim {d}", _guided_step_kernel, step(scale=1.5, k=4, step_mode="ddim")),
            (f"guided_step linear {d}", _guided_step_kernel,
             step(scale=1.5, k=4, step_mode="linear", prev=ft, return_state=True)),
            (f"guided_step linear unguided {d}", _guided_step_kernel,
             step(pre=None, z=None, step_mode="linear", return_state=True)),
            (f"guided_step flow_euler {d}", _guided_step_kernel,
             step(z=None, scale=1.5, k=4, step_mode="flow_euler", return_state=True)),
            (f"guided_step flow_heun {d}", _guided_step_kernel,
             step(z=None, scale=1.5, k=3, step_mode="flow_heun", prev=ft)),
        ]
        h, y, mods = r(2, 5, 72, dtype=dtype), r(2, 5, 72, dtype=dtype), r(2, 3 * 72, dtype=dtype).chunk(3, dim=1)
        out += [
            (f"adaln_modulate {d}", _adaln_modulate_kernel, lambda h=h, m=mods: kernels.adaln_modulate(h, m[0], m[1])),
            (f"gated_residual_modulate {d}", _gated_residual_modulate_kernel,
             lambda h=h, y=y, m=mods: kernels.gated_residual_modulate(h, m[0], y, m[1], m[2])),
            (f"gelu_tanh bias {d}", _gelu_tanh_kernel, lambda h=h, b=mods[0][0]: kernels.gelu_tanh(h, b.contiguous())),
            (f"gelu_tanh {d}", _gelu_tanh_kernel, lambda h=h: kernels.gelu_tanh(h)),
        ]
    # The bandwidth benchmark's shape: DiT-XL/2's latents at batch 256 (strides multiples of 16 bytes)
    for dtype in (torch.float32, torch.bfloat16):
        big = [torch.empty(256, c, 64, 64, dtype=dtype) for c in (4, 8, 4)]
        out.append((f"guided_step ddpm (256,4,64,64) {str(dtype).split('.')[-1]}", _guided_step_kernel,
                    lambda b=big: kernels.guided_step(b[0], b[1], b[1], b[2], [1.0] * 7, scale=1.5, k=4)))
    # DiT-XL widths: hidden 1152 (BLOCK_D 2048, 8 warps), MLP 4608 (gelu blocks of 1024)
    hx, mx = r(1, 3, 1152), r(1, 2 * 1152).chunk(2, dim=1)
    out += [("adaln_modulate D=1152 float32", _adaln_modulate_kernel, lambda: kernels.adaln_modulate(hx, *mx)),
            ("gelu_tanh D=4608 float32", _gelu_tanh_kernel, lambda: kernels.gelu_tanh(r(2, 4608), r(4608)))]
    return out


def newest_ptx(kernel, seen):
    """PTX of the variant kernel compiled last (its JIT cache is keyed by specialization)."""
    cache = kernel.device_caches[0][0]
    fresh = [k for k in cache if (id(kernel), k) not in seen]
    if not fresh:  # same specialization as an earlier case: already compiled
        return None
    seen.add((id(kernel), fresh[-1]))
    compiled = cache[fresh[-1]]
    return compiled.asm["ptx"], len(compiled.asm.get("cubin", b""))


FLOAT_OP = re.compile(r"^\s*(fma|ex2|div|rsqrt|sqrt)\.[\w.]+", re.M)


def summarize(ptx):
    ops = [m.group(0).strip() for m in FLOAT_OP.finditer(ptx)]
    return {"fma": sum(o.startswith("fma.") for o in ops),
            "ex2": sum(o.startswith("ex2.") for o in ops),
            "ex2_kinds": sorted({o for o in ops if o.startswith("ex2.")}),
            "div_f32": sorted({o for o in ops if o.startswith("div.") and o.endswith(".f32")}),
            "exp_sequences": exp_sequences(ptx),
            "global_access": sorted(set(re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx))),
            "global_access_counts": dict(Counter(re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx)))}


SKIP = re.compile(r"^\s*(\.loc|\$L__|//|mov\.\w+\s+%\w+,\s*0f)")  # debug lines, labels, immediates


def exp_sequences(ptx):
    """Each expf in the PTX as (opcodes, hex float immediates), from the fma before its cvt.sat to its ex2.

    The CUDA math library's expf (what torch's exp kernel runs) is a fixed sequence: fma (scale and
    round), cvt.sat, fma.rm, add, two fma with log2(e) split in two, ex2.approx.ftz; its opcodes
    and constants identify it. The immediates loaded by the mov lines just above the first fma count.
    """
    lines = ptx.splitlines()
    seqs = []
    for i, line in enumerate(lines):
        if "ex2.approx" not in line:
            continue
        sat = max((j for j in range(i) if "cvt.sat.f32.f32" in lines[j]), default=None)
        first = max((j for j in range(sat or 0) if re.match(r"^\s*fma\.", lines[j])), default=None)
        if sat is None or first is None:
            seqs.append({"ops": [], "constants": []})
            continue
        start = first
        while start > 0 and SKIP.match(lines[start - 1]):  # the immediates the first fma reads
            start -= 1
        window = [l.strip() for l in lines[start:i + 1] if not re.match(r"^\s*(\.loc|\$L__|//)", l)]
        seqs.append({"ops": [re.sub(r"\.rn(?=\.)", "", l.split()[0]) for l in window
                             if re.match(r"(fma|cvt\.sat|ex2|add|sub|mul)\.", l)],
                     "constants": re.findall(r"0f([0-9A-F]{8})", "\n".join(window))})
    return seqs


NVCC_EXPF = ('extern "C" __global__ void expf_kernel(const float* a, float* o) '
             '{ o[threadIdx.x] = expf(a[threadIdx.x]); }\n')


def nvcc_expf(nvcc, arch):
    """exp_sequences of expf as nvcc compiles it (the CUDA math library, as in torch's exp kernel)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src, ptx = os.path.join(tmp, "expf.cu"), os.path.join(tmp, "expf.ptx")
        with open(src, "w") as f:
            f.write(NVCC_EXPF)
        subprocess.run([nvcc, f"-arch=sm_{arch}", "--ptx", src, "-o", ptx], check=True, capture_output=True)
        with open(ptx) as f:
            return exp_sequences(f.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--fusion-control", action="store_true")
    ap.add_argument("--nvcc", help="path of nvcc: also report expf as the CUDA math library compiles it")
    args = ap.parse_args()
    driver.set_active(CompileOnlyDriver(args.arch))

    report = {"triton": triton.__version__, "arch": args.arch, "kernels": {}}
    seen = set()
    for name, kernel, call in cases():
        launch(call)
        got = newest_ptx(kernel, seen)
        if got is not None:
            ptx, cubin_bytes = got
            report["kernels"][name] = dict(summarize(ptx), cubin_bytes=cubin_bytes)
    if args.fusion_control:
        x = torch.randn(2, 4, 6, 6)
        launch(lambda: _guided_step_kernel[(8, 1)](
            x, x, x, x, x, x, x, 4, 36, 4, *([0] * 14), torch.full((7,), 0.5), 1.5,
            MODE=2, HAS_PRE=True, CLIP=False, HAS_NOISE=True, HAS_PREV=True, WRITE_STATE=True, BLOCK=64,
            num_warps=4, enable_fp_fusion=True))
        ptx, cubin_bytes = newest_ptx(_guided_step_kernel, seen)
        report["fusion_control"] = dict(summarize(ptx), cubin_bytes=cubin_bytes)
    if args.nvcc:
        report["nvcc_expf"] = nvcc_expf(args.nvcc, args.arch)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
