"""End-to-end DoG sampling on CPU: dgfast against the upstream loop and its peers, side by side.

One run, one group per (pair, latent), four rows per group:
  upstream eager      the DiT/DoG scripts' loop: ReferenceDiT models (upstream's module tree, as
                      DiT's models.py on timm builds it) + ReferenceDiffusion.p_sample_loop with the
                      DoG script's closure (two batch-n forwards per step)
  upstream compile    the same loop with torch.compile'd models: the peer a user would reach for
  dgfast              dgfast.sample given the *upstream modules* (the README's drop-in path: dgfast
                      converts them, sharing their tensors, and runs its paired forward)
  dgfast compile      dgfast.sample(..., compile=True)
Pairs: DiT-S/2 full fine-tune (every tensor differs from the pre-trained one: the hardest case
for pairing) and a LoRA fine-tune (peft, rank 16 on qkv/proj/fc1/fc2). Random weights in
upstream layout, same latents, labels and seed, fp32, batch 8, latent 32 (4 steps) and 16 (10
steps). Every row asserts its samples agree with the eager loop within 1e-4 relative; extra_info
holds the CPU's model and ISA flags. `python bench/ratios.py <json>` prints the ratio table.

    make bench    # = pytest bench --benchmark-only ... --benchmark-json=.benchmarks/latest.json
    python bench/bench_sample.py --profile [--latent 32]   # torch.profiler tables (bench/RESULTS.md)

Time with one thread (OMP_NUM_THREADS=1): two-thread runs on a 2-core VM swing. Env:
DGFAST_BENCH_STEPS (overrides both latents' step counts), DGFAST_BENCH_ROUNDS (default 4; each row is
timed once per round, rounds interleaved: see test_sample). With
--benchmark-disable (make test) each body runs once with 2 steps, at latent 16 only (compile rows:
full pair only).
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dgfast
from dgfast import convert
from dgfast.adapters import to_dgfast
from dgfast.gemm_choice import machine_id
from dgfast.pair_cache import get_pair
from dgfast.reference import ReferenceDiffusion, ReferenceDiT_models, dog_guidance_fn

MODEL = "DiT-S/2"
N = 8
SCALE = 1.5
NULL = 1000
FT_CLASSES = 101
SEED = 0
STEPS = {32: "4", 16: "10"}  # per latent: a few seconds per round on one thread
ROUNDS = int(os.environ.get("DGFAST_BENCH_ROUNDS", "4"))
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """Upstream init leaves adaLN and the output layer at zero (every block an identity): give
    every zero-initialised tensor random values so all layers do real work."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and not p.abs().gt(0).any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_models(latent: int, model: str = MODEL):
    """(reference ft, reference pre, dgfast ft, dgfast pre): same weights, upstream layout, float32
    on the CPU (bench/gpu_e2e.py builds its DiT-XL/2 pair here too)."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    ref_pre = ReferenceDiT_models[model](input_size=latent, num_classes=1000).eval()
    randomize(ref_pre, gen)
    ref_ft = ReferenceDiT_models[model](input_size=latent, num_classes=FT_CLASSES).eval()
    sd = {}
    for k, v in ref_pre.state_dict().items():  # a full fine-tune: every tensor moved a little
        if k == "y_embedder.embedding_table.weight":
            sd[k] = torch.randn(FT_CLASSES + 1, v.shape[1], generator=gen) * 0.02  # new domain's labels
        elif k == "pos_embed":
            sd[k] = v.clone()
        else:
            sd[k] = v + torch.randn(v.shape, generator=gen) * (0.1 * float(v.std()) + 1e-3)
    ref_ft.load_state_dict(sd)
    dg_ft, dg_pre = to_dgfast(ref_ft).eval(), to_dgfast(ref_pre).eval()
    return ref_ft, ref_pre, dg_ft, dg_pre


def build_lora_pair(latent: int, rank: int = 16):
    """(LoRA fine-tune, pre-trained) in upstream layout: peft LoRA adapters (rank 16) on every
    block's qkv/proj/fc1/fc2 over the pre-trained weights, lora_B random (peft starts it at zero,
    which would make the fine-tune the pre-trained model), plus the new domain's label table."""
    from peft import LoraConfig, inject_adapter_in_model
    ref_ft0, ref_pre, _, _ = models_for("full", latent)
    ref_ft = ReferenceDiT_models[MODEL](input_size=latent, num_classes=FT_CLASSES).eval()
    sd = dict(ref_pre.state_dict())
    sd["y_embedder.embedding_table.weight"] = ref_ft0.state_dict()["y_embedder.embedding_table.weight"]
    ref_ft.load_state_dict(sd)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv", "proj", "fc1", "fc2"])
    ref_ft = inject_adapter_in_model(config, ref_ft).eval()
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in ref_ft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return ref_ft, ref_pre


def cpu_info() -> dict:
    """The CPU's model name and the ISA flags that decide GEMM and SIMD speed (recorded with every figure)."""
    info = {"cpu": "unknown", "isa": ""}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] == "unknown":
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            flags = value.split()
            info["isa"] = " ".join(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
            break
    return info


def inputs(latent: int):
    gen = torch.Generator().manual_seed(SEED + 1)
    z = torch.randn(N, 4, latent, latent, generator=gen)
    y = torch.randint(0, FT_CLASSES, (N,), generator=gen)
    return z, y


def run_reference(ref_ft, ref_pre, z, y, steps="2"):
    """The DoG script's loop: doubled batch, closure with two separate forwards, p_sample_loop."""
    torch.manual_seed(SEED)
    diffusion = ReferenceDiffusion(steps)
    n = len(z)
    model_kwargs = dict(y=torch.cat([y, torch.full((n,), FT_CLASSES)]), cfg_scale=SCALE)
    out = diffusion.p_sample_loop(dog_guidance_fn(ref_ft, ref_pre, null=NULL, channels=3), (2 * n, *z.shape[1:]),
                                  torch.cat([z, z]), clip_denoised=False, model_kwargs=model_kwargs, device=z.device)
    return out[:n]


def run_dgfast(ft, pre, z, y, steps="2", paired=True, **kwargs):
    """dgfast.sample as the README tells users to call it (ft, pre: upstream modules or dgfast DiTs)."""
    torch.manual_seed(SEED)
    return dgfast.sample(ft, pre, z, y, guidance_scale=SCALE, steps=steps, guidance_channels=3,
                         null_label=NULL, paired=paired, **kwargs)


def run_dgfast_two_pass(dg_ft, dg_pre, z, y, steps="2"):
    """dgfast's DiT and fused step, but the two models as two separate forwards (paired=False)."""
    return run_dgfast(dg_ft, dg_pre, z, y, steps=steps, paired=False)


# ----------------------------------------------------------------------------------------------
# aten op counts
# ----------------------------------------------------------------------------------------------

class CountOps(TorchDispatchMode):
    """Counts aten ops as dispatched (views and in-place ops included)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def op_counts(models, latent: int) -> dict:
    """aten ops per sampler step and per model forward (reference: the DoG closure = two
    forwards; dgfast: one paired forward). Per step is marginal: (ops of a 4-step run - ops of a
    2-step run) / 2, so one-time work (pairing, input checks, schedule tables) is not counted."""
    ref_ft, ref_pre, dg_ft, dg_pre = models
    z, y = inputs(latent)
    n = len(z)
    counts = {}
    for name, run, args in (("reference", run_reference, (ref_ft, ref_pre)), ("dgfast", run_dgfast, (dg_ft, dg_pre))):
        run(*args, z, y, steps="2")  # warm: the pair is built and cached on the first call
        total = {}
        for steps in ("2", "4"):
            with CountOps() as c:
                run(*args, z, y, steps=steps)
            total[steps] = c.total
        counts[f"{name}_ops_per_step"] = (total["4"] - total["2"]) / 2
    t = torch.full((2 * n,), 999)
    with torch.no_grad(), CountOps() as c:
        dog_guidance_fn(ref_ft, ref_pre, null=NULL)(torch.cat([z, z]), t, torch.cat([y, y]), SCALE)
    counts["reference_ops_per_forward"] = c.total
    paired = get_pair(dg_ft, dg_pre)
    with CountOps() as c:
        paired.forward_pair(z, t[:n], y, NULL)
    counts["dgfast_ops_per_forward"] = c.total
    counts["ops_ratio_per_step"] = counts["reference_ops_per_step"] / counts["dgfast_ops_per_step"]
    return counts


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------

_MODELS: dict = {}
_SAMPLES: dict = {}
_COMPILED: dict = {}
IMPLS = ("upstream eager", "upstream compile", "dgfast", "dgfast compile")


def models_for(pair: str, latent: int):
    """"full": (ref ft, ref pre, dgfast ft, dgfast pre); "lora": (ref LoRA ft, ref pre)."""
    if (pair, latent) not in _MODELS:
        _MODELS[pair, latent] = build_models(latent) if pair == "full" else build_lora_pair(latent)
    return _MODELS[pair, latent]


def compiled(pair: str, latent: int):
    """torch.compile of both upstream modules (default mode), built once per pair and latent."""
    if (pair, latent) not in _COMPILED:
        ft, pre = models_for(pair, latent)[:2]
        _COMPILED[pair, latent] = (torch.compile(ft), torch.compile(pre))
    return _COMPILED[pair, latent]


def reference_samples(pair, latent, steps):
    if (pair, latent, steps) not in _SAMPLES:
        ref_ft, ref_pre = models_for(pair, latent)[:2]
        _SAMPLES[pair, latent, steps] = run_reference(ref_ft, ref_pre, *inputs(latent), steps=steps)
    return _SAMPLES[pair, latent, steps]


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def runner(impl: str, pair: str, latent: int):
    """(function, models) for one row of the table."""
    if impl == "upstream eager":
        return run_reference, models_for(pair, latent)[:2]
    if impl == "upstream compile":
        return run_reference, compiled(pair, latent)
    extra = {"compile": True} if impl == "dgfast compile" else {}
    return (lambda ft, pre, z, y, steps: run_dgfast(ft, pre, z, y, steps=steps, **extra)), models_for(pair, latent)[:2]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rnd", range(ROUNDS))
@pytest.mark.parametrize("latent", [32, 16])
@pytest.mark.parametrize("pair", ["full", "lora"])
def test_sample(benchmark, pair, latent, rnd, impl):
    """One timed call of one row. The round is the outer parameter: round r times every row of the
    group before round r + 1 starts, so a VM whose speed drifts by 10-20% between minutes slows a
    round's rows alike (back-to-back rounds per row let the drift land on some rows only, see
    bench/RESULTS.md). bench/ratios.py reads the median per row and the ratio within each round."""
    if pair == "lora":
        pytest.importorskip("peft")
    if benchmark.disabled and (latent != 16 or rnd > 0 or (pair == "lora" and "compile" in impl)):
        pytest.skip("untimed run (make test): latent 16 and one round only, the same code at a quarter of the "
                    "cost; torch.compile (a minute of inductor build per row) on the full pair only")
    steps = "2" if benchmark.disabled else os.environ.get("DGFAST_BENCH_STEPS", STEPS[latent])
    benchmark.group = f"{pair} fine-tune pair, {MODEL} batch {N} latent {latent}, {steps} steps"
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), batch=N,
                                latent=latent, steps=steps, model=MODEL, pair=pair, impl=impl, round=rnd,
                                **cpu_info())
    fn, models = runner(impl, pair, latent)
    z, y = inputs(latent)
    out = benchmark.pedantic(fn, args=(*models, z, y), kwargs=dict(steps=steps), rounds=1,
                         warmup_rounds=1 if rnd == 0 else 0)  # later rounds: models built, compiled, measured
    err = rel_err(out, reference_samples(pair, latent, steps))
    benchmark.extra_info["max_rel_err_vs_upstream_eager"] = err
    assert err <= TOLERANCE, f"{impl} samples differ from the upstream loop by {err:.2e} relative"
    if impl.startswith("dgfast"):  # the GEMM strategy each pair measured per batch size, and on which machine
        run_ft, run_pre = convert.dgfast_models(*models)  # the converted models: cached, as sample() used them
        benchmark.extra_info["pair_gemm"] = dict(machine=machine_id(torch.device("cpu")),
                                                 plans=get_pair(run_ft, run_pre).choices())


# ----------------------------------------------------------------------------------------------
# Profiles (python bench/bench_sample.py --profile)
# ----------------------------------------------------------------------------------------------

GEMM_KEYS = ("aten::addmm", "aten::baddbmm", "aten::bmm", "aten::mm", "mkldnn::_linear_pointwise")
ATTENTION_KEYS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_efficient_attention_forward",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_flash_attention_forward")
FUSED = ("adaln_modulate", "gated_residual_modulate", "gelu_tanh", "guided_step")


class label_fused_ops:
    """The C++ fused ops are pybind calls that torch.profiler does not record: while profiling,
    wrap dgfast.ops' entry points in record_function so their time shows up as dgfast::<op>."""

    def __enter__(self):
        self.saved = {name: getattr(dgfast.ops, name) for name in FUSED}
        for name, fn in self.saved.items():
            def wrapped(*args, _fn=fn, _name=f"dgfast::{name}", **kwargs):
                with torch.profiler.record_function(_name):
                    return _fn(*args, **kwargs)
            setattr(dgfast.ops, name, wrapped)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dgfast.ops, name, fn)


def profile(latent: int, steps: str = "2", rows: int = 12) -> dict:
    """torch.profiler over a `steps`-step run of each loop: self-CPU-time table and shares of
    GEMMs, attention and everything else. Returns the shares."""
    import time

    from torch.profiler import ProfilerActivity, profile as torch_profile
    models = models_for("full", latent)
    z, y = inputs(latent)
    shares = {}
    for name, fn, args in (("reference", run_reference, models[:2]), ("dgfast two-pass", run_dgfast_two_pass,
                                                                       models[2:]), ("dgfast", run_dgfast, models[2:])):
        fn(*args, z, y, steps="2")  # warm-up (C++ extension load, pairing, MKL/oneDNN init)
        with label_fused_ops(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn(*args, z, y, steps=steps)
            wall = time.perf_counter() - start
        events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_KEYS)
        attn = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_KEYS)
        shares[name] = dict(wall_s=wall, gemm=gemm / total, attention=attn / total, other=1 - (gemm + attn) / total)
        print(f"\n== {name}, latent {latent}, {steps} steps: wall {wall:.2f} s ({wall / int(steps):.3f} s/step), "
              f"profiled self CPU {total / 1e6:.2f} s; GEMM {100 * gemm / total:.1f}%, attention "
              f"{100 * attn / total:.1f}%, everything else {100 * (1 - (gemm + attn) / total):.1f}%")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
            print(f"  {e.key:<50} {e.self_cpu_time_total / 1e3:9.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%"
                  f"  calls {e.count}")
        if name == "dgfast":  # the pair's GEMM strategy per layer shape, as measured at its first forward
            print("\n".join(line for line in get_pair(*args).report().splitlines() if line.startswith(("GEMM", "  "))))
    ratio = shares['reference']['wall_s'] / shares['dgfast']['wall_s']
    print(f"\nlatent {latent}: reference / dgfast wall time {ratio:.2f}x "
          f"(two-pass dgfast {shares['reference']['wall_s'] / shares['dgfast two-pass']['wall_s']:.2f}x)")
    return shares


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--latent", type=int, nargs="*", default=[32, 16])
    ap.add_argument("--steps", default="2")
    ap.add_argument("--counts", action="store_true")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"ops backend {dgfast.ops.resolve_backend('auto', torch.empty(0))}", file=sys.stderr)
    for lat in a.latent:
        if a.profile:
            profile(lat, a.steps)
        if a.counts:
            print(lat, op_counts(models_for("full", lat), lat))
