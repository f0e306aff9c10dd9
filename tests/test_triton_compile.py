"""The Triton kernels compiled for A100, H100/H200 and B200 (sm_80/90/100), on a machine without a GPU.

Everything else here runs the kernels under the interpreter, which checks the arithmetic as
numpy does it, not what the GPU compiler makes of it. tests/triton_compile_cuda.py compiles each
launcher configuration to a cubin and reads the PTX: these tests check what bit-equality with
torch's op-by-op CUDA kernels depends on:
- no FMA contraction (enable_fp_fusion=False): every FMA left is inside an expf;
- exp is the CUDA math library's expf (what torch's exp kernel calls): same instructions and
  constants as nvcc's expf, ex2.approx.ftz included (that is how expf is written, not flush mode);
- the one true division of the DDIM step and of gelu_tanh is correctly rounded (div.rn).
Running them, and comparing with torch on the card, is `make gpu-check`'s part.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HARNESS = os.path.join(os.path.dirname(__file__), "triton_compile_cuda.py")
# expf in the CUDA math library (CUDA 12 and 13): x*log2(e)/2^-? rounding, 2^n build, log2(e) split
EXPF_CONSTANTS = ["3F000000", "3BBB989D", "4B400001", "437C0000", "CB40007F", "3FB8AA3B", "32A57060"]
EXPF_OPS = ["fma.f32", "cvt.sat.f32.f32", "fma.rm.f32", "add.f32", "fma.f32", "fma.f32", "ex2.approx.ftz.f32"]


def _nvidia_backend():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return cand if cand and os.path.isfile(cand) else shutil.which("nvcc")


@pytest.fixture(scope="module", params=[80, 90, 100], ids=["sm_80 A100", "sm_90 H100-H200", "sm_100 B200"])
def report(request, tmp_path_factory):
    if not _nvidia_backend():
        pytest.skip(f"triton {triton.__version__} has no nvidia backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile, don't reuse
    cmd = [sys.executable, HARNESS, "--arch", str(request.param), "--fusion-control"]
    if _nvcc():
        cmd += ["--nvcc", _nvcc()]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"compiling the kernels for sm_{request.param} failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout)


def test_every_kernel_configuration_compiles_to_a_cubin(report):
    names = list(report["kernels"])
    for op in ("guided_step", "adaln_modulate", "gated_residual_modulate", "gelu_tanh"):
        for dtype in ("float32", "bfloat16", "float16"):
            assert any(n.startswith(op) and n.endswith(dtype) for n in names), (op, dtype)
    for mode in ("ddpm", "ddim", "linear", "flow_euler", "flow_heun"):
        assert f"guided_step {mode} float32" in names
    assert len(names) == 37, names  # a case that compiled to an already-seen variant would drop out
    for name, k in report["kernels"].items():
        assert k["cubin_bytes"] > 0, name


def test_step_at_the_bandwidth_shape_moves_128_bit_vectors(report):
    # Copy-like bandwidth needs every load and store of the planes 16 bytes wide (v4 of 32 bits); the
    # only other accesses are the step's 7 coefficient loads (scalar, once per program, from cache).
    for dtype in ("float32", "bfloat16"):
        k = report["kernels"][f"guided_step ddpm (256,4,64,64) {dtype}"]
        counts = k["global_access_counts"]
        assert k["global_access"] == ["ld.global.b32", "ld.global.v4.b32", "st.global.v4.b32"], (dtype, counts)
        assert counts["ld.global.b32"] == 7, (dtype, counts)


def test_no_fma_contraction_outside_expf(report):
    for name, k in report["kernels"].items():
        assert k["fma"] == 4 * k["ex2"], f"{name}: {k['fma']} FMA for {k['ex2']} expf (4 each)"
        if name.startswith("guided_step") and " ddpm" not in name:
            assert k["fma"] == 0 and k["ex2"] == 0, name


def test_fma_check_sees_contraction_when_fusion_is_on(report):
    # The same linear-mode kernel compiled with enable_fp_fusion=True: R*x + P*x0 ... contract.
    assert report["fusion_control"]["fma"] > 0
    assert report["fusion_control"]["ex2"] == 0


def test_exp_is_the_cuda_math_library_expf(report):
    # Kernels with one expf per thread give an exact window; with several, immediates are hoisted
    # and sequences interleave, so those are checked by their constants only (below).
    ddpm = [k for n, k in report["kernels"].items() if n.startswith("guided_step ddpm") and k["ex2"] == 1]
    assert len(ddpm) == 6
    for k in ddpm:
        assert k["ex2_kinds"] == ["ex2.approx.ftz.f32"]
        assert [s["constants"] for s in k["exp_sequences"]] == [EXPF_CONSTANTS]
        assert [s["ops"] for s in k["exp_sequences"]] == [EXPF_OPS]
    for name, k in report["kernels"].items():  # gelu too (hoisted immediates may leave the window)
        for s in k["exp_sequences"]:
            assert set(s["constants"]) <= set(EXPF_CONSTANTS), name


def test_recorded_expf_matches_this_nvcc(report):
    if "nvcc_expf" not in report:
        pytest.skip("no nvcc to compile expf with")
    (nvcc,) = report["nvcc_expf"]
    assert nvcc["ops"] == EXPF_OPS
    assert sorted(nvcc["constants"]) == sorted(EXPF_CONSTANTS)  # nvcc may load the first two in either order


def test_divisions_are_correctly_rounded_where_the_reference_divides(report):
    for name, k in report["kernels"].items():
        if name.startswith("guided_step ddim") or name.startswith("gelu_tanh"):
            assert k["div_f32"] == ["div.rn.f32"], name
        elif name.startswith("guided_step"):
            assert k["div_f32"] == [], name
