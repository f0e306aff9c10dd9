"""DomainGuidance: Domain Guidance as a diffusers guider (diffusers.guiders.BaseGuidance).

Classifier-free guidance whose unconditional batch runs the pre-trained model:

    pred = pred_pre(x, null) + w * (pred_ft(x, y) - pred_pre(x, null))

    guider = DomainGuidance(guidance_scale=1.5, null_class=1000).set_pretrained_model(transformer_pre)
    pipe.update_components(guider=guider)          # a modular pipeline's guider slot

The denoiser a pipeline calls is the fine-tuned model. On the unconditional batch,
`prepare_models` registers a diffusers ModelHook on it whose forward sends the call to the
pre-trained model (with the pre-trained model's own null class when `null_class` is set), and
`cleanup_models` removes the hook. Outside [start, stop) guidance is off, the pipeline runs the
conditional batch only, and the pre-trained model is not evaluated at all.
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.hooks import HookRegistry, ModelHook

from dgfast import ops

_HOOK = "dgfast_domain_guidance"


class _RedirectToPretrained(ModelHook):
    """Runs the pre-trained model in place of the hooked (fine-tuned) denoiser."""

    def __init__(self, pretrained, null_class):
        super().__init__()
        self.pretrained, self.null_class = pretrained, null_class

    def new_forward(self, module, *args, **kwargs):
        if self.null_class is not None:  # the pre-trained model's null row, not the fine-tuned one's
            if "class_labels" in kwargs:
                kwargs["class_labels"] = torch.full_like(kwargs["class_labels"], self.null_class)
            elif len(args) > 2:  # DiT-style forward(hidden_states, timestep, class_labels, ...)
                args = (*args[:2], torch.full_like(args[2], self.null_class), *args[3:])
        return self.pretrained(*args, **kwargs)


class DomainGuidance(BaseGuidance):
    """Domain Guidance (Zhong et al., ICLR 2025) for diffusers' guider interface.

    Args:
        guidance_scale: w. 1 gives the fine-tuned model alone.
        guidance_rescale: phi of rescale_noise_cfg (Lin et al. 2023), applied after guidance.
        use_original_formulation: pred_ft + w (pred_ft - pred_pre) instead of the form above.
        guidance_channels: guide only channels [0, k) of the prediction, the rest taken from the
            fine-tuned prediction (3: the DiT/DoG scripts' quirk; 4 with an 8-channel learned-sigma
            DiT keeps the fine-tuned variance channels). None guides every channel.
        null_class: label the pre-trained model receives (its null class, 1000 for ImageNet DiTs);
            None passes the unconditional batch's own inputs through unchanged.
        start, stop, enabled: as every diffusers guider.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, guidance_scale: float = 1.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, guidance_channels: int | None = None,
                 null_class: int | None = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self.guidance_channels = guidance_channels
        self.null_class = null_class
        self._pretrained = None

    def set_pretrained_model(self, model) -> "DomainGuidance":
        """Attach the pre-trained model (a module cannot live in the guider's JSON config)."""
        if not callable(model):
            raise TypeError(f"the pre-trained model must be callable, got {type(model).__name__}")
        self._pretrained = model
        return self

    @property
    def pretrained_model(self):
        return self._pretrained

    def prepare_inputs(self, data):
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields):
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(indices, self._input_predictions)]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._is_dog_enabled() and self.is_unconditional:
            if self._pretrained is None:
                raise ValueError("DomainGuidance: no pre-trained model; call guider.set_pretrained_model(model) first")
            registry = HookRegistry.check_if_exists_or_initialize(denoiser)
            registry.register_hook(_RedirectToPretrained(self._pretrained, self.null_class), _HOOK)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        if registry.get_hook(_HOOK) is not None:
            registry.remove_hook(_HOOK, recurse=False)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._is_dog_enabled():
            pred = pred_cond
        else:
            k = pred_cond.shape[1] if self.guidance_channels is None else int(self.guidance_channels)
            if self.use_original_formulation:  # cond + w (cond - uncond) on [0, k)
                g = pred_cond[:, :k] + self.guidance_scale * (pred_cond[:, :k] - pred_uncond[:, :k])
                pred = g if k == pred_cond.shape[1] else torch.cat([g, pred_cond[:, k:]], dim=1)
            else:
                pred = ops.guide_eps(pred_cond, pred_uncond, self.guidance_scale, k)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_dog_enabled() else 1

    def _is_dog_enabled(self) -> bool:
        """Guidance on: enabled, inside [start, stop) of the steps, and w not ~1 (~0 original form)."""
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            lo, hi = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not lo <= self._step < hi:
                return False
        neutral = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.guidance_scale, neutral)
