"""DomainGuidance: Domain Guidance as a diffusers guider (diffusers.guiders.BaseGuidance).

Classifier-free guidance whose unconditional batch runs the pre-trained model:

    pred = pred_pre(x, null) + w * (pred_ft(x, y) - pred_pre(x, null))

    guider = DomainGuidance(guidance_scale=1.5, null_class=1000).set_pretrained_model(transformer_pre)
    pipe.update_components(guider=guider)          # a modular pipeline's guider slot

The denoiser a pipeline calls is the fine-tuned model. On the unconditional batch,
`prepare_models` registers a diffusers ModelHook on it whose forward sends the call to the
pre-trained model with the pre-trained model's own null class, and `cleanup_models` removes the
hook. A forward that raises removes the hook itself, so an interrupted step never leaves the
fine-tuned model answering with the pre-trained one. Outside [start, stop) guidance is off, the
pipeline runs the conditional batch only, and the pre-trained model is not evaluated at all.
"""
from __future__ import annotations

import math
import numbers

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg
from diffusers.hooks import HookRegistry, ModelHook

from dgfast import ops
from dgfast.api import check_label, check_scale, label_table_rows, resolve_channels

_HOOK = "dgfast_domain_guidance"


# where a denoiser call can carry its labels: diffusers' name, upstream DiT's name, or the third
# positional argument (forward(hidden_states, timestep, class_labels) / forward(x, t, y))
_LABEL_KWARGS = ("class_labels", "y")


def _null_labels(args, kwargs, null):
    """args, kwargs with the class labels replaced by `null`; an error when they cannot be found
    (guessing would hand the pre-trained model the fine-tuned model's null label, a real class).
    null None: a pre-trained model without class labels, called as the denoiser was."""
    if null is None:
        return args, kwargs
    for name in _LABEL_KWARGS:
        if name in kwargs:
            return args, {**kwargs, name: _full(kwargs[name], null, name)}
    if len(args) > 2:
        return (*args[:2], _full(args[2], null, "the third positional argument"), *args[3:]), kwargs
    raise TypeError("DomainGuidance: the denoiser was called without class labels where the guider can "
                    "replace them (the third positional argument, class_labels= or y=), so it cannot give "
                    f"the pre-trained model its null class {null}; keyword arguments were {sorted(kwargs)}")


def _full(labels, null, where):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"DomainGuidance: class labels ({where}) must be a tensor, got {type(labels).__name__}")
    return torch.full_like(labels, null)


class _RedirectToPretrained(ModelHook):
    """Runs the pre-trained model in place of the hooked (fine-tuned) denoiser, with its null class."""

    def __init__(self, pretrained, null_class: int):
        super().__init__()
        self.pretrained, self.null_class = pretrained, null_class
        self._running = False

    def new_forward(self, module, *args, **kwargs):
        if self._running:  # the pre-trained model called the hooked denoiser: it would recurse forever
            _remove_hook(module)
            raise ValueError("DomainGuidance: the pre-trained model calls the fine-tuned denoiser itself; "
                             "set_pretrained_model needs a separate model")
        self._running = True
        try:
            args, kwargs = _null_labels(args, kwargs, self.null_class)
            return self.pretrained(*args, **kwargs)
        except BaseException:  # Ctrl-C, OOM, a bad label: restore the denoiser before propagating
            _remove_hook(module)
            raise
        finally:
            self._running = False


def _remove_hook(denoiser) -> None:
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_HOOK) is not None:
        registry.remove_hook(_HOOK, recurse=False)


def pretrained_null_class(model) -> int | None:
    """The pre-trained model's null label: its class count (dgfast/upstream DiT `num_classes`,
    diffusers `num_embeds_ada_norm`), else its label table's last row; None for a model without
    class labels (it then receives the denoiser's call unchanged)."""
    classes = getattr(model, "num_classes", None)
    config = getattr(model, "config", None)
    if classes is None and config is not None:
        classes = config.get("num_embeds_ada_norm") if hasattr(config, "get") else None
    rows = label_table_rows(model)
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        if rows is not None and rows <= classes:
            raise ValueError(f"DomainGuidance: the pre-trained model's label table has {rows} rows for {classes} "
                             "classes, no null row; pass null_class= explicitly")
        return int(classes)
    if rows is not None:
        return rows - 1
    if isinstance(model, torch.nn.Module):
        return None  # a module with no label table (e.g. a text-conditioned denoiser): it gets the same call
    raise ValueError(f"DomainGuidance: cannot tell the null class of the pre-trained model "
                     f"({type(model).__name__}); pass null_class= (1000 for ImageNet DiTs)")


def _check_config(guidance_scale, guidance_rescale, guidance_channels, null_class, start, stop) -> None:
    """At construction (and from_config / new), so a bad setting fails before the first step."""
    check_scale(guidance_scale)
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real) \
            or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if guidance_channels is not None and guidance_channels != "all":
        if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, numbers.Integral) \
                or guidance_channels < 0:
            raise ValueError(f"guidance_channels must be an int >= 0, 'all' or None, got {guidance_channels!r}")
    if null_class is not None:
        check_label(null_class, "null_class", None)
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    if start >= stop:
        raise ValueError(f"start must be below stop, got start={start}, stop={stop}")


class DomainGuidance(BaseGuidance):
    """Domain Guidance (Zhong et al., ICLR 2025) for diffusers' guider interface.

    Args:
        guidance_scale: w. 1 gives the fine-tuned model alone.
        guidance_rescale: phi of rescale_noise_cfg (Lin et al. 2023), applied after guidance.
        use_original_formulation: pred_ft + w (pred_ft - pred_pre) instead of the form above.
        guidance_channels: guide only channels [0, k) of the prediction, the rest taken from the
            fine-tuned prediction (3: the DiT/DoG scripts' quirk; 4 with an 8-channel learned-sigma
            DiT keeps the fine-tuned variance channels). None or "all" guides every channel.
        null_class: label the pre-trained model receives (its null class, 1000 for ImageNet DiTs).
            None: the pre-trained model's own null row, read from the model (num_classes,
            num_embeds_ada_norm or its label table); an error when the model does not say.
        start, stop, enabled: as every diffusers guider.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, guidance_scale: float = 1.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, guidance_channels: int | str | None = None,
                 null_class: int | None = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        _check_config(guidance_scale, guidance_rescale, guidance_channels, null_class, start, stop)
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
        self._null_for(model)  # fail here, not at the first guided step
        self._pretrained = model
        return self

    def _null_for(self, model) -> int:
        if self.null_class is None:
            return pretrained_null_class(model)
        return check_label(self.null_class, "null_class", label_table_rows(model))

    def new(self, **kwargs) -> "DomainGuidance":
        """A copy with some settings changed; the pre-trained model (not part of the config) comes along."""
        copy = super().new(**kwargs)
        return copy if self._pretrained is None else copy.set_pretrained_model(self._pretrained)

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
            if self._pretrained is denoiser:
                raise ValueError("DomainGuidance: the pre-trained model is the denoiser itself; for one model "
                                 "guiding itself use diffusers' ClassifierFreeGuidance")
            hook = _RedirectToPretrained(self._pretrained, self._null_for(self._pretrained))
            _remove_hook(denoiser)  # a hook an interrupted step left behind (another guider's too)
            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(hook, _HOOK)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        _remove_hook(denoiser)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._is_dog_enabled():
            pred = pred_cond
        else:
            channels = self.guidance_channels
            channels = "all" if channels is None or channels == "all" else int(channels)
            k = resolve_channels(channels, pred_cond.shape[1])  # beyond the prediction's channels: an error
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
