"""How DoG's gain depends on the length of the fine-tune: one fresh fine-tune per length, each scored.

    python -m dgfast.zoo.finetune_sweep          # about an hour on one core; ./zoo-eval/finetune_sweep.json
    python -m dgfast.zoo.finetune_sweep --update-shipped   # the same, into the package (RESULTS.md's table)

Every row fine-tunes the shipped pre-trained model exactly as `dgfast.zoo.train` does (same seed,
batch, learning rate and warm-up; only FINETUNE["steps"] changes, so the cosine schedule is the one
a run of that length gets) and scores fine-tuned-only and DoG at a few scales with the shipped
metric (one seed, 1000 samples per mode by default). The shipped length reproduces the shipped
fine-tuned model. Nothing is saved but the json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dgfast.zoo import ZOO_DIR, load_info, load_model
from dgfast.zoo.evaluate import output_dir

LENGTHS = (150, 400, 1000, 2000)  # 2000: the shipped length
SCALES = (1.35, 1.6, 2.0)
INTERVAL = (0.0, 0.5)       # DoG on the first half of the trajectory only (guidance_interval)
INTERVAL_SCALES = (2.0,)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgfast.zoo.finetune_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="fine-tune steps per row")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="DoG scales per row")
    p.add_argument("--interval", type=float, nargs=2, default=list(INTERVAL),
                   help="guidance_interval of the extra DoG rows (default 0 0.5)")
    p.add_argument("--interval-scales", type=float, nargs="*", default=list(INTERVAL_SCALES),
                   help="scales of the extra DoG rows with --interval (default 2)")
    p.add_argument("--samples", type=int, default=1000, help="samples per mode")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (noise of sample i: seed * 10**6 + i)")
    p.add_argument("--steps", default="50", help="sampling steps (DiT respacing string)")
    p.add_argument("--zoo-dir", default=None)
    p.add_argument("--out", default=None, help="json path (default ./zoo-eval/finetune_sweep.json, where "
                   "python -m dgfast.zoo.evaluate's RESULTS.md picks it up)")
    p.add_argument("--update-shipped", action="store_true", help="write the package's own finetune_sweep.json")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(n <= 0 for n in args.lengths):
        p.error(f"--lengths must be positive step counts, got {args.lengths}")
    try:
        output_dir(args.out, args.update_shipped)  # the two flags exclude each other
    except ValueError as err:
        p.error(str(err))
    # never the package's own file unless asked: a trial run would replace the shipped table
    out = args.out or os.path.join(output_dir(None, args.update_shipped), "finetune_sweep.json")
    from dgfast.zoo import data, train
    from dgfast.zoo.evaluate import balanced_labels, sample_mode
    from dgfast.zoo.metrics import load_metric

    zoo_dir = args.zoo_dir or ZOO_DIR
    info = load_info(zoo_dir)
    pretrained = load_model("pretrained", zoo_dir)
    metric = load_metric(zoo_dir)
    domains = data.Domains()
    K = len(data.TARGET_DIGITS)
    y = balanced_labels(args.samples, K)
    seeds = [args.seed * 10 ** 6 + i for i in range(args.samples)]
    rows, t_start = [], time.time()
    print(f"{'ft steps':>8s} {'mode':10s} {'scale':>5s} {'target FD':>10s} {'accuracy':>9s}", flush=True)
    for n in args.lengths:
        cfg = dict(train.FINETUNE, steps=n)
        model = train.finetune_from(pretrained, data.TARGET_DIGITS, cfg["seed"])
        finetuned, log = train.train_diffusion(model, domains.target_batch, cfg, "finetune", log_every=10 ** 9)
        full = (0.0, 1.0)
        runs = ([("finetuned", 1.0, full)] + [("dog", s, full) for s in args.scales]
                + [("dog", s, tuple(args.interval)) for s in args.interval_scales])
        for mode, w, interval in runs:
            x = sample_mode(finetuned, pretrained, info, mode, w, y, seeds, steps=args.steps,
                            guidance_interval=interval)
            r = metric(x, y)
            name = mode if interval == full else f"{mode} {interval[0]:g}-{interval[1]:g}"
            rows.append({"finetune_steps": n, "mode": name, "scale": w, "guidance_interval": list(interval),
                         "fd": r["fd"], "accuracy": r["accuracy"], "finetune_seconds": log["seconds"]})
            print(f"{n:8d} {name:10s} {w:5g} {r['fd']:10.3f} {r['accuracy']:9.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"setup": {"finetune": dict(train.FINETUNE), "samples": args.samples, "seed": args.seed,
                             "steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
                             "seconds": round(time.time() - t_start, 1)}, "rows": rows}, f, indent=1)
    print(f"wrote {out} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
