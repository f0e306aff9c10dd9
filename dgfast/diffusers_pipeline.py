"""DoGDiTPipeline: diffusers' DiTPipeline with Domain Guidance and dgfast's fused step.

    pipe = DoGDiTPipeline(transformer, transformer_pre, vae, scheduler)
    images = pipe(class_labels=[3, 7], guidance_scale=1.5, generator=torch.manual_seed(0)).images

`transformer` is the fine-tuned DiTTransformer2DModel, `transformer_pre` its pre-trained ancestor
(the guiding branch, fed its own null class). Without `transformer_pre` the pipeline is plain
classifier-free guidance with `transformer`'s null class, i.e. DiTPipeline itself.

Same call as DiTPipeline.__call__ (guidance on iff guidance_scale > 1, 4 guided channels by
default, latents decoded with the VAE), fixing its known gaps:
- the generator also drives the scheduler's noise (DiTPipeline leaves step() on the global RNG);
- the initial latents are scaled by scheduler.init_noise_sigma (Euler-type schedulers);
- learned sigma is kept: DDPMScheduler(variance_type="learned_range") uses the fine-tuned model's
  variance channels instead of crashing;
- only the B kept rows are stepped (DiTPipeline steps the doubled batch and discards half).
The scheduler's config drives dgfast's fused guidance + step (dgfast.samplers); schedulers it does
not cover run their own step() on the guided prediction. The transformers run as dgfast's fused
DiT on their own weights (dgfast.convert; with diffusers' numerics), paired into one batch;
exact=True runs them as given.

vae=None means pixel-space models (e.g. dgfast.zoo's pair through adapters.to_diffusers, which
samples 3-channel 16x16 images directly): nothing is decoded, the samples are mapped from [-1, 1]
to [0, 1] as decoded images are, and every output_type works ("latent" gives the raw samples).
"""
from __future__ import annotations

import numbers

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from dgfast import convert, samplers
from dgfast.api import (check_eval, check_scale, label_table_rows, make_pair_forward,
                             resolve_channels, scalar)


def check_labels(class_labels, num_classes: int) -> list[int]:
    """class_labels as DiTPipeline takes them (a list of class ids; a 1-D tensor works too)."""
    if hasattr(class_labels, "tolist") and getattr(class_labels, "ndim", 2) <= 1:  # a tensor or numpy array
        class_labels = class_labels.tolist()
        class_labels = class_labels if isinstance(class_labels, list) else [class_labels]  # 0-dim: one label
    if not isinstance(class_labels, (list, tuple)):
        raise TypeError(f"class_labels must be a list of class ids, got {type(class_labels).__name__}")
    if not class_labels:
        raise ValueError("class_labels is empty: pass one class id per image")
    for c in class_labels:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"class_labels must hold ints, got {c!r}")
        if not 0 <= c < num_classes:
            raise ValueError(f"class_labels holds {c}, outside the fine-tuned model's classes [0, {num_classes})")
    return [int(c) for c in class_labels]


def check_pipeline_models(transformer, transformer_pre) -> None:
    check_eval(transformer, "transformer")
    if transformer_pre is None:
        return
    check_eval(transformer_pre, "transformer_pre")
    for key in ("sample_size", "in_channels", "out_channels"):
        a, b = transformer.config.get(key), transformer_pre.config.get(key)
        if a != b:
            raise ValueError(f"transformer and transformer_pre disagree on {key}: {a} vs {b}")


def transformer_fn(transformer):
    """A diffusers transformer as dgfast's model callable f(x, t, y) -> output tensor."""
    def forward(x, t, y):  # .sample of diffusers' output; anything else goes on to the sampler's output checks
        out = transformer(x, timestep=t, class_labels=y)
        return getattr(out, "sample", out)
    forward.num_classes = transformer.config.num_embeds_ada_norm
    return forward


class DoGDiTPipeline(DiTPipeline):
    model_cpu_offload_seq = "transformer->transformer_pre->vae"
    _optional_components = ["transformer_pre", "vae"]  # vae=None: a pixel-space model

    def __init__(self, transformer, transformer_pre, vae, scheduler, id2label: dict[int, str] | None = None):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self.register_modules(transformer_pre=transformer_pre)

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 50,
                 output_type: str | None = "pil", return_dict: bool = True, *, latents: torch.Tensor | None = None,
                 guidance_interval=(0.0, 1.0), guidance_rescale: float = 0.0, guidance_channels="all",
                 pretrained_every: int = 1, null_class: int | None = None, backend: str = "auto",
                 exact: bool = False):
        """Generate images of `class_labels` (ids of the fine-tuned model's classes).

        guidance_scale: w in  eps = u + w (c - u); guidance is on iff w > 1 (as DiTPipeline).
        generator: initial latents and every noise draw of the scheduler (one or one per image).
        latents: (B, C, L, L) unit-variance initial noise instead of drawing it.
        guidance_interval=(start, stop): guide steps int(start*N) <= i < int(stop*N) only; the
            guiding model is not run on the other steps (diffusers guiders' start/stop).
        guidance_rescale: phi of rescale_noise_cfg (Lin et al. 2023).
        guidance_channels: "all" (diffusers) or 3 (the DiT/DoG scripts' quirk).
        pretrained_every: run the guiding model every k-th guided step and reuse its output in between.
        null_class: the guiding model's label (default: its num_embeds_ada_norm, the null row).
        backend: the fused ops' implementation, for the step and (not "auto") the converted forwards.
        exact: run the transformers as given (diffusers' own forward) instead of dgfast's fused DiT.
        output_type: "pil", "np", "pt" or "latent" (with vae=None: the undecoded samples in [-1, 1] space).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        interval = samplers.check_controls(guidance_interval, guidance_rescale, "dog", pretrained_every)
        guidance_scale = check_scale(guidance_scale)
        num_inference_steps = samplers.int_steps(num_inference_steps, "num_inference_steps")
        check_pipeline_models(self.transformer, self.transformer_pre)
        device = self._execution_device
        cfg = self.transformer.config
        size, C = cfg.sample_size, cfg.in_channels
        class_labels = check_labels(class_labels, cfg.num_embeds_ada_norm)
        batch = len(class_labels)
        shape = (batch, C, size, size)
        latents = _initial_latents(latents, shape, generator, device, self.transformer.dtype)
        y = torch.tensor(class_labels, device=device)

        guided = guidance_scale > 1
        ft_dit, pre_dit = (None, None) if exact else convert.dgfast_models(
            self.transformer, self.transformer_pre if guided else None)
        fb = None if backend == "auto" else backend
        finetuned = transformer_fn(self.transformer) if ft_dit is None else convert.runner(ft_dit, fb, None)
        null_class = _check_null_class(null_class, self.transformer_pre if self.transformer_pre is not None
                                       else self.transformer)
        pair_forward = None
        if guided and self.transformer_pre is None:
            pair_forward = samplers.cfg_pair_forward(finetuned, "transformer")
        elif guided:  # one paired batch when both run as dgfast DiTs
            checked = convert.converted((self.transformer, self.transformer_pre), (ft_dit, pre_dit))
            pair_forward = (make_pair_forward(ft_dit, pre_dit, True, backend=fb, checked=checked)
                            if ft_dit is not None and pre_dit is not None else
                            make_pair_forward(finetuned, transformer_fn(self.transformer_pre) if pre_dit is None
                                              else convert.runner(pre_dit, fb, None), False))

        plan = samplers.scheduler_plan(self.scheduler, num_inference_steps, device)
        forwards = samplers.StepForwards(finetuned, y, pair_forward, null_class,
                                         samplers.interval_steps(*interval, plan.num_steps), pretrained_every,
                                         names=("transformer", "transformer_pre"))

        def draw():  # what the scheduler's step() would draw with this generator
            return randn_tensor(shape, generator=generator, device=device, dtype=latents.dtype)

        x = samplers.run(plan, latents, forwards, scale=float(guidance_scale),
                         guidance_channels=resolve_channels(guidance_channels, C), draw=draw, backend=backend,
                         guidance_rescale=float(guidance_rescale), generator=generator, progress=self.progress_bar)

        samples = x if output_type == "latent" else self._decode(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

    def _decode(self, x: torch.Tensor, output_type: str):
        """Samples -> images in [0, 1] (through the VAE when there is one) as output_type asks."""
        samples = x if self.vae is None else self.vae.decode(x / self.vae.config.scaling_factor).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return samples
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(samples) if output_type == "pil" else samples


def _initial_latents(latents, shape: tuple, generator, device, dtype) -> torch.Tensor:
    """The given initial latents, checked, on `device`; drawn with `generator` when None."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype).to(device)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise ValueError(f"latents must be a tensor of shape {shape}, got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if latents.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"latents must be float32, float16 or bfloat16, got {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")
    return latents.to(device)


def _check_null_class(null_class, guiding) -> int:
    """The guiding model's label (default its num_embeds_ada_norm, the null row), inside its label table."""
    if null_class is None:
        null_class = guiding.config.num_embeds_ada_norm
    rows = label_table_rows(guiding) or guiding.config.num_embeds_ada_norm + 1  # + 1: the null row
    null_class = scalar(null_class)
    if isinstance(null_class, bool) or not isinstance(null_class, numbers.Integral) or not 0 <= null_class < rows:
        raise ValueError(f"null_class {null_class!r} is outside the guiding model's label table [0, {rows})")
    return null_class
