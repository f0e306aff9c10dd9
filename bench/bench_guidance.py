"""Guidance controls that skip pre-trained forwards, side by side with full guidance in one group:

    full            DoG on every step (the baseline)
    interval 0-0.5  guidance_interval=(0.0, 0.5): the pre-trained model runs on the first half only
    every 2         pretrained_every=2: the pre-trained output is computed every other step, reused between
    cfg             mode="cfg": the fine-tuned model with its own null label (the paper's baseline)

    pytest bench/bench_guidance.py --benchmark-only --benchmark-columns=min,median,rounds

Same DiT pair, latents, sampler and step count for every variant (DPM-Solver++(2M), 20 steps);
extra_info holds the number of model forwards each variant ran. Compare on min (noisy 2-core box).
The models are the embedded pair (dgfast.zoo) when its files are present, else random DiTs of the
same shape family (what the timing depends on; the numbers themselves say nothing about quality).

`python bench/bench_guidance.py [--n 500]` measures what the savings cost: target FD / accuracy on
the embedded pair (dgfast.zoo.metrics), or, without it, each variant's distance to full guidance.
"""
import pytest
import torch

import dgfast

VARIANTS = {
    "full": dict(),
    "interval 0-0.5": dict(guidance_interval=(0.0, 0.5)),
    "every 2": dict(pretrained_every=2),
    "cfg": dict(mode="cfg"),
}
STEPS = 20


def _random_pair(device):
    torch.manual_seed(0)
    cfg = dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=2)
    ft = dgfast.DiT(num_classes=10, **cfg)
    pre = dgfast.DiT(num_classes=1000, **cfg)
    for m in (ft, pre):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.02)
    return ft.to(device).eval(), pre.to(device).eval(), 1000, "random DiT pair (hidden 64, depth 3, 8x8/2)"


@pytest.fixture(scope="module")
def setup():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from dgfast import zoo
        ft, pre, info = zoo.load_pair(device=device)
        null, what = info["pretrained"]["null_label"], "dgfast.zoo embedded pair"
    except Exception:  # zoo files not shipped in this checkout
        ft, pre, null, what = _random_pair(device)
    n = 4 if device == "cpu" else 64
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, ft.in_channels, ft.input_size, ft.input_size, generator=g).to(device)
    y = torch.randint(0, ft.num_classes, (n,), generator=g).to(device)
    return dict(ft=ft, pre=pre, null=null, z=z, y=y, device=device, models=what)


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):  # in_channels, input_size, ... for sample()'s checks
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args):
        self.calls += 1
        return self.model(*args)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_guidance_savings(benchmark, setup, variant):
    s = setup
    kw = dict(guidance_scale=1.5, steps=str(STEPS), sampler="dpm2m", guidance_channels="all", **VARIANTS[variant])
    pre = None if kw.get("mode") == "cfg" else s["pre"]
    null = {} if pre is None else dict(null_label=s["null"])

    def run():
        out = dgfast.sample(s["ft"], pre, s["z"], s["y"], **kw, **null)
        if s["device"] == "cuda":
            torch.cuda.synchronize()
        return out

    # forwards per call, counted on an unpaired run (the paired model batches the two branches)
    ft_c, pre_c = Counting(s["ft"]), Counting(s["pre"]) if pre is not None else None
    dgfast.sample(ft_c, pre_c, s["z"], s["y"], **kw, paired=False, **null)
    benchmark.group = f"dgfast-guidance {s['device']} n={len(s['z'])} steps={STEPS}"
    benchmark.extra_info.update(models=s["models"], device=s["device"], torch=torch.__version__,
                                finetuned_forwards=ft_c.calls, pretrained_forwards=pre_c.calls if pre_c else 0)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------
# Quality of the savings (not a benchmark: run as a script)
# ----------------------------------------------------------------------------------------------

QUALITY_VARIANTS = {  # full and unguided first: the others are measured between the two
    "full": dict(),
    "unguided (w=1)": dict(guidance_scale=1.0),
    "every 2": dict(pretrained_every=2),
    "every 3": dict(pretrained_every=3),
    "every 4": dict(pretrained_every=4),
    "interval 0-0.5": dict(guidance_interval=(0.0, 0.5)),
    "interval 0.2-0.8": dict(guidance_interval=(0.2, 0.8)),
}


def quality_study(n: int = 500, steps: int = STEPS, scale: float = 1.5, batch: int = 250, zoo_dir=None):
    """Per variant: seconds, pre-trained forwards, and how far its samples are from full guidance:
    `effect_lost` = |x - x_full| / |x_unguided - x_full| (0: all of DoG's change kept, 1: none), plus
    target FD / accuracy when the embedded pair and its metric are there."""
    import time
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = None
    try:
        from dgfast import zoo
        ft, pre, info = zoo.load_pair(zoo_dir, device=device)
        null, what = info["pretrained"]["null_label"], f"dgfast.zoo pair ({zoo_dir or 'embedded'})"
    except Exception as err:
        ft, pre, null, what = _random_pair(device)
        what += f" (zoo unavailable: {type(err).__name__}; distances only, no quality metric)"
    else:
        try:
            from dgfast.zoo.metrics import load_metric
            metric = load_metric(zoo_dir)
        except Exception as err:  # e.g. an encoder file from another version of the metric
            what += f" (metric unavailable: {type(err).__name__}; distances only)"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, ft.in_channels, ft.input_size, ft.input_size, generator=g).to(device)
    y = torch.randint(0, ft.num_classes, (n,), generator=g).to(device)
    print(f"{what}; n={n}, DPM-Solver++(2M) {steps} steps, w={scale}, device={device}")
    dgfast.sample(ft, pre, z[:2], y[:2], guidance_scale=scale, steps="3", sampler="dpm2m", null_label=null)  # warm-up
    results, outs = {}, {}
    for name, extra in QUALITY_VARIANTS.items():
        kw = dict(guidance_scale=scale, steps=str(steps), sampler="dpm2m", guidance_channels="all", null_label=null)
        kw.update(extra)
        t0 = time.perf_counter()
        out = torch.cat([dgfast.sample(ft, pre, z[i:i + batch], y[i:i + batch], **kw) for i in range(0, n, batch)])
        secs = time.perf_counter() - t0
        counter = Counting(pre)
        dgfast.sample(ft, counter, z[:1], y[:1], **kw, paired=False)
        outs[name] = out
        full = outs["full"]
        row = dict(seconds=round(secs, 2), pretrained_forwards=counter.calls)
        if "unguided (w=1)" in outs:
            lost = (out - full).norm() / (outs["unguided (w=1)"] - full).norm()
            row["effect_lost"] = round(float(lost), 4)
        if metric is not None:
            row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in metric(out.cpu(), y.cpu()).items()})
        results[name] = row
        print(f"  {name:18s} {row}", flush=True)
    return results


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--zoo-dir", default=None, help="a dgfast.zoo.train output (default: the embedded pair)")
    args = parser.parse_args()
    quality_study(args.n, args.steps, args.scale, zoo_dir=args.zoo_dir)
