"""Fused ops against the eager torch sequences they replace, side by side in one group per op/shape.

fused = the C++ op on CPU (backend="cpp"), the Triton kernel on CUDA (backend="triton");
torch = the op's plain-torch twin from dgfast.ops (what the model runs without dgfast).

    pytest bench/bench_ops.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,rounds --benchmark-sort=name

Compare on min: on a shared 2-core machine the min of many short rounds is the stable figure.
extra_info holds the bytes the op must move (its
inputs once, its outputs once: the same figure for both implementations) and the effective GB/s.
"""
import pytest
import torch

from dgfast import ops
from dgfast.schedule import Schedule

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLS = ["fused", "torch"]
F32 = 4


def backend_for(impl, device):
    if impl == "torch":
        return "torch"
    if device == "cuda":
        if ops.triton_kernels() is None:
            pytest.skip("triton is not installed")
        return "triton"
    if ops.cpp_extension() is None:
        pytest.skip("the C++ extension could not be built")
    return "cpp"


CUDA_CALLS = 20  # per timed call on CUDA: back-to-back launches, one synchronize (see run)


def run(benchmark, fn, *, group, device, nbytes, rounds, iterations):
    # On CUDA one op takes microseconds, as much as a launch plus a synchronize: a timed call
    # launches it CUDA_CALLS times and synchronizes once, so the table's CUDA times are for
    # CUDA_CALLS calls (extra_info says so; GB/s is per call). bench/gpu_summary.py times single
    # kernels with CUDA events.
    calls = CUDA_CALLS if device == "cuda" else 1
    if device == "cuda":
        def timed():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = group
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                torch=torch.__version__, threads=torch.get_num_threads(), bytes=nbytes,
                                calls_per_timed_call=calls)
    if device == "cpu" and ops.cpp_extension() is not None:
        benchmark.extra_info["cpp_exp"] = ops.cpp_extension().exp_backend()
    benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=3)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s (min)"] = round(calls * nbytes / benchmark.stats.stats.min / 1e9, 2)


# ----------------------------------------------------------------------------------------------

GUIDED_SHAPES = [((16, 4, 64, 64), "cpu"), ((16, 4, 64, 64), "cuda"), ((256, 4, 64, 64), "cuda")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,device", [s for s in GUIDED_SHAPES if s[1] in DEVICES])
def test_guided_step(benchmark, impl, shape, device):
    """One DDPM step with DoG on 3 channels (the DiT scripts' setting), noise = kept rows of a 2n draw."""
    backend = backend_for(impl, device)
    n, C, H, W = shape
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g)
    out_ft = torch.randn(n, 2 * C, H, W, device=device, generator=g)
    out_pre = torch.randn(n, 2 * C, H, W, device=device, generator=g)
    noise = torch.randn(2 * n, C, H, W, device=device, generator=g)[:n]
    coefs = Schedule.from_steps("250").ddpm_coefs()[100]
    k = 3

    def fn():
        return ops.guided_step(x, out_ft, out_pre, noise, coefs, scale=4.0, guidance_channels=k, backend=backend)

    nbytes = (5 * C + k) * n * H * W * F32  # x, eps, v, noise, out (C channels each) + k guided pre channels
    run(benchmark, fn, group=f"guided_step {tuple(shape)} {device}", device=device, nbytes=nbytes,
        rounds=200, iterations=5)


def block_inputs(N, T, D, device):
    g = torch.Generator(device).manual_seed(0)
    h = torch.randn(N, T, D, device=device, generator=g)
    y = torch.randn(N, T, D, device=device, generator=g)
    shift, scale, gate = torch.randn(N, 6 * D, device=device, generator=g).chunk(6, dim=1)[:3]  # adaLN chunks
    return h, y, shift, scale, gate


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_adaln_modulate(benchmark, impl, device):
    """LayerNorm + (1 + scale) * . + shift of a DiT-XL block input (D = 1152, 256 tokens, batch 8)."""
    backend = backend_for(impl, device)
    N, T, D = 8, 256, 1152
    h, _, shift, scale, _ = block_inputs(N, T, D, device)
    run(benchmark, lambda: ops.adaln_modulate(h, shift, scale, backend=backend),
        group=f"adaln_modulate {(N, T, D)} {device}", device=device, nbytes=2 * N * T * D * F32,
        rounds=100, iterations=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_gated_residual_modulate(benchmark, impl, device):
    """h + gate * y, then the next sub-layer's LayerNorm + modulation, at DiT-XL block size."""
    backend = backend_for(impl, device)
    N, T, D = 8, 256, 1152
    h, y, shift, scale, gate = block_inputs(N, T, D, device)
    run(benchmark, lambda: ops.gated_residual_modulate(h, gate, y, shift, scale, backend=backend),
        group=f"gated_residual_modulate {(N, T, D)} {device}", device=device, nbytes=4 * N * T * D * F32,
        rounds=100, iterations=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cols", [1536, 4608])
@pytest.mark.parametrize("device", DEVICES)
def test_gelu_tanh(benchmark, impl, cols, device):
    """tanh-GELU of an MLP hidden layer, (8 * 256 tokens, 4D) for D = 384 (DiT-S) and 1152 (DiT-XL)."""
    backend = backend_for(impl, device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(8 * 256, cols, device=device, generator=g) * 2
    run(benchmark, lambda: ops.gelu_tanh(x, backend=backend), group=f"gelu_tanh {(8 * 256, cols)} {device}",
        device=device, nbytes=2 * x.numel() * F32, rounds=40 if cols > 2000 else 60, iterations=3)
