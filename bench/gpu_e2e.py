"""End-to-end DoG sampling on a GPU, for bench/gpu_check.sh (issue: paired execution, GPU part).

    python bench/gpu_e2e.py                       # DiT-XL/2, 256px (latent 32), batch 64, bf16, CUDA
    python bench/gpu_e2e.py --device cpu --model DiT-S/8 --latent 16 --batch 2 --dtype fp32 --steps 2
                                                  # the same code on a CPU, seconds (a smoke run)

Measures, with bench/bench_sample.py's random pair (upstream layout, a full fine-tune: every layer differs):
- throughput, side by side: the two-pass reference loop (dgfast.reference: upstream DiT +
  GaussianDiffusion + the DoG script's closure) eager and with torch.compile'd models (the peer a
  user would pick), and dgfast.sample given the *upstream modules* (the README's path) with default
  settings and with compile=True; the models' weights in --dtype and float32 latents/diffusion math
  (the reference's models get their input cast to the weights' dtype and their output back to
  float32, as a user would wrap them);
- model FLOP utilisation: analytic forward FLOPs (2 per multiply-add) of both models per step over
  dgfast's time per step, against the measured bf16 matmul peak (8192^3) of the same card;
- latency of small batches (--latency-batches): eager, cuda_graph=True (dgfast's hand-made CUDA-graph
  runner) and, for --graph-compile-batches, compile="reduce-overhead" (torch's CUDA graphs), to keep one.
--no-compile skips every torch.compile row (each costs an inductor build).
Prints a table and writes --json. Timings: median of --rounds after a warm-up call, the device
synchronised inside the timed region.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback

import torch

import dgfast
from dgfast import samplers
from dgfast.reference import ReferenceDiffusion, dog_guidance_fn

from bench_sample import FT_CLASSES, NULL, SCALE, build_models  # the CPU benchmark's pair and settings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, rounds):
    """Median seconds of fn() over `rounds` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_flops(m) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward per sample: GEMMs, attention's two matmuls,
    adaLN, embedders; elementwise work not counted."""
    D, T, L = m.hidden_size, (m.input_size // m.patch_size) ** 2, len(m.blocks)
    p, C = m.patch_size, m.in_channels
    O = m.out_channels
    mlp = m.blocks[0].mlp.fc1.out_features
    per_block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * mlp + 2 * D * 6 * D
    embed = 2 * T * C * p * p * D + 2 * (m.t_embedder.frequency_embedding_size * D + D * D)
    final = 2 * D * 2 * D + 2 * T * D * p * p * O
    return L * per_block + embed + final


def cast_io(model, dtype):
    """model(x, t, y) for half-precision weights, as upstream DiT is run in bf16: under autocast
    (its timestep MLP gets float32 features otherwise), the output back in float32."""
    def forward(x, t, y):
        if dtype == torch.float32:
            return model(x, t, y)
        with torch.autocast(x.device.type, dtype=dtype):
            return model(x, t, y).float()
    return forward


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256px images)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", default="10", help="sampling steps (DiT respacing string)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the models' weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-batches", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--graph-compile-batches", type=int, nargs="*", default=[1, 4],
                    help="latency batches that also run compile='reduce-overhead' (one build each)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--json", default=None, help="write the results here too")
    return ap


def main(argv=None) -> int:
    # Long on purpose: one run whose stages (reference, agreement, timings, compile rows, latency rows)
    # share the models, inputs and result dict through closures, and each stage must record its error and
    # let the others run; split into functions, all of that state would be passed to each of them.
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: skipped (pass --device cpu for a smoke run)")
        return 0
    dtype = DTYPES[args.dtype]
    ref_ft, ref_pre, dg_ft, dg_pre = build_models(args.latent, args.model)
    for m in (ref_ft, ref_pre, dg_ft, dg_pre):
        m.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(args.batch, dg_ft.in_channels, args.latent, args.latent, generator=gen).to(device)
    y = torch.randint(0, FT_CLASSES, (args.batch,), generator=gen).to(device)

    def run_dgfast(zz, yy, **kw):
        """The README's path: the upstream modules passed in (dgfast converts them)."""
        torch.manual_seed(0)
        return dgfast.sample(ref_ft, ref_pre, zz, yy, guidance_scale=SCALE, steps=args.steps, null_label=NULL, **kw)

    compiled = {}

    def run_reference(compile_models=False):
        torch.manual_seed(0)
        n = len(z)
        ft, pre = ref_ft, ref_pre
        if compile_models:  # the peer: torch.compile on the upstream modules, built once
            if not compiled:
                compiled["ft"], compiled["pre"] = torch.compile(ref_ft), torch.compile(ref_pre)
            ft, pre = compiled["ft"], compiled["pre"]
        fn = dog_guidance_fn(cast_io(ft, dtype), cast_io(pre, dtype), null=NULL, channels=3)
        out = ReferenceDiffusion(args.steps).p_sample_loop(
            fn, (2 * n, *z.shape[1:]), torch.cat([z, z]), clip_denoised=False,
            model_kwargs=dict(y=torch.cat([y, torch.full((n,), FT_CLASSES, device=device)]), cfg_scale=SCALE),
            device=device)
        return out[:n]

    n_steps = samplers.native_plan("ddpm", args.steps, 0.0).num_steps
    flops_step = 2 * args.batch * forward_flops(dg_ft)          # both models, every step
    res = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "model": args.model, "latent": args.latent, "batch": args.batch, "steps": args.steps, "n_steps": n_steps,
        "dtype": args.dtype, "tflop_per_step": flops_step / 1e12, "latency": [], "errors": {},
    }
    print(f"\n== end-to-end DoG, {args.model} latent {args.latent}, batch {args.batch}, {args.dtype} weights, "
          f"{n_steps} steps, {res['card']} ==", flush=True)

    def stage(name, fn):
        """fn()'s value, or None with the error recorded: one failure must not lose the other results."""
        try:
            with torch.no_grad():
                return fn()
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON, exit status 1
            traceback.print_exc()
            res["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"  {name}: FAILED ({res['errors'][name]})", flush=True)
            return None

    try:
        ref = stage("reference", run_reference)
        if ref is not None:
            res["max_rel_err_vs_reference"] = stage(
                "agreement", lambda: ((run_dgfast(z, y) - ref).abs().max() / ref.abs().max()).item())
        t_fast = res["dgfast_s"] = stage("dgfast timing", lambda: timed(lambda: run_dgfast(z, y), device, args.rounds))
        t_ref = res["reference_s"] = stage("reference timing", lambda: timed(run_reference, device, args.rounds))
        if not args.no_compile:
            res["reference_compile_s"] = stage("reference compile timing", lambda: timed(
                lambda: run_reference(compile_models=True), device, args.rounds))
            res["dgfast_compile_s"] = stage("dgfast compile timing", lambda: timed(
                lambda: run_dgfast(z, y, compile=True), device, args.rounds))
        for key, label in (("dgfast_s", "dgfast.sample"), ("dgfast_compile_s", "dgfast compile=True"),
                           ("reference_s", "upstream eager"), ("reference_compile_s", "upstream compile")):
            if res.get(key):
                print(f"  {label:<20} {res[key]:8.3f} s  ({res[key] / n_steps * 1e3:7.1f} ms/step)", flush=True)
        if t_fast and t_ref:
            res["speedup"] = t_ref / t_fast
            print(f"  speedup {res['speedup']:.2f}x, max rel diff {res.get('max_rel_err_vs_reference')}", flush=True)
        for key in ("reference_s", "reference_compile_s"):
            for mine in ("dgfast_s", "dgfast_compile_s"):
                if res.get(key) and res.get(mine):
                    res[f"{mine[:-2]}_vs_{key[:-2]}"] = res[key] / res[mine]
        if t_fast:
            res["achieved_tflops"] = flops_step * n_steps / t_fast / 1e12
            peak = stage("bf16 matmul peak", matmul_peak_tflops) if device.type == "cuda" else None
            res["bf16_matmul_peak_tflops"], res["mfu"] = peak, res["achieved_tflops"] / peak if peak else None
            mfu = f", MFU {res['mfu']:.1%} of {peak:.0f} TFLOP/s (bf16 matmul 8192^3)" if peak else ""
            print(f"  model FLOPs {res['tflop_per_step']:.4g} TFLOP/step, achieved {res['achieved_tflops']:.4g} "
                  f"TFLOP/s{mfu}", flush=True)
        for b in args.latency_batches:
            zb, yb = z[:b], y[:b]
            row = {"batch": b, "eager_s": stage(f"batch {b} eager", lambda: timed(lambda: run_dgfast(zb, yb),
                                                                                    device, args.rounds))}
            row["cuda_graph_s"] = stage(f"batch {b} cuda_graph", lambda: timed(
                lambda: run_dgfast(zb, yb, cuda_graph=True), device, args.rounds)) if device.type == "cuda" else None
            row["reduce_overhead_s"] = stage(f"batch {b} compile reduce-overhead", lambda: timed(
                lambda: run_dgfast(zb, yb, compile="reduce-overhead"), device, args.rounds)) \
                if b in args.graph_compile_batches and not args.no_compile else None
            res["latency"].append(row)
            parts = [f"{row[k] / n_steps * 1e3:7.2f} ms/step {label}" for k, label in (
                ("eager_s", "eager"), ("cuda_graph_s", "cuda_graph"), ("reduce_overhead_s", "reduce-overhead"))
                if row[k]]
            print(f"  batch {b}: " + "  ".join(parts), flush=True)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    return 1 if res["errors"] else 0


def matmul_peak_tflops(m=8192):
    """The card's bf16 matmul rate, measured as gpu_summary.py measures it (one definition of peak)."""
    from gpu_summary import matmul_tflops
    return matmul_tflops(m)


if __name__ == "__main__":
    sys.exit(main())
