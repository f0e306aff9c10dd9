"""Measure the embedded pair: target FD and class accuracy of fine-tuned-only, CFG and DoG sampling.

    python -m dgfast.zoo.evaluate            # 3 seeds x 1000 samples per mode -> ./zoo-eval/RESULTS.md, results.json
    python -m dgfast.zoo.evaluate --update-shipped   # the same, into the package (the shipped model card)
    python -m dgfast.zoo.evaluate --jobs 3 --threads 1   # one process per seed, side by side; the same table

Every mode samples the same labels (balanced over the five target classes) from the same noise
(noise="per-sample": sample i of seed s uses generator s * 10**6 + i in every mode), so the
modes differ only by their guidance. Modes:

- finetuned: the fine-tuned model alone (guidance scale 1), as the paper's fine-tuning baseline;
- cfg w:     classifier-free guidance with the fine-tuned model's own null label (5);
- dog w:     Domain Guidance, the pre-trained model's null label (10) as the guiding branch.

Rows for context: "real target (train glyphs)" scores fresh target-style renders of the
train-split target glyphs (what a generator that had learnt the target domain exactly from the
train glyphs would score, a floor); "pretrained" samples the pre-trained model's unconditional
(null) branch (the source domain; the ceiling of "did not transfer at all").
The metric: dgfast.zoo.metrics (encoder features, reference = held-out target glyphs).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch

import dgfast
from dgfast.zoo import ZOO_DIR, load_info, load_pair

DEFAULT_STEPS = "50"
SCALES = (1.1, 1.25, 1.5, 2.0, 2.5, 3.0)
DEFAULT_OUT = "zoo-eval"  # under the current directory: a run never rewrites the shipped files by accident
MIN_FD_SAMPLES = 2        # the FD needs a covariance (FD from so few samples is noisy, but defined)


def check_steps(steps) -> None:
    """A DiT respacing string dgfast.sample accepts, else a ValueError naming --steps."""
    try:
        dgfast.Schedule.from_steps(steps)
    except (TypeError, ValueError) as err:
        msg = str(err)  # dgfast's messages start "steps: ..."; name the flag
        raise ValueError("--" + msg if msg.startswith("steps") else f"--steps: {msg}") from None


def check_zoo_dir(zoo_dir) -> None:
    if zoo_dir is not None and not os.path.isfile(os.path.join(zoo_dir, "zoo.json")):
        raise ValueError(f"--zoo-dir {zoo_dir!r} holds no embedded pair (no zoo.json there)")


def output_dir(out, update_shipped: bool) -> str:
    """--out, or the package folder with --update-shipped (the two exclude each other)."""
    if update_shipped and out is not None:
        raise ValueError("--out and --update-shipped exclude each other (--update-shipped writes into the package)")
    return ZOO_DIR if update_shipped else (out or DEFAULT_OUT)


def fd_change(fd: float, baseline: float) -> str:
    """'12.3% lower' / '4.5% higher': the FD against the fine-tuned-only baseline, in words that
    match its sign."""
    change = 100 * (fd / baseline - 1)
    return f"{abs(change):.1f}% {'lower' if change < 0 else 'higher'}"


def mode_args(mode: str, scale: float, info: dict) -> dict:
    """dgfast.sample keyword arguments for a mode: "finetuned", "cfg" or "dog"."""
    if mode == "finetuned":
        return {"guidance_scale": 1.0}
    if mode == "cfg":
        return {"guidance_scale": scale, "mode": "cfg", "cfg_null_label": info["finetuned"]["null_label"]}
    if mode == "dog":
        return {"guidance_scale": scale, "null_label": info["pretrained"]["null_label"]}
    raise ValueError(f"mode must be 'finetuned', 'cfg' or 'dog', got {mode!r}")


@torch.no_grad()
def sample_mode(finetuned, pretrained, info, mode: str, scale: float, y: torch.Tensor, seeds, *,
                steps=DEFAULT_STEPS, backend="auto", batch: int = 500, **extra) -> torch.Tensor:
    """Samples (n, 3, size, size) in [-1, 1] for labels y; sample i depends only on seeds[i].
    extra: more dgfast.sample keywords (e.g. pretrained_every)."""
    guide = pretrained if mode == "dog" else None  # CFG: the fine-tuned model guides itself
    out = []
    for i in range(0, len(y), batch):
        out.append(dgfast.sample(finetuned, guide, None, y[i:i + batch], steps=steps, guidance_channels="all",
                                 noise="per-sample", seeds=list(seeds[i:i + batch]), backend=backend,
                                 **mode_args(mode, scale, info), **extra))
    return torch.cat(out)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % num_classes


def sample_seeds(seed: int, n: int) -> list:
    """The per-sample seeds of run `seed`: sample i uses generator seed * 10**6 + i (every mode alike)."""
    return [seed * 10 ** 6 + i for i in range(n)]


def summarize(values):
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": [float(v) for v in a]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dgfast.zoo.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000, help="samples per mode and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", default=DEFAULT_STEPS, help="sampling steps (DiT respacing string)")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument("--zoo-dir", default=None, help="where the .safetensors are (default: the package's)")
    p.add_argument("--out", default=None, help=f"where RESULTS.md and results.json go (default ./{DEFAULT_OUT})")
    p.add_argument("--update-shipped", action="store_true",
                   help="write the package's own RESULTS.md and results.json (the shipped model card)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 0.5],
                   help="guidance_interval of the extra DoG rows (default 0 0.5: the first half of the steps)")
    p.add_argument("--interval-scales", type=float, nargs="*", default=[1.5, 2.0, 3.0],
                   help="scales of the extra DoG rows with --interval")
    p.add_argument("--every", type=int, nargs="*", default=[2, 4],
                   help="also score the best DoG scale with pretrained_every=k for these k (issue: branch reuse)")
    p.add_argument("--threads", type=int, help="torch threads (of each process, with --jobs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="sample the seeds in this many processes side by side (each seed's rows are independent "
                        "of the others: the table is the one a single process makes, to float tolerance)")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite RESULTS.md from results.json (and finetune_sweep.json) without sampling")
    return p


def _context_rows(args, pretrained, info: dict, metric, K: int, per_seed: dict) -> None:
    """The context rows of every seed into per_seed: real target renders (train glyphs) and the
    pre-trained model's null branch."""
    from dgfast.zoo import data
    domains = data.Domains()
    target_train = domains.train_idx[np.isin(domains.digits[domains.train_idx], data.TARGET_DIGITS)]
    for s in args.seeds:
        g = torch.Generator().manual_seed(10_000 + s)
        idx = target_train[torch.randint(0, len(target_train), (args.samples,), generator=g).numpy()]
        lab = torch.tensor([data.TARGET_DIGITS.index(int(d)) for d in domains.digits[idx]])
        real = data.render(domains.glyphs[idx], **data.target_style(args.samples, g))
        per_seed.setdefault("real target (train glyphs)", []).append(metric(real, lab))
        seeds = sample_seeds(s, args.samples)
        null = torch.full((args.samples,), info["pretrained"]["null_label"], dtype=torch.int64)
        x = dgfast.sample(pretrained, None, None, null, guidance_scale=1.0, steps=args.steps,
                          guidance_channels="all", noise="per-sample", seeds=seeds, backend=args.backend)
        # its "labels" for accuracy are meaningless; report the FD only
        per_seed.setdefault("pretrained (source, null label)", []).append(
            {**metric(x, balanced_labels(args.samples, K)), "accuracy": float("nan")})


def summarize_rows(per_seed: dict) -> dict:
    """Mean, std and values of each row's FD, accuracy (and seconds, for timed rows) over the seeds."""
    return {key: {"fd": summarize([r["fd"] for r in rows]), "accuracy": summarize([r["accuracy"] for r in rows]),
                  **({"seconds": summarize([r["seconds"] for r in rows])} if "seconds" in rows[0] else {})}
            for key, rows in per_seed.items()}


def best_rows(summary: dict, with_interval: bool) -> dict:
    """The lowest-FD row of each mode over the whole trajectory (keys "cfg w" / "dog w"), and of the
    interval rows when there are any."""
    groups = {m: [k for k in summary if k.startswith(m + " ") and len(k.split()) == 2] for m in ("cfg", "dog")}
    if with_interval:
        groups["dog interval"] = [k for k in summary if k.startswith("dog ") and " interval " in k]
    return {m: min(keys, key=lambda k: summary[k]["fd"]["mean"]) for m, keys in groups.items()}


def _score(args, finetuned, pretrained, info, metric, K: int, per_seed: dict, key: str, mode: str, w: float,
           **extra) -> None:
    """One table row into per_seed: `mode` at scale w (plus dgfast.sample keywords) for every seed;
    the per-sample noise makes a row independent of the order rows (and seeds) are run in."""
    y = balanced_labels(args.samples, K)
    for s in args.seeds:
        seeds = sample_seeds(s, args.samples)
        t0 = time.time()
        x = sample_mode(finetuned, pretrained, info, mode, w, y, seeds, steps=args.steps, backend=args.backend, **extra)
        r = {**metric(x, y), "seconds": round(time.time() - t0, 2)}
        per_seed.setdefault(key, []).append(r)
        print(f"seed {s}  {key:12s}  FD {r['fd']:8.3f}  acc {r['accuracy']:.3f}  wash {r['wash']:.3f}  "
              f"({r['seconds']:.0f}s)", flush=True)


def _pair_once(args, finetuned, pretrained, info, K: int) -> None:
    """Pairing the two models (weight prepacking) happens on the first guided call: a tiny one here
    keeps it out of the timed rows."""
    sample_mode(finetuned, pretrained, info, "dog", 2.0, balanced_labels(2, K), [0, 1], steps="2", backend=args.backend)


def _sweep_rows(args, finetuned, pretrained, info, metric, K: int, per_seed: dict) -> None:
    """The fine-tuned row, CFG and DoG at every scale, and the DoG rows on part of the trajectory."""
    full, part = (0.0, 1.0), tuple(args.interval)
    runs = ([("finetuned", 1.0, full)] + [(m, w, full) for m in ("cfg", "dog") for w in args.scales]
            + [("dog", w, part) for w in args.interval_scales])
    _pair_once(args, finetuned, pretrained, info, K)
    for mode, w, interval in runs:
        key = mode if mode == "finetuned" else f"{mode} {w:g}"
        if interval != full:
            key += f" interval {interval[0]:g}-{interval[1]:g}"
        _score(args, finetuned, pretrained, info, metric, K, per_seed, key, mode, w, guidance_interval=interval)


def child_argv(args, seed: int, out: str) -> list:
    """The command line of one seed's process: this run's settings but the --every rows (they need the
    best scale over all seeds: the parent scores them)."""
    argv = ["--samples", str(args.samples), "--seeds", str(seed), "--steps", args.steps, "--out", out,
            "--backend", args.backend, "--interval", *map(str, args.interval), "--every", "--jobs", "1",
            "--scales", *map(str, args.scales), "--interval-scales", *map(str, args.interval_scales)]
    if args.zoo_dir:
        argv += ["--zoo-dir", args.zoo_dir]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def sweep_in_processes(args) -> dict:
    """The context and sweep rows of every seed, sampled by one process per seed (--jobs at a time):
    per_seed with each row's values in the order of args.seeds."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="dgfast-evaluate-") as tmp:
        outs = {s: os.path.join(tmp, f"seed{s}") for s in args.seeds}
        queue, running = list(args.seeds), {}
        while queue or running:
            while queue and len(running) < args.jobs:
                s = queue.pop(0)
                cmd = [sys.executable, "-m", "dgfast.zoo.evaluate", *child_argv(args, s, outs[s])]
                running[s] = subprocess.Popen(cmd)
            s, proc = next(iter(running.items()))
            if proc.wait() != 0:
                for other in running.values():
                    other.kill()
                raise RuntimeError(f"--jobs: the process of seed {s} failed (exit {proc.returncode}); its output "
                                   f"is above")
            del running[s]
        per_seed: dict[str, list[dict]] = {}
        for s in args.seeds:
            with open(os.path.join(outs[s], "results.json")) as f:
                for key, rows in json.load(f)["per_seed"].items():
                    per_seed.setdefault(key, []).extend(rows)
    return per_seed


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))  # usage line and exit 2, as argparse's own errors
    if args.markdown_only:
        return write_markdown(args.out, load_info(args.zoo_dir))
    if args.threads:
        torch.set_num_threads(args.threads)
    from dgfast.zoo.metrics import load_metric

    finetuned, pretrained, info = load_pair(args.zoo_dir)
    metric = load_metric(args.zoo_dir or ZOO_DIR)
    K = info["finetuned"]["config"]["num_classes"]
    t_start = time.time()
    if args.jobs > 1 and len(args.seeds) > 1:
        try:
            per_seed = sweep_in_processes(args)
        except RuntimeError as err:
            print(f"{p.prog}: {err}", file=sys.stderr)
            return 1
    else:
        per_seed = {}
        _context_rows(args, pretrained, info, metric, K, per_seed)
        _sweep_rows(args, finetuned, pretrained, info, metric, K, per_seed)
    score = functools.partial(_score, args, finetuned, pretrained, info, metric, K, per_seed)

    summary = summarize_rows(per_seed)
    ft = summary["finetuned"]["fd"]
    best = best_rows(summary, bool(args.interval_scales))
    for m, k in best.items():
        print(f"best {m}: {k}: FD {summary[k]['fd']['mean']:.3f} +- {summary[k]['fd']['std']:.3f} vs fine-tuned "
              f"{ft['mean']:.3f} +- {ft['std']:.3f} ({fd_change(summary[k]['fd']['mean'], ft['mean'])})")
    # pre-trained-branch reuse at the best DoG scale: quality and time against evaluating it every step
    w_best = float(best["dog"].split()[1])
    if args.every:
        _pair_once(args, finetuned, pretrained, info, K)
    for k in args.every:
        score(f"dog {w_best:g} every {k}", "dog", w_best, pretrained_every=k)
    summary = summarize_rows(per_seed)
    for k in best.values():
        summary[k]["best_of_sweep"] = True
    result = {
        "setup": {"samples_per_mode_and_seed": args.samples, "seeds": args.seeds, "steps": args.steps,
                  "sampler": "ddpm (learned-range variance)", "guidance_channels": "all",
                  "noise": "per-sample, seed s * 10**6 + i, shared by all modes", "labels": "balanced, 5 classes",
                  "reference": "held-out target glyphs x4 target-style renders",
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "jobs": min(args.jobs, len(args.seeds)), "seconds": round(time.time() - t_start, 1)},
        "best": best, "summary": summary, "per_seed": per_seed,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(args.out, info)
    print(f"sampling and scoring took {time.time() - t_start:.0f}s")
    return 0


def check_args(args) -> None:
    """One-line errors naming the flag; resolves args.out."""
    if args.samples < MIN_FD_SAMPLES:
        raise ValueError(f"--samples must be >= {MIN_FD_SAMPLES} (the FD needs a covariance), got {args.samples}")
    if any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be >= 0, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    check_steps(args.steps)
    check_zoo_dir(args.zoo_dir)
    args.out = output_dir(args.out, args.update_shipped)
    if args.markdown_only and not os.path.isfile(os.path.join(args.out, "results.json")):
        raise ValueError(f"--markdown-only: no results.json in {args.out}")


def write_markdown(out_dir: str, info: dict) -> int:
    """RESULTS.md from out_dir/results.json, plus the fine-tune-length table when
    finetune_sweep.json (python -m dgfast.zoo.finetune_sweep) is there."""
    with open(os.path.join(out_dir, "results.json")) as f:
        text = results_markdown(json.load(f), info)
    sweep_path = os.path.join(out_dir, "finetune_sweep.json")
    if os.path.isfile(sweep_path):
        with open(sweep_path) as f:
            text += "\n" + sweep_markdown(json.load(f), info)
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


def sweep_markdown(sweep: dict, info: dict) -> str:
    """The fine-tune-length table: one row per length, FD per mode, the best DoG's change."""
    s, rows = sweep["setup"], sweep["rows"]
    lengths = sorted({r["finetune_steps"] for r in rows})
    cols = []
    for r in rows:
        c = (r["mode"], r["scale"])
        if c not in cols:
            cols.append(c)
    shipped = info["finetuned"]["train"]["steps"]
    head = " | ".join("fine-tuned only" if m == "finetuned" else f"{m} {w:g}" for m, w in cols)
    lines = ["## How the gain depends on the fine-tune's length (python -m dgfast.zoo.finetune_sweep)", "",
             f"Each row is a fresh fine-tune of the shipped pre-trained model, as `dgfast.zoo.train` makes it "
             f"(batch {s['finetune']['batch']}, lr {s['finetune']['lr']:g}, warm-up {s['finetune']['warmup']}, "
             f"EMA {s['finetune']['ema']}, seed {s['finetune']['seed']}) but for the number of steps in the first "
             f"column; the shipped model is the {shipped}-step row. Target FD, {s['samples']} samples per cell, "
             f"one sampling seed ({s['seed']}), {s['steps']} steps; \"dog 0-0.5\" is DoG on the first half of "
             f"the steps only. torch {s['torch']}, {s['threads']} threads, {s['seconds']:.0f} s.", "",
             f"| fine-tune steps | {head} | best DoG vs fine-tuned |",
             "|---:|" + "---:|" * (len(cols) + 1)]
    for n in lengths:
        by = {(r["mode"], r["scale"]): r for r in rows if r["finetune_steps"] == n}
        ft = by[("finetuned", 1.0)]["fd"]
        dog = min((r["fd"], m, w) for (m, w), r in by.items() if m == "dog")
        cells = " | ".join(f"{by[c]['fd']:.2f}" if c in by else "" for c in cols)
        mark = " (shipped)" if n == shipped else ""
        lines.append(f"| {n}{mark} | {cells} | {100 * (dog[0] / ft - 1):+.1f}% (w={dog[2]:g}) |")
    return "\n".join(lines) + "\n"


def jobs_text(setup: dict) -> str:
    jobs = setup.get("jobs", 1)
    return f" in each of {jobs} processes side by side (one per seed; wall seconds are of a shared machine)" \
        if jobs > 1 else ""


def results_markdown(result: dict, info: dict) -> str:
    s, summ = result["setup"], result["summary"]
    ft = summ["finetuned"]["fd"]["mean"]
    lines = [
        "# Embedded pair: target FD and accuracy (python -m dgfast.zoo.evaluate)", "",
        f"{s['samples_per_mode_and_seed']} samples per mode and seed, seeds {s['seeds']}, {s['steps']} DDPM steps "
        f"(learned-range variance), guidance on all channels, per-sample noise shared by all modes, balanced "
        f"labels over the 5 target classes. FD: Fréchet distance of encoder features to the held-out target "
        f"images ({s['reference']}); accuracy: the encoder's digit head reads the requested class "
        f"(dgfast/zoo/metrics.py explains the encoder). Mean ± standard deviation over the seeds; "
        f"lower FD is better. torch {s['torch']}, {s['threads']} threads{jobs_text(s)}, {s['seconds']:.0f} s.", "",
        "| mode | scale | target FD | vs fine-tuned | accuracy | s per 1000 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in summ.items():
        mode, _, scale = key.partition(" ")
        if key.startswith("real") or key.startswith("pretrained"):
            mode, scale = key, ""
        elif " interval " in scale:  # "2 interval 0-0.5": guided on that fraction of the steps only
            scale, _, span = scale.partition(" interval ")
            mode = f"{mode}, guided on steps {span.replace('-', ' to ')} of the run only"
        elif " every " in scale:
            scale, _, k = scale.partition(" every ")
            mode = f"{mode}, pre-trained branch every {k} steps"
        fd, acc = r["fd"], r["accuracy"]
        rel = "" if key.startswith(("real", "pretrained")) else f"{100 * (fd['mean'] / ft - 1):+.1f}%"
        acc_s = "—" if np.isnan(acc["mean"]) else f"{acc['mean']:.3f} ± {acc['std']:.3f}"
        bold = "**" if r.get("best_of_sweep") else ""
        secs = f"{r['seconds']['mean'] * 1000 / s['samples_per_mode_and_seed']:.1f}" if "seconds" in r else ""
        lines.append(f"| {bold}{mode}{bold} | {scale or ('1' if mode == 'finetuned' else '')} | "
                     f"{bold}{fd['mean']:.3f} ± {fd['std']:.3f}{bold} | {rel} | {acc_s} | {secs} |")
    lines += ["", "Bold: the best scale of each group (CFG, DoG, DoG on part of the trajectory). \"guided on "
              "steps a to b\": guidance_interval=(a, b), the fraction of the sampling steps (first = noisiest) "
              "where DoG is applied; the pre-trained model is not run on the others. \"pre-trained branch "
              "every k steps\": pretrained_every=k at the best DoG scale, its output reused in between. "
              "s per 1000: wall seconds to sample 1000 images in that mode, measured in this run; compare within "
              "the table only.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
