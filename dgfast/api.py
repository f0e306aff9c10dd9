"""`dgfast.sample()` and `dgfast.dog_forward()`: the drop-in API.

    eps = eps_pre(x, t, null) + w * (eps_ft(x, t, y) - eps_pre(x, t, null))

With guidance_channels=3, noise="reference" and fp32, `sample` reproduces the first n rows of
the DiT/DoG scripts' `diffusion.p_sample_loop(dog_fn, ...)` (the sampler step bit for bit,
the models to float tolerance), including the default generator's consumption.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from dgfast import convert, ops, samplers

SAMPLERS = samplers.NATIVE_SAMPLERS
NOISE_MODES = ("reference", "per-sample")
SEED_RANGE = 1 << 32      # seeds are [0, 2**32): torch's CPU generator ignores higher bits


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def model_info(model) -> dict:
    """What can be read off a model: in/out channels, latent size, label table rows (None if unknown)."""
    info = dict(in_channels=None, out_channels=None, input_size=None, table_rows=None, learn_sigma=None)
    if not isinstance(model, nn.Module):
        return info
    info["in_channels"] = getattr(model, "in_channels", None)
    info["out_channels"] = getattr(model, "out_channels", None)
    info["learn_sigma"] = getattr(model, "learn_sigma", None)
    info["input_size"] = getattr(model, "input_size", None)
    x_emb = getattr(model, "x_embedder", None)
    if info["input_size"] is None and x_emb is not None:  # upstream: timm PatchEmbed.img_size
        size = getattr(x_emb, "img_size", None)
        info["input_size"] = size[0] if isinstance(size, (tuple, list)) else size
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if isinstance(table, nn.Embedding):
        info["table_rows"] = table.num_embeddings
    return info


def label_table_rows(model):
    """Rows of the first label table (an nn.Embedding named `embedding_table`: upstream/dgfast DiT,
    diffusers' LabelEmbedding) in the model, None when there is none."""
    if not isinstance(model, nn.Module):
        return None
    for m in model.modules():
        table = getattr(m, "embedding_table", None)
        if isinstance(table, nn.Embedding):
            return table.num_embeddings
    return None


def check_eval(model, name: str) -> None:
    if not callable(model):
        raise TypeError(f"{name} must be a callable model f(x, t, y), got {type(model).__name__}")
    if isinstance(model, nn.Module) and any(m.training for m in model.modules()):
        raise ValueError(f"{name} is in train mode: call {name}.eval() first (in train mode DiT's label "
                         f"dropout draws random numbers and drops labels)")


def check_pair(ft_info: dict, pre_info: dict) -> None:
    for key in ("in_channels", "out_channels", "input_size", "learn_sigma"):
        a, b = ft_info[key], pre_info[key]
        if a is not None and b is not None and a != b:
            raise ValueError(f"finetuned and pretrained models disagree on {key}: {a} vs {b}")


def check_inputs(z, y, info: dict, device_of_model) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4:
        raise ValueError(f"z must be (n, C, H, W), got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"z must be a floating tensor (float32 for faithful sampling), got {z.dtype}")
    if z.device.type != "meta" and not torch.isfinite(z).all():  # meta holds no values: the device checks name it
        raise ValueError("z contains NaN or infinite values")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dtype != torch.int64 or y.dim() != 1:
        raise TypeError(f"y must be a 1-D int64 tensor, got dtype {y.dtype} and shape {tuple(y.shape)}")
    if len(y) != len(z):
        raise ValueError(f"y has {len(y)} labels but z has {len(z)} samples")
    if y.device != z.device:
        raise ValueError(f"y is on {y.device} but z is on {z.device}")
    if device_of_model is not None and device_of_model != z.device:
        raise ValueError(f"z is on {z.device} but the models are on {device_of_model}")
    if info["in_channels"] is not None and z.shape[1] != info["in_channels"]:
        raise ValueError(f"z has {z.shape[1]} channels, the models take {info['in_channels']}")
    if info["input_size"] is not None and tuple(z.shape[2:]) != (info["input_size"],) * 2:
        size = info["input_size"]
        raise ValueError(f"z is {tuple(z.shape[2:])} spatially, the models take {size}x{size}")
    if len(y) and (int(y.min()) < 0 or (info["table_rows"] is not None and int(y.max()) >= info["table_rows"])):
        raise ValueError(f"y holds labels outside [0, {info['table_rows']}) of the finetuned model's label table: "
                         f"min {int(y.min())}, max {int(y.max())}")


def model_device(model):
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


def resolve_channels(guidance_channels, C: int) -> int:
    if guidance_channels == "all":
        return C
    if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int):
        raise TypeError(f"guidance_channels must be an int or 'all', got {guidance_channels!r}")
    if not 0 <= guidance_channels <= C:
        raise ValueError(f"guidance_channels must be in [0, {C}] or 'all', got {guidance_channels}")
    return guidance_channels


def scalar(value):
    """A 0-dim tensor or numpy array as the Python number it holds; anything else unchanged."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def check_label(value, name: str, table_rows) -> int:
    """An int label (numpy integers, 0-dim tensors too) inside a label table of table_rows rows (None: unknown)."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < 0 or (table_rows is not None and value >= table_rows):
        raise ValueError(f"{name} {value} is outside the pretrained model's label table [0, {table_rows})")
    return value


def check_seeds(seeds) -> list:
    if hasattr(seeds, "tolist"):  # a tensor or numpy array of seeds
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints (one per sample), got {type(seeds).__name__}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= int(s) < SEED_RANGE:
            # torch's CPU generator keeps only a seed's low 32 bits (and manual_seed wraps negative
            # seeds to 2**64 + s): seeds 2**32 apart would silently give identical samples
            raise ValueError(f"seeds must hold ints in [0, 2**32) (torch's CPU generator uses only a seed's low "
                             f"32 bits, so seeds 2**32 apart would give identical samples), got {s!r}")
    return [int(s) for s in seeds]


def check_scale(guidance_scale) -> float:
    guidance_scale = scalar(guidance_scale)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):  # numpy scalars too
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    s = float(guidance_scale)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")
    return s


def check_cfg_scale(cfg_scale):
    """forward_with_cfg's cfg_scale: a number (check_scale), or a tensor of scales (upstream's
    arithmetic broadcasts one per sample), every value finite and >= 0. Returned unchanged."""
    if isinstance(cfg_scale, torch.Tensor) and cfg_scale.ndim > 0:
        if not cfg_scale.is_floating_point() or not bool(torch.isfinite(cfg_scale).all() & (cfg_scale >= 0).all()):
            raise ValueError(f"guidance_scale (cfg_scale) must hold finite floats >= 0, got {cfg_scale}")
        return cfg_scale
    check_scale(cfg_scale)
    return cfg_scale


def check_pair_outputs(out_ft, out_pre, x) -> None:
    """dog_forward's two model outputs for the kept half x: tensors (n, >= C, H, W) of one channel
    count (rows [:n] and [n:] of the result carry each one's extra channels)."""
    samplers.check_model_output(out_ft, x, "finetuned")
    samplers.check_model_output(out_pre, x, "pretrained")
    if out_ft.shape[1] != out_pre.shape[1]:
        raise ValueError(f"finetuned returned {out_ft.shape[1]} channels, pretrained {out_pre.shape[1]}: "
                         f"forward_with_cfg stacks their extra (variance) channels, so they must agree")


def check_bool(value, name: str) -> bool:
    """True or False (numpy's bool too): a string such as 'no' is not silently true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_eta(eta, sampler: str, scheduler=None) -> float:
    """eta: a finite number >= 0, non-zero only where the step reads it (DDIM: the built-in sampler or
    a diffusers DDIMScheduler), and at most 1 there (above 1 DDIM's step takes the square root of a
    negative number: NaN)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta == 0:
        return 0.0
    what = f"sampler={sampler!r}" if scheduler is None else type(scheduler).__name__
    if what not in ("sampler='ddim'", "DDIMScheduler"):
        raise ValueError(f"eta={eta} is DDIM's stochasticity; {what} does not use it (it would be ignored): "
                         f"pass eta=0, or sampler='ddim'")
    if eta > 1:
        raise ValueError(f"eta must be in [0, 1] for DDIM ({what}; above 1 the step takes the square root of a "
                         f"negative number), got {eta}")
    return float(eta)


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------

class ReferenceNoise:
    """One default-generator draw per step over the batch the upstream loop holds (2n when guided)."""

    def __init__(self, n: int, rows: int, shape, device, dtype):
        self.n, self.shape, self.device, self.dtype = n, (rows, *shape[1:]), device, dtype

    def __call__(self) -> torch.Tensor:
        return torch.randn(self.shape, device=self.device, dtype=self.dtype)[: self.n]


class PerSampleNoise:
    """Sample i's latents and step noise come from its own generator seeded with seeds[i]:
    results do not depend on batch size or on which other samples share the batch."""

    def __init__(self, seeds: Sequence[int], shape, device, dtype):
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape[1:]), device, dtype

    def latents(self) -> torch.Tensor:
        return self()

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device, dtype=self.dtype)
                            for g in self.gens])


# ----------------------------------------------------------------------------------------------
# Forwards
# ----------------------------------------------------------------------------------------------

def _is_dgfast_dit(m) -> bool:
    from dgfast.models import DiT
    return isinstance(m, DiT)


def make_pair_forward(finetuned, pretrained, paired, *, backend: str | None = None,
                      compile_mode: str | None = None, checked: bool = False) -> Callable:
    """f(x, t, y, null) -> (out_ft, out_pre): one concatenated batch when possible, else two calls.
    backend (None: the models' own) reaches a paired forward here; compile_mode: convert.compiled;
    checked: the models' weights were checked in this call already (convert.converted)."""
    pair = paired if paired is not False and not isinstance(paired, bool) else None  # a prebuilt paired model
    if paired is True and _is_dgfast_dit(finetuned) and _is_dgfast_dit(pretrained):
        from dgfast.pair_cache import get_pair
        from dgfast.paired import pair_mismatch
        why = pair_mismatch(finetuned, pretrained)
        if not why:
            pair = get_pair(finetuned, pretrained, checked=checked)
        else:
            warnings.warn(f"the fine-tuned and pre-trained models run as two forwards, not one batch: {why}",
                          stacklevel=3)
    if pair is not None:
        forward = convert.compiled(pair.forward_pair, compile_mode)
        if compile_mode is not None:  # the traced forward uses the GEMM strategies measured eagerly first
            compiled_forward = forward

            def forward(x, t, y, null, backend=backend):
                pair.prepare_plan(x, backend)
                return compiled_forward(x, t, y, null, backend=backend)
            return forward
        return forward if backend is None else functools.partial(forward, backend=backend)
    ft, pre = convert.runner(finetuned, backend, compile_mode), convert.runner(pretrained, backend, compile_mode)

    def two_pass(x, t, y, null):
        return ft(x, t, y), pre(x, t, torch.full_like(y, null))
    return two_pass


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(finetuned, pretrained, z, y, *, guidance_scale: float = 1.5, steps="250", guidance_channels=3,
           null_label: int = 1000, sampler: str = "ddpm", eta: float = 0.0, noise: str = "reference",
           seeds: Sequence[int] | None = None, clip_denoised: bool = False, progress: bool = False,
           backend: str = "auto", paired=True, scheduler=None, guidance_interval=(0.0, 1.0),
           guidance_rescale: float = 0.0, mode: str = "dog", cfg_null_label: int | None = None,
           pretrained_every: int = 1, cuda_graph: bool = False, exact: bool = False,
           compile=False) -> torch.Tensor:
    """Domain Guidance sampling; returns the n kept samples (n, C, H, W).

    finetuned(x, t, y) gets the labels y; pretrained(x, t, null_label) is the guiding branch.
    guidance_channels=3 reproduces the DiT/DoG scripts' 3-channel quirk; "all" guides every eps
    channel. guidance_scale == 1 samples the fine-tuned model alone (one forward per step).
    noise="reference" draws from the default generator exactly as the upstream loop does;
    noise="per-sample" with seeds= makes sample i depend only on seeds[i] (z may then be None).

    sampler: "ddpm" / "ddim" (DiT), "dpm2m" (DPM-Solver++(2M) on DiT's schedule), "flow_euler" /
    "flow_heun" (SiT's velocity ODE, t in [0, 1]; steps = SiT's num_steps grid points).
    scheduler: a diffusers scheduler instance instead (see dgfast.samplers); steps=int sets its
    timesteps, steps=None keeps those already set; z is scaled by its init_noise_sigma, and noise is
    drawn (n rows) exactly when its step() would draw it. A name from samplers.NAMED_SCHEDULERS (e.g.
    "dpmpp-2m-sde-karras"; its cost and quality against DDPM-250: bench/RESULTS.md, "Quality-time frontier")
    builds a fresh one on DiT's schedule.
    guidance_interval=(start, stop): guide only steps int(start*N) <= i < int(stop*N); the other
    steps do not run the guiding model. guidance_rescale: phi of diffusers' rescale_noise_cfg.
    mode="cfg": classifier-free guidance, the fine-tuned model with its own null label
    (cfg_null_label, default its num_classes) is the guiding branch; pretrained must be None.
    pretrained_every=k: run the guiding branch every k-th guided evaluation, reuse it in between.
    cuda_graph=True (CUDA, sampler "ddpm", "ddim" or "dpm2m"): the whole step (paired forward + step)
    is captured once per shape as a CUDA graph and replayed; the noise tensors are drawn up front in
    the loop's order (same RNG stream); dpm2m's multistep state (the previous x0) is kept in a static
    buffer between replays. See dgfast.cuda_graph.run_cuda_graph.
    Upstream DiT modules and diffusers DiTTransformer2DModel run as dgfast's fused DiT on their own
    tensors (dgfast.convert; `dgfast.conversion_report(ft, pre)` says what was shared and copied);
    exact=True runs the models as given, each its own forward, for the upstream scripts' exact bits.
    backend other than "auto" also sets the fused ops of dgfast DiT forwards (for this call only).
    compile=True or a torch.compile mode: the paired forward (or each model) under torch.compile,
    compiled once per pair, mode and batch shape (dynamic=False) and reused.
    """
    if isinstance(scheduler, str):
        scheduler = samplers.named_scheduler(scheduler)
    a = check_sample_args(finetuned, pretrained, guidance_scale=guidance_scale, null_label=null_label,
                          sampler=sampler, eta=eta, noise=noise, clip_denoised=clip_denoised, backend=backend,
                          paired=paired, scheduler=scheduler, guidance_interval=guidance_interval,
                          guidance_rescale=guidance_rescale, mode=mode, cfg_null_label=cfg_null_label,
                          pretrained_every=pretrained_every, cuda_graph=cuda_graph, exact=exact, compile=compile)
    z, seeds, draw = _latents(finetuned, z, y, noise, seeds, a.ft_info)
    check_inputs(z, y, a.ft_info, model_device(finetuned))
    if a.guided and mode == "dog":
        check_inputs(z, y.clamp(max=0), a.pre_info, model_device(pretrained))
    k = resolve_channels(guidance_channels, z.shape[1])

    plan = (samplers.native_plan(sampler, steps, float(a.eta)) if scheduler is None
            else samplers.scheduler_plan(scheduler, steps, z.device, float(a.eta)))
    n = len(z)
    if n == 0:  # nothing to sample (after every argument was checked)
        return torch.empty(z.shape, dtype=torch.float32, device=z.device)
    if draw is None:
        draw = (PerSampleNoise(seeds, z.shape, z.device, z.dtype) if noise == "per-sample"
                else ReferenceNoise(n, 2 * n if a.guided and plan.doubled_noise else n, z.shape, z.device, z.dtype))
    ft_alone, pair_forward = _forwards(finetuned, pretrained, a, mode=mode, backend=backend, paired=paired,
                                       exact=exact)
    if a.cuda_graph:
        if scheduler is not None or a.interval != (0.0, 1.0) or pretrained_every != 1 or guidance_rescale or a.cmode:
            raise ValueError("cuda_graph=True runs the native ddpm/ddim/dpm2m loop; it does not combine with "
                             "scheduler=, guidance_interval, pretrained_every, guidance_rescale or compile=")
        from dgfast.cuda_graph import run_cuda_graph
        forward = pair_forward if a.guided else (lambda x, t, labels, null: (ft_alone(x, t, labels), None))
        owner = getattr(forward, "func", forward)  # a backend partial of a pair's forward
        cache = getattr(getattr(owner, "__self__", None), "_graphs", None)  # a PairedDiT keeps its graphs
        return warn_nonfinite(run_cuda_graph(forward, z, y, a.guide_label, plan, draw, scale=a.scale,
                                             guidance_channels=k, clip_denoised=a.clip_denoised, cache=cache))
    forwards = samplers.StepForwards(ft_alone, y, pair_forward, a.guide_label,
                                     samplers.interval_steps(*a.interval, plan.num_steps), pretrained_every)
    return samplers.run(plan, z, forwards, scale=a.scale, guidance_channels=k, draw=draw,  # warns if it diverged
                        clip_denoised=a.clip_denoised, backend=backend, guidance_rescale=float(guidance_rescale),
                        generator=getattr(draw, "gens", None), progress=progress)


@dataclass
class SampleArgs:
    """sample()'s arguments as checked and normalised by check_sample_args."""
    scale: float            # the guidance scale w
    guided: bool            # w != 1: the guiding branch runs
    interval: tuple         # guidance_interval as floats
    eta: float
    clip_denoised: bool
    cuda_graph: bool
    cmode: str | None       # the torch.compile mode, None without compile
    ft_info: dict           # model_info of the fine-tuned model
    pre_info: dict | None   # model_info of the pretrained model (mode "dog", guided)
    guide_label: int | None  # the guiding branch's label: null_label (dog) or cfg_null_label (cfg)


def check_sample_args(finetuned, pretrained, *, guidance_scale, null_label, sampler, eta, noise, clip_denoised,
                      backend, paired, scheduler, guidance_interval, guidance_rescale, mode, cfg_null_label,
                      pretrained_every, cuda_graph, exact, compile) -> SampleArgs:
    """Every sample() argument that does not need the latents, checked (a clear error naming it) and
    normalised, in the order sample() has always checked them."""
    if scheduler is None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if scheduler is not None and sampler != "ddpm":
        raise ValueError(f"pass either sampler= or scheduler=, not both (sampler={sampler!r})")
    interval = samplers.check_controls(guidance_interval, guidance_rescale, mode, pretrained_every)
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    scale = check_scale(guidance_scale)
    if isinstance(paired, str) or not isinstance(paired, bool) and not hasattr(paired, "forward_pair"):
        raise TypeError(f"paired must be True, False or a paired model from dgfast.pair(...), got {paired!r}")
    eta = check_eta(eta, sampler, scheduler)
    clip_denoised, cuda_graph = check_bool(clip_denoised, "clip_denoised"), check_bool(cuda_graph, "cuda_graph")
    cmode = convert.compile_mode(compile)
    if exact and (cmode or not isinstance(paired, bool)):
        raise ValueError("exact=True runs the models as given; it does not combine with compile= or a paired model")
    guided = scale != 1.0
    check_eval(finetuned, "finetuned")
    ft_info, pre_info = model_info(finetuned), None
    if guided and mode == "cfg":
        if pretrained is not None:
            raise ValueError("mode='cfg' guides with the fine-tuned model's own null label: pass pretrained=None")
        cfg_null_label = _cfg_null_label(finetuned, ft_info, cfg_null_label)
    elif guided:
        if pretrained is None:
            raise ValueError("pretrained is required when guidance_scale != 1")
        check_eval(pretrained, "pretrained")
        pre_info = model_info(pretrained)
        check_pair(ft_info, pre_info)
        null_label = check_label(null_label, "null_label", pre_info["table_rows"])
    return SampleArgs(scale, guided, interval, eta, clip_denoised, cuda_graph, cmode, ft_info, pre_info,
                      cfg_null_label if mode == "cfg" else null_label)


def _latents(finetuned, z, y, noise: str, seeds, ft_info: dict):
    """(z, seeds checked, the per-sample noise source or None): with noise="per-sample" and z=None the
    latents come from each sample's generator, which then goes on to draw that sample's step noise."""
    draw = None
    if noise == "per-sample":
        if seeds is None:
            raise ValueError("noise='per-sample' needs seeds= (one int per sample)")
        seeds = check_seeds(seeds)
        if z is None:
            if isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) != len(seeds):
                raise ValueError(f"seeds has {len(seeds)} entries but y has {len(y)} labels")
            if ft_info["in_channels"] is None or ft_info["input_size"] is None:
                raise ValueError("z=None needs a model whose in_channels and input_size are known")
            size = ft_info["input_size"]
            device = model_device(finetuned) or torch.device("cpu")
            draw = PerSampleNoise(seeds, (len(seeds), ft_info["in_channels"], size, size), device, torch.float32)
            z = draw.latents()
        if len(seeds) != len(z):
            raise ValueError(f"seeds has {len(seeds)} entries but z has {len(z)} samples")
    elif seeds is not None:
        raise ValueError("seeds= is only used with noise='per-sample'")
    return z, seeds, draw


def _forwards(finetuned, pretrained, a: SampleArgs, *, mode: str, backend: str, paired, exact: bool):
    """(the fine-tuned model's forward alone, the guided pair's forward or None when unguided), after
    dgfast.convert has turned upstream/diffusers modules into dgfast's DiT (unless exact)."""
    fb = None if backend == "auto" else backend  # "auto": each model's own setting for its forward
    given = (finetuned, pretrained if a.guided and mode == "dog" else None)
    finetuned, pretrained = convert.models_to_run(*given, exact)
    ft_alone = convert.runner(finetuned, fb, a.cmode)
    if not a.guided:
        return ft_alone, None
    if mode == "cfg":
        return ft_alone, samplers.cfg_pair_forward(ft_alone)
    return ft_alone, make_pair_forward(finetuned, pretrained, False if exact else paired, backend=fb,
                                       compile_mode=a.cmode, checked=convert.converted(given, (finetuned, pretrained)))


def warn_nonfinite(samples: torch.Tensor) -> torch.Tensor:
    """The samples, with a warning when some hold NaN/inf (a model's output or the scheduler diverged):
    said once here rather than found later in an image grid. Not an error: the rest are good."""
    bad = int((~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).sum())
    if bad:
        warnings.warn(f"dgfast.sample: {bad} of {len(samples)} samples contain NaN or infinite values "
                      f"(the models' outputs or the sampler diverged)", RuntimeWarning, stacklevel=3)
    return samples


def _cfg_null_label(finetuned, info, label):
    """The fine-tuned model's own null class: its num_classes unless given; must be in its table."""
    if label is None:  # dgfast DiT; upstream DiT keeps it on y_embedder; diffusers in its config
        label = getattr(finetuned, "num_classes", None)
        if label is None:
            label = getattr(getattr(finetuned, "y_embedder", None), "num_classes", None)
        if label is None and hasattr(getattr(finetuned, "config", None), "get"):
            label = finetuned.config.get("num_embeds_ada_norm")
        if label is None:
            raise ValueError("mode='cfg': cannot read the fine-tuned model's num_classes; pass cfg_null_label=")
    label = scalar(label)  # numpy integers and 0-dim tensors are ints too
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0 or (
            info["table_rows"] is not None and label >= info["table_rows"]):
        raise ValueError(f"cfg_null_label {label!r} is outside the fine-tuned model's label table "
                         f"[0, {info['table_rows']}) (a model trained without label dropout has no null row)")
    return int(label)


# ----------------------------------------------------------------------------------------------
# forward_with_cfg-style drop-in for scripts that keep their own p_sample_loop
# ----------------------------------------------------------------------------------------------

def dog_forward(finetuned, pretrained, null_label: int = 1000, guidance_channels=3, paired=True, *,
                exact: bool = False) -> Callable:
    """A callable with upstream `forward_with_cfg(x, t, y, cfg_scale)` semantics, as the DoG script's
    guidance closure: both models read x[:n]; the fine-tuned one gets y[:n], the pre-trained one
    `null_label`; guidance on the first `guidance_channels` eps channels; rows [:n] carry the
    fine-tuned variance channels, rows [n:] the pre-trained ones. Returns (2n, 2C, H, W).
    Upstream / diffusers DiT modules run as dgfast's fused DiT (see sample); exact=True runs the
    models as given, each its own forward, as the script's closure does.
    """
    if exact and not isinstance(paired, bool):
        raise ValueError("exact=True runs the models as given; it does not combine with a paired model")
    check_eval(finetuned, "finetuned")
    check_eval(pretrained, "pretrained")
    ft_info, pre_info = model_info(finetuned), model_info(pretrained)
    check_pair(ft_info, pre_info)
    null_label = check_label(null_label, "null_label", pre_info["table_rows"])
    if guidance_channels != "all":  # the channel count is known only per call; reject what never fits now
        if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int):
            raise TypeError(f"guidance_channels must be an int or 'all', got {guidance_channels!r}")
        if guidance_channels < 0:
            raise ValueError(f"guidance_channels must be >= 0 or 'all', got {guidance_channels}")

    def forwards():
        """(fine-tuned, pre-trained, paired forward) as they run now (conversions are cached)."""
        ft, pre = convert.models_to_run(finetuned, pretrained, exact)
        checked = convert.converted((finetuned, pretrained), (ft, pre))
        return ft, pre, make_pair_forward(ft, pre, False if exact else paired, checked=checked)

    state = {"forwards": forwards(), "t": None, "dir": 0}  # built now

    def loop_starts(t0: float) -> bool:
        """Whether this call starts a sampling loop: the first call, or t turning back against the
        direction it has been moving in (DiT's loops count t down, SiT's flow loops count it up; a
        repeated t, as Heun's second stage, continues the loop)."""
        last, direction = state["t"], state["dir"]
        state["t"] = t0
        if last is None or (direction == 0 and t0 == last) or (t0 - last) * direction < 0:
            state["dir"] = 0
            return True
        if direction == 0:
            state["dir"] = 1 if t0 > last else -1
        return False

    @torch.no_grad()
    def forward_with_cfg(x, t, y, cfg_scale):
        for model, name in ((finetuned, "finetuned"), (pretrained, "pretrained")):
            if isinstance(model, nn.Module) and model.training:  # put in train mode since (top module: cheap)
                check_eval(model, name)
        if len(x) % 2 or len(y) != len(x) or len(t) != len(x):
            raise ValueError(f"x, t and y must hold the doubled batch (2n rows each, as the DoG script builds "
                             f"it), got {len(x)}, {len(t)} and {len(y)} rows")
        check_cfg_scale(cfg_scale)
        n = len(x) // 2
        if loop_starts(float(t[0]) if len(t) else 0.0):
            # Once per sampling loop, as sample() checks once per call (a full check costs a few ms
            # for DiT-XL and syncs a GPU): every submodule's mode, the labels, and the weights --
            # the pair is rebuilt if they changed since the last loop.
            check_eval(finetuned, "finetuned")
            check_eval(pretrained, "pretrained")
            rows = ft_info["table_rows"]
            if n and rows is not None and (int(y[:n].min()) < 0 or int(y[:n].max()) >= rows):
                raise ValueError(f"y[:n] holds labels outside [0, {rows}) of the finetuned model's label table")
            state["forwards"] = forwards()
        run_ft, run_pre, pair_forward = state["forwards"]
        C = x.shape[1]
        k = resolve_channels(guidance_channels, C)
        if torch.equal(t[:n], t[n:]):  # always so inside p_sample_loop: one paired forward
            out_ft, out_pre = pair_forward(x[:n], t[:n], y[:n], null_label)
        else:  # the script's closure gives the pre-trained model the second half of t
            out_ft = run_ft(x[:n], t[:n], y[:n])
            out_pre = run_pre(x[:n], t[n:], torch.full_like(y[:n], null_label))
        out_ft, out_pre = samplers.model_output(out_ft, x), samplers.model_output(out_pre, x)
        check_pair_outputs(out_ft, out_pre, x[:n])
        g = out_pre[:, :k] + cfg_scale * (out_ft[:, :k] - out_pre[:, :k])
        rest = torch.cat([out_ft[:, k:], out_pre[:, k:]], dim=0)
        return torch.cat([torch.cat([g, g], dim=0), rest], dim=1)

    return forward_with_cfg
