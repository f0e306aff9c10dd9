"""`python -m dgfast demo`: Domain Guidance on the embedded DiT pair, offline, in about a minute on a CPU.

Samples every target class three ways from the same noise — the fine-tuned model alone (scale 1),
classifier-free guidance with its own null label, and Domain Guidance with the pre-trained model's
null label — and writes

    OUT/grid.png    held-out real target images | fine-tuned only | CFG | DoG, one row per class
    OUT/demo.json   settings, per-mode quality (target FD, accuracy), throughput

and prints a table: throughput of dgfast.sample against the upstream two-pass DoG loop
(dgfast.reference: ReferenceDiT + ReferenceDiffusion.p_sample_loop with the DoG script's guidance
closure, same weights, same noise) and the quality of each mode. The demo's FD uses a few hundred
samples per mode from other seeds, so it is noisier than dgfast/zoo/RESULTS.md's 3 x 1000-sample
numbers and not comparable with them: compare modes within one table only (the order DoG < CFG <
fine-tuned is checked on three demo seeds by tests/test_zoo_demo_order.py).

Also runnable as `python -m dgfast.zoo.demo`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from typing import TYPE_CHECKING

import dgfast
from dgfast.zoo import ZOO_DIR, load_pair

if TYPE_CHECKING:  # PIL is imported where a grid is drawn
    from PIL import Image

FALLBACK_SCALES = {"cfg": 2.0, "dog": 2.0}  # used only when results.json is missing
MODE_TITLES = {"finetuned": "fine-tuned only", "cfg": "CFG (own null)", "dog": "DoG (pre-trained null)"}


def best_scales(zoo_dir: str | None = None) -> dict:
    """The best scale of each guidance mode in RESULTS.md's sweep (results.json), else fallbacks."""
    path = os.path.join(zoo_dir or ZOO_DIR, "results.json")
    try:
        with open(path) as f:
            best = json.load(f)["best"]
        return {m: float(best[m].split()[1]) for m in ("cfg", "dog")}
    except (OSError, KeyError, ValueError, IndexError):
        return dict(FALLBACK_SCALES)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default="./dgfast-demo", help="output folder (default ./dgfast-demo)")
    parser.add_argument("--per-class", type=int, default=8, help="grid samples per class and mode (default 8)")
    parser.add_argument("--steps", default=None,
                        help="sampling steps, DiT respacing string (default 50; 5 with --quick)")
    parser.add_argument("--scale", type=float, default=None,
                        help="DoG guidance scale (default: the best in RESULTS.md's sweep)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="CFG guidance scale (default: the best in RESULTS.md's sweep)")
    parser.add_argument("--quality-samples", type=int, default=250,
                        help="samples per mode for the FD/accuracy table (default 250; 0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "cpp", "triton", "torch"),
                        help="dgfast's op backend (default auto)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-loop timing")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, seconds (for tests): 5 steps unless --steps is given, at most 2 per "
                             "class, at most 40 quality samples")
    parser.add_argument("--zoo-dir", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------------------------
# Throughput: dgfast.sample vs the upstream two-pass loop, same weights, same noise
# ----------------------------------------------------------------------------------------------

def reference_sampler(finetuned, pretrained, info, scale, steps):
    """The upstream DoG loop on the same weights: f(z, y) -> kept samples."""
    from dgfast.reference import ReferenceDiffusion, ReferenceDiT, dog_guidance_fn
    cfg_ft = {k: v for k, v in info["finetuned"]["config"].items() if k in REFERENCE_KEYS}
    cfg_pre = {k: v for k, v in info["pretrained"]["config"].items() if k in REFERENCE_KEYS}
    ft_ref, pre_ref = ReferenceDiT(**cfg_ft), ReferenceDiT(**cfg_pre)
    ft_ref.load_state_dict(finetuned.state_dict())
    pre_ref.load_state_dict(pretrained.state_dict())
    ft_ref.eval(), pre_ref.eval()
    diffusion = ReferenceDiffusion(steps)
    fn = dog_guidance_fn(ft_ref, pre_ref, null=info["pretrained"]["null_label"], channels="all")
    K = info["finetuned"]["null_label"]

    def run(z, y):
        z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, K)])  # the DoG script's doubling
        out = diffusion.p_sample_loop(fn, tuple(z2.shape), z2, clip_denoised=False,
                                      model_kwargs={"y": y2, "cfg_scale": scale}, device=z.device)
        return out[: len(z)]
    return run


REFERENCE_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "class_dropout_prob", "num_classes", "learn_sigma")


def time_call(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(finetuned, pretrained, info, scale, steps, n, seed, backend, with_reference=True) -> dict:
    """DoG samples/s of dgfast.sample and of the reference loop, noise="reference" in both so the
    outputs must agree (max |difference| reported)."""
    K = info["finetuned"]["config"]["num_classes"]
    C, S = info["finetuned"]["config"]["in_channels"], info["finetuned"]["config"]["input_size"]
    y = torch.arange(n, dtype=torch.int64) % K
    num_steps = dgfast.Schedule.from_steps(steps).num_steps
    null = info["pretrained"]["null_label"]

    def fast():
        torch.manual_seed(seed)
        z = torch.randn(n, C, S, S)
        return dgfast.sample(finetuned, pretrained, z, y, guidance_scale=scale, steps=steps, guidance_channels="all",
                             null_label=null, noise="reference", backend=backend)
    fast_warm = dgfast.sample(finetuned, pretrained, torch.randn(2, C, S, S), y[:2], guidance_scale=scale,
                              steps="2", guidance_channels="all", null_label=null, backend=backend)  # warm-up
    del fast_warm
    t_fast, x_fast = time_call(fast)
    res = {"batch": n, "steps": num_steps, "scale": scale, "backend": backend,
           "dgfast_s": round(t_fast, 4), "dgfast_samples_per_s": round(n / t_fast, 2),
           "dgfast_ms_per_step": round(1000 * t_fast / num_steps, 3)}
    if not with_reference:
        return res
    ref = reference_sampler(finetuned, pretrained, info, scale, steps)
    res["reference"] = "dgfast.reference (ReferenceDiT + ReferenceDiffusion.p_sample_loop + dog_guidance_fn)"

    def slow():
        torch.manual_seed(seed)
        z = torch.randn(n, C, S, S)
        return ref(z, y)
    t_ref, x_ref = time_call(slow)
    res.update(reference_s=round(t_ref, 4), reference_samples_per_s=round(n / t_ref, 2),
               reference_ms_per_step=round(1000 * t_ref / num_steps, 3), speedup=round(t_ref / t_fast, 3),
               max_abs_diff_vs_reference=float((x_fast - x_ref).abs().max()))
    return res


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

def make_grid(panels: list[tuple[str, np.ndarray]], row_labels: list[str], per_class: int, cell: int = 48,
              gap: int = 12) -> "Image.Image":
    """panels: (title, uint8 images (K*per_class, H, W, 3) class-major); one row per class."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    K = len(row_labels)
    label_w, title_h, pad = 34, 22, 1
    pw = per_class * (cell + pad)
    W = label_w + len(panels) * pw + (len(panels) - 1) * gap + 4
    H = title_h + K * (cell + pad) + 4
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, lab in enumerate(row_labels):
        y0 = title_h + r * (cell + pad)
        draw.text((4, y0 + cell // 2 - 6), lab, fill=(0, 0, 0), font=font)
    for p, (title, imgs) in enumerate(panels):
        x0 = label_w + p * (pw + gap)
        draw.text((x0, 5), title, fill=(0, 0, 0), font=font)
        for i, img in enumerate(imgs[: K * per_class]):
            r, c = divmod(i, per_class)
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (x0 + c * (cell + pad), title_h + r * (cell + pad)))
    return canvas


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

def check_args(args) -> None:
    """One-line errors naming the flag (ValueError: `dgfast demo` prints it as its usage error);
    fills in --steps, and applies --quick, which never overrides an explicit --steps."""
    from dgfast.zoo.evaluate import MIN_FD_SAMPLES, check_steps, check_zoo_dir
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.quality_samples != 0 and args.quality_samples < MIN_FD_SAMPLES:
        raise ValueError(f"--quality-samples must be 0 (skip) or >= {MIN_FD_SAMPLES} (the FD needs a "
                         f"covariance), got {args.quality_samples}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.steps is None:
        args.steps = "5" if args.quick else "50"
    check_steps(args.steps)
    check_zoo_dir(args.zoo_dir)
    if args.quick:
        args.per_class = min(args.per_class, 2)
        args.quality_samples = min(args.quality_samples, 40)


def mode_quality(finetuned, pretrained, info, scales: dict, samples: int, steps: str, seed: int,
                 backend: str = "auto", zoo_dir: str | None = None) -> dict:
    """{mode: the metric's dict} for fine-tuned only, CFG and DoG at `scales`, `samples` balanced
    labels each, the same per-sample noise in every mode (seeds seed * 10**6 + 500000 + i, apart
    from the grid's)."""
    from dgfast.zoo.evaluate import balanced_labels, sample_mode
    from dgfast.zoo.metrics import load_metric
    metric = load_metric(zoo_dir or ZOO_DIR)
    K = info["finetuned"]["config"]["num_classes"]
    y = balanced_labels(samples, K)
    seeds = [seed * 10 ** 6 + 500_000 + i for i in range(samples)]
    quality = {}
    for mode in ("finetuned", "cfg", "dog"):
        print(f"[2/3] quality: {samples} samples, {MODE_TITLES[mode]} ...", flush=True)
        x = sample_mode(finetuned, pretrained, info, mode, scales[mode], y, seeds, steps=steps, backend=backend)
        quality[mode] = metric(x, y)
    return quality


def print_report(args, scales: dict, quality: dict, grid_seconds: dict, thr: dict) -> None:
    """The demo's table (scale, target FD, accuracy and grid time per mode) and throughput lines."""
    results_path = os.path.join(args.zoo_dir or ZOO_DIR, "RESULTS.md")
    lines = [f"{'mode':26s} {'scale':>5s} {'target FD':>10s} {'accuracy':>9s} {'grid time':>10s}"]
    for mode in ("finetuned", "cfg", "dog"):
        q = quality.get(mode)
        fd = f"{q['fd']:10.3f}" if q else f"{'-':>10s}"
        acc = f"{q['accuracy']:9.3f}" if q else f"{'-':>9s}"
        lines.append(f"{MODE_TITLES[mode]:26s} {scales[mode]:5g} {fd} {acc} {grid_seconds[mode]:9.2f}s")
    print()
    print("\n".join(lines))
    if quality:
        fd = {m: quality[m]["fd"] for m in quality}
        print(f"DoG's target FD: {100 * (fd['dog'] / fd['finetuned'] - 1):+.1f}% vs fine-tuned only, "
              f"{100 * (fd['dog'] / fd['cfg'] - 1):+.1f}% vs CFG (lower is better)")
        print(f"(target FD and accuracy from {args.quality_samples} samples per mode: noisier than, and not "
              f"comparable with, the 3 x 1000-sample numbers in {results_path})")
    print()
    print(f"throughput, DoG w={thr['scale']:g}, batch {thr['batch']}, {thr['steps']} steps, 2 forwards per step:")
    print(f"  dgfast.sample (backend {args.backend}):  {thr['dgfast_samples_per_s']:8.2f} samples/s  "
          f"{thr['dgfast_ms_per_step']:8.2f} ms/step")
    if "reference_s" in thr:
        print(f"  reference two-pass loop:        {thr['reference_samples_per_s']:8.2f} samples/s  "
              f"{thr['reference_ms_per_step']:8.2f} ms/step   ({thr['reference']})")
        print(f"  speedup {thr['speedup']:.2f}x; max |dgfast - reference| over the samples = "
              f"{thr['max_abs_diff_vs_reference']:.2e}")


def run(args) -> int:
    from dgfast.zoo import data
    from dgfast.zoo.evaluate import sample_mode

    check_args(args)
    t_start = time.time()
    finetuned, pretrained, info = load_pair(args.zoo_dir)
    best = best_scales(args.zoo_dir)
    scales = {"finetuned": 1.0, "cfg": args.cfg_scale if args.cfg_scale is not None else best["cfg"],
              "dog": args.scale if args.scale is not None else best["dog"]}
    K = info["finetuned"]["config"]["num_classes"]
    classes = info["finetuned"]["classes"]
    os.makedirs(args.out, exist_ok=True)
    print(f"dgfast demo: embedded pair (pre-trained on {info['pretrained']['domain'].split(':')[0]}, "
          f"{info['pretrained']['params'] / 1e6:.2f}M params each), {K} target classes, steps {args.steps}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)

    # 1. the grid: every class, same noise for all three modes
    y = torch.arange(K, dtype=torch.int64).repeat_interleave(args.per_class)
    seeds = [args.seed * 10 ** 6 + i for i in range(len(y))]
    grid_images, grid_seconds = {}, {}
    for mode in ("finetuned", "cfg", "dog"):
        print(f"[1/3] grid: {len(y)} samples, {MODE_TITLES[mode]} (w={scales[mode]:g}) ...", flush=True)
        t0 = time.perf_counter()
        x = sample_mode(finetuned, pretrained, info, mode, scales[mode], y, seeds, steps=args.steps,
                        backend=args.backend)
        grid_seconds[mode] = round(time.perf_counter() - t0, 3)
        grid_images[mode] = data.to_uint8(x)
    domains = data.Domains()
    ref_imgs, ref_labels = domains.reference_target(renders_per_glyph=1)
    real = torch.cat([ref_imgs[ref_labels == k][: args.per_class] for k in range(K)])
    panels = [("held-out target (real)", data.to_uint8(real))]
    panels += [(f"{MODE_TITLES[m]}, w={scales[m]:g}", grid_images[m]) for m in ("finetuned", "cfg", "dog")]
    grid_path = os.path.join(args.out, "grid.png")
    make_grid(panels, [f"'{c}'" for c in classes], args.per_class).save(grid_path)

    # 2. quality per mode (fewer samples than RESULTS.md)
    quality = {}
    if args.quality_samples > 0:
        quality = mode_quality(finetuned, pretrained, info, scales, args.quality_samples, args.steps, args.seed,
                               args.backend, args.zoo_dir)

    # 3. throughput: DoG, dgfast.sample vs the reference two-pass loop
    print("[3/3] throughput: dgfast.sample" + ("" if args.no_reference else " vs the reference two-pass loop")
          + " ...", flush=True)
    thr = throughput(finetuned, pretrained, info, scales["dog"], args.steps, len(y), args.seed, args.backend,
                     with_reference=not args.no_reference)

    print_report(args, scales, quality, grid_seconds, thr)
    report = {
        "grid": os.path.abspath(grid_path), "classes": classes, "per_class": args.per_class, "steps": args.steps,
        "seed": args.seed, "scales": scales, "null_labels": {"cfg": info["finetuned"]["null_label"],
                                                             "dog": info["pretrained"]["null_label"]},
        "grid_seconds": grid_seconds, "quality": quality, "quality_samples": args.quality_samples,
        "quality_note": "few samples per mode: compare modes within this file; RESULTS.md has 3 x 1000",
        "throughput": thr, "backend": args.backend, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "quick": bool(args.quick), "seconds": round(time.time() - t_start, 2),
    }
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {grid_path} and {os.path.join(args.out, 'demo.json')} in {time.time() - t_start:.0f}s")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m dgfast.zoo.demo",
                                                   description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))  # usage line and exit 2, as argparse's own errors
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
