"""bench_sample.py's peer table with the rounds interleaved: round r runs every row once, in turn.

pytest-benchmark runs each row's rounds back to back, so on a shared machine a load that comes or
goes during the run lands on some rows only. Interleaving spreads it over all rows; the min over
rounds is then the figure to compare (the median shows the spread). On a VM whose speed drifts by
10-20% from minute to minute, the rows' mins can come from different windows: the last columns
divide within each round (rows run seconds apart) and give the median of those ratios with their
range, the figure that drift moves least.

    OMP_NUM_THREADS=1 python bench/interleaved.py [--pair full|lora] [--latent 32 16] [--rounds 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import bench_sample as B


def measure(pair: str, latent: int, rounds: int) -> dict:
    steps = B.STEPS[latent]
    z, y = B.inputs(latent)
    rows = {impl: B.runner(impl, pair, latent) for impl in B.IMPLS}
    want = B.reference_samples(pair, latent, steps)
    for impl, (fn, models) in rows.items():  # warm-up: compiles, conversion, the GEMM measurement
        err = B.rel_err(fn(*models, z, y, steps=steps), want)
        assert err <= B.TOLERANCE, f"{impl}: {err:.2e}"
    times = {impl: [] for impl in rows}
    for _ in range(rounds):
        for impl, (fn, models) in rows.items():
            t0 = time.perf_counter()
            fn(*models, z, y, steps=steps)
            times[impl].append(time.perf_counter() - t0)
    return times


def per_round(peer: list, row: list) -> str:
    """peer / row within each round: median [min-max]."""
    r = [a / b for a, b in zip(peer, row)]
    return f"{statistics.median(r):.3f}x [{min(r):.2f}-{max(r):.2f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", nargs="*", default=["full"], choices=["full", "lora"])
    ap.add_argument("--latent", type=int, nargs="*", default=[32, 16])
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args(argv)
    info = B.cpu_info()
    print(f"cpu: {info['cpu']}; isa: {info['isa']}; threads {torch.get_num_threads()}; torch {torch.__version__}")
    print("| pair | latent, steps | row | min s | median s | min vs upstream eager | min vs upstream compile "
          "| per-round vs eager, median [range] | per-round vs compile, median [range] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in a.pair:
        for latent in a.latent:
            times = measure(pair, latent, a.rounds)
            best = {impl: min(v) for impl, v in times.items()}
            for impl, v in times.items():
                print(f"| {pair} | {latent}, {B.STEPS[latent]} | {impl} | {best[impl]:.3f} | "
                      f"{statistics.median(v):.3f} | {best['upstream eager'] / best[impl]:.3f}x | "
                      f"{best['upstream compile'] / best[impl]:.3f}x | "
                      f"{per_round(times['upstream eager'], v)} | {per_round(times['upstream compile'], v)} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
