"""GPU measurements for bench/gpu_check.sh; prints the summary table last.

- device references: large device-to-device copy bandwidth (read + write bytes), bf16 matmul peak;
- guided_step: torch.equal against the torch CUDA step over modes, steps, k and clip;
  achieved bandwidth at (256, 4, 64, 64) as a share of the copy bandwidth (target >= 85%), both
  timed the same way (stream_seconds);
- each Triton op against its torch twin (triton.testing.do_bench, L2 flushed before every run),
  which also stands in for bench/ when pytest-benchmark is missing.
Run from the repo root with PYTHONPATH=. ; exit status 1 when a check fails.
"""
import argparse
import datetime
import sys
import traceback

import torch

TARGET = 0.85  # guided_step bandwidth / copy bandwidth


def load_kernels():
    from dgfast import ops
    kernels = ops.triton_kernels()  # dgfast.kernels: gpu_check.sh installs the checkout
    if kernels is None:
        raise SystemExit("gpu_summary: dgfast.ops.triton_kernels() found no kernels package")
    return kernels


def seconds(fn):
    """Median time of fn (triton.testing.do_bench: L2 flushed before every run). For op timings."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def stream_seconds(fns, reps=10, rounds=15):
    """Median GPU time of one call, for bandwidth. The calls rotate over separate buffers, so none
    finds its data in L2, and no flush kernel runs between them (its dirty L2 lines would be
    written back during the timed kernel); they replay from a CUDA graph, so Python launch
    overhead is not timed (if capture fails, they are launched eagerly instead)."""
    def run():
        for _ in range(reps):
            for f in fns:
                f()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    except Exception as err:  # noqa: BLE001 - timing eagerly still gives a (pessimistic) number
        print(f"gpu_summary: CUDA graph capture failed ({type(err).__name__}: {err}); timing eager launches")
        torch.cuda.synchronize()
    run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (reps * len(fns)))
    return sorted(times)[len(times) // 2]


def copy_gbps():
    src = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / stream_seconds([lambda: dst.copy_(src)], reps=4) / 1e9


def matmul_tflops(m=8192):
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    return 2 * m ** 3 / seconds(lambda: a @ b) / 1e12


def step_inputs(n, C, H, W, seed=0):
    """As the sampler holds them: both models' outputs from one 2n batch, noise rows of a 2n draw."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, C, H, W, device="cuda", generator=g)
    model_out = torch.randn(2 * n, 2 * C, H, W, device="cuda", generator=g)
    noise = torch.randn(2 * n, C, H, W, device="cuda", generator=g)[:n]
    return x, model_out[:n], model_out[n:], noise


def step_tables():
    from dgfast.schedule import Schedule
    return [("ddpm", "ddpm", Schedule.from_steps("250").ddpm_coefs()),
            ("ddim eta=0", "ddim", Schedule.from_steps("ddim50").ddim_coefs(0.0)),
            ("ddim eta=1", "ddim", Schedule.from_steps("ddim50").ddim_coefs(1.0))]


def guided_step_bitwise(K):
    from dgfast import ops
    cases, failures = 0, []
    for seed, shape in enumerate([(3, 4, 17, 9), (16, 4, 32, 32), (256, 4, 64, 64)]):
        inputs = step_inputs(*shape, seed=seed)
        for name, mode, table in step_tables():
            for j in (0, 1, len(table) // 2, len(table) - 1):
                for k, clip in [(3, False), (4, True), (0, False)]:
                    got = K.guided_step(*inputs, table[j].tolist(), scale=1.37, k=k, step_mode=mode, clip_denoised=clip)
                    want = ops.guided_step_torch(*inputs, table[j].tolist(), scale=1.37, guidance_channels=k,
                                                 step_mode=mode, clip_denoised=clip)
                    cases += 1
                    if not torch.equal(got, want):
                        failures.append(f"{shape} {name} j={j} k={k} clip={clip}: "
                                        f"{(got != want).sum().item()} elements differ")
        # the multistep / flow modes (DPM-Solver++(2M), diffusers schedulers, SiT): state in and out
        x, ft, pre, z = inputs
        prev = torch.randn_like(x)
        for name, mode, coefs, kw in [
                ("linear", "linear", (1.3, 0.7, 0.9, 0.4, -0.2, 0.25, 0.3), dict(prev=prev, return_state=True)),
                ("linear no prev", "linear", (1.3, 0.7, 0.9, 0.4, -0.2, 0.0, 0.0), dict(return_state=True)),
                ("flow_euler", "flow_euler", (-0.0625,), dict(return_state=True)),
                ("flow_heun", "flow_heun", (0.03125,), dict(prev=prev))]:
            noise = z if name == "linear" else None
            got = K.guided_step(x, ft, pre, noise, list(coefs), scale=1.37, k=3, step_mode=mode, **kw)
            want = ops.guided_step_torch(x, ft, pre, noise, list(coefs), scale=1.37, guidance_channels=3,
                                         step_mode=mode, **kw)
            got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
            cases += 1
            if not all(torch.equal(a, b) for a, b in zip(got, want)):
                failures.append(f"{shape} {name}: outputs or state differ")
    return cases, failures


def guided_step_bandwidth(K, shape=(256, 4, 64, 64), k=3, sets=4):
    """Achieved GB/s of the fused step (bytes it must move / time), and its time against torch's."""
    from dgfast import ops
    n, C, H, W = shape
    coefs = step_tables()[0][2][125].tolist()
    calls = []
    for seed in range(sets):
        x, ft, pre, z = step_inputs(n, C, H, W, seed=seed)
        out = torch.empty_like(x)
        calls.append(lambda x=x, ft=ft, pre=pre, z=z, out=out:
                     K.guided_step(x, ft, pre, z, coefs, scale=4.0, k=k, step_mode="ddpm", out=out))
    t = stream_seconds(calls)
    nbytes = x.element_size() * n * H * W * (5 * C + k)  # x, eps, v, noise, k channels of u; write out
    t_ref = seconds(lambda: ops.guided_step_torch(x, ft, pre, z, coefs, scale=4.0, guidance_channels=k))
    return nbytes / t / 1e9, t, t_ref


def op_timings(K):
    """(op, dtype, triton s, torch s) at DiT-XL/2 sizes: 2x32 samples, 256 tokens, D = 1152."""
    from dgfast import ops
    rows = []
    x, ft, pre, z = step_inputs(64, 4, 32, 32)
    coefs = step_tables()[0][2][125].tolist()
    rows.append(("guided_step (64,4,32,32)", "fp32",
                 seconds(lambda: K.guided_step(x, ft, pre, z, coefs, scale=4.0, k=3)),
                 seconds(lambda: ops.guided_step_torch(x, ft, pre, z, coefs, scale=4.0, guidance_channels=3))))
    N, T, D = 64, 256, 1152
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        h, y = (torch.randn(N, T, D, device="cuda", dtype=dtype) for _ in range(2))
        mod = torch.randn(N, 6 * D, device="cuda", dtype=dtype)
        shift, scale, gate = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
        rows.append((f"adaln_modulate ({N},{T},{D})", name, seconds(lambda: K.adaln_modulate(h, shift, scale)),
                     seconds(lambda: ops.adaln_modulate_torch(h, shift, scale))))
        rows.append((f"gated_residual_modulate ({N},{T},{D})", name,
                     seconds(lambda: K.gated_residual_modulate(h, gate, y, shift, scale)),
                     seconds(lambda: ops.gated_residual_modulate_torch(h, gate, y, shift, scale))))
        a = torch.randn(N * T, 4 * D, device="cuda", dtype=dtype)
        bias = torch.randn(4 * D, device="cuda", dtype=dtype)
        rows.append((f"gelu_tanh+bias ({N * T},{4 * D})", name, seconds(lambda: K.gelu_tanh(a, bias)),
                     seconds(lambda: ops.gelu_tanh_torch(a, bias))))
    return rows


def outcome(rc, none_ok):
    if rc == 0:
        return "PASS", ""
    if rc == 5:
        return ("SKIP" if none_ok else "FAIL"), "no tests collected"
    return "FAIL", f"exit status {rc}"


def e2e_rows(path):
    """Rows from bench/gpu_e2e.py's JSON: the paired-execution issue's GPU figures in the same table."""
    import json
    import os
    if not path or not os.path.isfile(path):
        return [("end to end (gpu_e2e.py)", "SKIP", "no JSON")]
    with open(path) as f:
        e = json.load(f)
    what = f"{e['model']} latent {e['latent']} batch {e['batch']} {e['dtype']}"
    rows = []
    if e.get("speedup"):
        err = e.get("max_rel_err_vs_reference")
        ms_step = e['dgfast_s'] / e['n_steps'] * 1e3
        rows.append((f"{what}: dgfast vs two-pass", "-", f"{e['speedup']:.2f}x ({ms_step:.1f}"
                     f" vs {e['reference_s'] / e['n_steps'] * 1e3:.1f} ms/step), max rel diff "
                     + ("n/a" if err is None else f"{err:.1e}")))
    for mine, label in (("dgfast", "dgfast"), ("dgfast_compile", "dgfast compile=True")):
        ratios = [f"{e[k]:.2f}x vs {peer}" for k, peer in ((f"{mine}_vs_reference", "upstream eager"),
                                                          (f"{mine}_vs_reference_compile", "upstream compile"))
                  if e.get(k)]
        if ratios:
            rows.append((f"{what}: {label} (upstream modules in)", "-", ", ".join(ratios)))
    if e.get("mfu"):
        rows.append((f"{what}: MFU", "-", f"{e['mfu']:.1%} ({e['achieved_tflops']:.0f} of "
                     f"{e['bf16_matmul_peak_tflops']:.0f} TFLOP/s)"))
    for r in e.get("latency", []):
        ms = lambda s: f"{s / e['n_steps'] * 1e3:.2f}" if s else "failed"  # noqa: E731
        rows.append((f"batch {r['batch']} ms/step eager / cuda_graph / reduce-overhead", "-",
                     f"{ms(r['eager_s'])} / {ms(r['cuda_graph_s'])} / {ms(r.get('reduce_overhead_s'))}"))
    for name, err in e.get("errors", {}).items():
        rows.append((f"gpu_e2e: {name}", "FAIL", err[:80]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests-rc", type=int, required=True, help="exit status of pytest -m cuda tests/")
    ap.add_argument("--bench-rc", type=int, default=0, help="exit status of the pytest-benchmark run")
    ap.add_argument("--bench-mode", choices=["pytest", "fallback", "none"], default="fallback")
    ap.add_argument("--e2e-json", default=None, help="bench/gpu_e2e.py's --json output, for its rows")
    ap.add_argument("--json", default=None, help="write the table here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0
    import triton
    K = load_kernels()

    rows = []  # (check, result, value)
    found = {}

    def attempt(check, fn):
        """Run one measurement; an exception becomes a FAIL row, not the end of the table."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            rows.append((check, "FAIL", f"{type(err).__name__}: {str(err)[:80]}"))
            return None

    try:
        rows.append(("pytest -m cuda tests/", *outcome(args.tests_rc, none_ok=False)))
        if args.bench_mode == "pytest":
            rows.append(("pytest bench/bench_*.py --benchmark-only", *outcome(args.bench_rc, none_ok=True)))
        elif args.bench_mode == "fallback":
            rows.append(("bench/ (pytest-benchmark missing)", "SKIP", "do_bench op timings above instead"))
        else:
            rows.append(("bench/", "SKIP", "no bench_*.py files"))
        rows.extend(e2e_rows(args.e2e_json))
        bitwise = attempt("guided_step torch.equal vs torch CUDA", lambda: guided_step_bitwise(K))
        if bitwise:
            cases, failures = bitwise
            for f in failures[:10]:
                print("guided_step mismatch:", f)
            rows.append(("guided_step torch.equal vs torch CUDA", "FAIL" if failures else "PASS",
                         f"{cases - len(failures)}/{cases} cases"))
        copy = found["copy_gbps"] = attempt("copy bandwidth", copy_gbps)
        if copy:
            rows.append(("copy bandwidth (1 GiB D2D, r+w)", "-", f"{copy:.0f} GB/s"))
        peak = found["bf16_tflops"] = attempt("bf16 matmul 8192^3", matmul_tflops)
        if peak:
            rows.append(("bf16 matmul 8192^3", "-", f"{peak:.0f} TFLOP/s"))
        bw = attempt("guided_step (256,4,64,64) bandwidth", lambda: guided_step_bandwidth(K))
        if bw and copy:
            gbps, t, t_ref = bw
            found["guided_step_gbps"] = gbps
            rows.append((f"guided_step (256,4,64,64) >= {TARGET:.0%} copy", "PASS" if gbps >= TARGET * copy else "FAIL",
                         f"{gbps:.0f} GB/s = {gbps / copy:.0%} of copy; {t * 1e6:.1f} us "
                         f"(torch ops: {t_ref * 1e6:.1f} us)"))
        timings = attempt("op timings", lambda: op_timings(K)) or []
        found["op_timings"] = timings
        print("\nop timings (median, L2 flushed; us)")
        print(f"  {'op':42s} {'dtype':5s} {'triton':>9s} {'torch':>9s} {'speedup':>8s}")
        for op, dtype, tt, tr in timings:
            print(f"  {op:42s} {dtype:5s} {tt * 1e6:9.1f} {tr * 1e6:9.1f} {tr / tt:7.2f}x")
    finally:
        card = torch.cuda.get_device_name()
        date = datetime.datetime.now().isoformat(timespec="seconds")
        print("\n== dgfast GPU check ==")
        print(f"card   {card}  (torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda})")
        print(f"date   {date}")
        for check, result, value in rows:
            print(f"  {check:44s} {result:5s} {value}")
        failed = [r for r in rows if r[1] == "FAIL"]
        print("RESULT", "FAIL" if failed else "PASS", flush=True)
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump({"card": card, "date": date, "torch": torch.__version__, "triton": triton.__version__,
                           "rows": rows, "measured": found}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
