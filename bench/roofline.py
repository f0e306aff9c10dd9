"""How much faster than torch.compile can any DiT sampler get on this CPU? The GEMM/attention floor.

Every implementation of a DoG step does the same matrix products: both models' linear layers, the
patch embedding and attention. dgfast, inductor and eager PyTorch all run them through the same
MKL/oneDNN kernels, so what an implementation can remove is only the rest (LayerNorm, modulate,
GELU, residuals, the scheduler step, Python overhead). This script measures that split on the
machine at hand:

1. record the FLOP-carrying aten calls (addmm, mm, bmm, convolution, SDPA) of one upstream DiT
   forward, with their exact shapes and strides;
2. time each distinct call alone, hot in cache, and sum: the floor of one forward; a DoG step is
   two forwards (both models have the same shapes);
3. time the upstream loop eager, with torch.compile'd models, and dgfast on the README's path,
   interleaved, per step.

compile / floor is the most any implementation that keeps these kernels can gain over
torch.compile (the goal of issue 12 is 1.05x). The floor is optimistic (each call timed alone with
its operands in cache; in a forward the same calls took 15-20% longer here), so the ceiling it gives is
generous. Floor and rows are measured in the same interleaved rounds (min over rounds): on a shared
2-core machine a load on the other core moves both by 20% and more.

    OMP_NUM_THREADS=1 python bench/roofline.py [--latent 32 16] [--rounds 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench_sample as B

FLOOR_OPS = ("aten.addmm", "aten.mm", "aten.bmm", "aten.baddbmm", "aten.convolution",
             "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention")


def _spec(x):
    """What a replay needs of one argument: tensors by shape, stride and dtype, the rest as is."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):  # a tuple either way, so the spec can be a dict key
        return ("seq",) + tuple(_spec(v) for v in x)
    return x


def _make(spec, gen):
    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, shape, stride, dtype = spec
        return torch.empty_strided(shape, stride, dtype=dtype).normal_(generator=gen)
    if isinstance(spec, tuple) and spec and spec[0] == "seq":
        return [_make(v, gen) for v in spec[1:]]
    return spec


class RecordFloorOps(TorchDispatchMode):
    """Counts the FLOP-carrying aten calls by (op, argument specs)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()
        self.funcs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in FLOOR_OPS:
            key = (name, tuple(_spec(a) for a in args), tuple(sorted((kwargs or {}).items())))
            self.calls[key] += 1
            self.funcs[key] = func
        return func(*args, **(kwargs or {}))


def floor_calls(model, z, y):
    """{(op, specs, kwargs): count} and the funcs of one forward of `model` at batch len(z)."""
    t = torch.full((len(z),), 500)
    with torch.no_grad(), RecordFloorOps() as rec:
        model(z, t, y)
    return rec.calls, rec.funcs


def time_call(func, spec, kwargs, min_s: float = 0.05, repeats: int = 5) -> float:
    """Seconds per call: the best of `repeats` batches of calls that each last at least min_s."""
    gen = torch.Generator().manual_seed(0)
    args = [_make(s, gen) for s in spec]
    with torch.no_grad():
        func(*args, **kwargs)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < min_s:
            func(*args, **kwargs)
            n += 1
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                func(*args, **kwargs)
            best = min(best, (time.perf_counter() - t0) / n)
    return best


def addmm_flops(spec) -> int:
    """2 M K N of addmm(bias, (M, K), (K, N))."""
    (m, k), n = spec[1][1], spec[2][1][1]
    return 2 * m * k * n


class Floor:
    """The floor of one DoG step (two forwards at batch B.N): the recorded calls, timed on demand."""

    def __init__(self, latent: int):
        ref_ft = B.models_for("full", latent)[0]
        z, y = B.inputs(latent)
        self.calls, self.funcs = floor_calls(ref_ft, z, y)

    def measure(self) -> tuple[dict, float]:
        """(seconds per step by op, the linear layers' GFLOP/s)."""
        by_op, flops = Counter(), 0
        for key, count in self.calls.items():
            name, spec, kwargs = key
            by_op[name] += 2 * count * time_call(self.funcs[key], spec, dict(kwargs))
            flops += 2 * count * addmm_flops(spec) if name == "aten.addmm" else 0
        return dict(by_op), flops / by_op["aten.addmm"] / 1e9


def interleaved(latent: int, rounds: int) -> tuple[dict, dict, float]:
    """Seconds per step of the upstream loop eager and compiled and of dgfast, and the floor, each the
    min over rounds; each round measures every row once (a load that comes and goes hits all of them)."""
    steps = B.STEPS[latent]
    z, y = B.inputs(latent)
    impls = ("upstream eager", "upstream compile", "dgfast")
    rows = {impl: B.runner(impl, "full", latent) for impl in impls}
    for fn, models in rows.values():  # warm-up: compiles, conversion, the GEMM measurement
        fn(*models, z, y, steps=steps)
    floor = Floor(latent)
    best = {impl: float("inf") for impl in impls}
    best_floor, gflops = None, 0.0
    for _ in range(rounds):
        for impl, (fn, models) in rows.items():
            t0 = time.perf_counter()
            fn(*models, z, y, steps=steps)
            best[impl] = min(best[impl], (time.perf_counter() - t0) / int(steps))
        by_op, g = floor.measure()
        if best_floor is None or sum(by_op.values()) < sum(best_floor.values()):
            best_floor, gflops = by_op, g
    return best, best_floor, gflops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, nargs="*", default=[32, 16])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    info = B.cpu_info()
    print(f"cpu: {info['cpu']}; isa: {info['isa']}; threads {torch.get_num_threads()}; torch {torch.__version__}; "
          f"{B.MODEL} full fine-tune pair, batch {B.N}, fp32")
    print("| latent | floor s/step (GEMM + conv / SDPA) | linear GFLOP/s | row | s/step | row / floor | "
          "most gain over compile |")
    print("|---|---|---|---|---|---|---|")
    for latent in a.latent:
        rows, by_op, gflops = interleaved(latent, a.rounds)
        floor = sum(by_op.values())
        sdpa = sum(v for k, v in by_op.items() if "scaled_dot_product" in k)
        for impl, s in rows.items():
            print(f"| {latent} | {floor:.3f} ({floor - sdpa:.3f} / {sdpa:.3f}) | {gflops:.0f} | {impl} | {s:.3f} | "
                  f"{s / floor:.3f} | {rows['upstream compile'] / floor:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
