"""Inputs that used to be accepted and silently give wrong samples (issue 13): each is now an
error naming the argument (or the model), and the valid spellings next to them still work.

Tiny random DiTs (8x8 latents, one block) so every case runs in milliseconds.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgfast

CFG = dict(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2)


def tiny(num_classes, seed):
    torch.manual_seed(seed)
    m = dgfast.DiT(num_classes=num_classes, **CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    return tiny(10, 1), tiny(1000, 2)


def z_y(n=2, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.arange(1, n + 1)


class Returns(nn.Module):
    """A model whose forward returns `what(real_output)` (None, a tuple, a cut tensor ...)."""

    def __init__(self, model, what):
        super().__init__()
        self.model, self.what = model, what

    def forward(self, x, t, y):
        return self.what(self.model(x, t, y))


# ----------------------------------------------------------------------------------------------
# Model outputs that are not a tensor of the expected shape: an error naming the model
# ----------------------------------------------------------------------------------------------

BAD_OUTPUTS = {
    "None": lambda out: None,
    "a scalar": lambda out: out.sum(),
    "too few rows": lambda out: out[:1],
    "too few channels": lambda out: out[:, :2],
    "another size": lambda out: out[..., :4],
}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "flow_heun"])
@pytest.mark.parametrize("bad", sorted(BAD_OUTPUTS))
@pytest.mark.parametrize("which", ["finetuned", "pretrained"])
def test_sample_names_the_model_whose_output_is_wrong(pair, which, bad, sampler):
    ft, pre = pair
    models = {"finetuned": ft, "pretrained": pre}
    models[which] = Returns(models[which], BAD_OUTPUTS[bad]).eval()
    z, y = z_y()
    steps = "3" if sampler != "flow_heun" else 3
    with pytest.raises(ValueError, match=rf"^{which} returned"):
        dgfast.sample(models["finetuned"], models["pretrained"], z, y, steps=steps, sampler=sampler)


def test_pretrained_returning_none_is_not_silently_unguided(pair):
    """The reported case: None from the pre-trained model used to turn guidance off."""
    ft, pre = pair
    z, y = z_y()
    with pytest.raises(ValueError, match="pretrained returned NoneType"):
        dgfast.sample(ft, Returns(pre, lambda out: None).eval(), z, y, steps="3", guidance_scale=4.0)
    with pytest.raises(ValueError, match="pretrained returned NoneType"):  # also on reuse / interval paths
        dgfast.sample(ft, Returns(pre, lambda out: None).eval(), z, y, steps="4", pretrained_every=2,
                      guidance_interval=(0.5, 1.0))


def test_cfg_mode_names_the_finetuned_model(pair):
    ft, _ = pair
    z, y = z_y()
    with pytest.raises(ValueError, match="finetuned returned NoneType for the doubled batch"):
        dgfast.sample(Returns(ft, lambda out: None).eval(), None, z, y, steps="3", mode="cfg", cfg_null_label=10)


@pytest.mark.parametrize("which", ["finetuned", "pretrained"])
def test_dog_forward_names_the_model_whose_output_is_wrong(pair, which):
    ft, pre = pair
    models = {"finetuned": ft, "pretrained": pre}
    for bad in ("None", "too few rows", "another size"):
        models_bad = dict(models, **{which: Returns(models[which], BAD_OUTPUTS[bad]).eval()})
        fn = dgfast.dog_forward(models_bad["finetuned"], models_bad["pretrained"], paired=False)
        x, _ = z_y(4)
        with pytest.raises(ValueError, match=rf"^{which} returned"):
            fn(x, torch.full((4,), 10), torch.tensor([1, 2, 1000, 1000]), 1.5)


def test_dog_forward_refuses_outputs_of_two_channel_counts(pair):
    ft, pre = pair
    fn = dgfast.dog_forward(ft, Returns(pre, lambda out: out[:, :4]).eval(), paired=False)
    x, _ = z_y(4)
    with pytest.raises(ValueError, match="finetuned returned 8 channels, pretrained 4"):
        fn(x, torch.full((4,), 10), torch.tensor([1, 2, 1000, 1000]), 1.5)


def test_pipeline_names_the_transformer_whose_output_is_wrong():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from dgfast.diffusers_pipeline import DoGDiTPipeline

    def dit(classes):
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=classes).eval()
    ft, pre = dit(10), dit(1000)
    pre.forward = lambda *a, **k: SimpleNamespace(sample=None)
    pipe = DoGDiTPipeline(ft, pre, None, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="^transformer_pre returned NoneType"):
        pipe([1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="latent")
    del pre.forward  # the class's forward again
    ft.forward = lambda *a, **k: (None,)
    with pytest.raises(ValueError, match="^transformer returned NoneType"):
        pipe([1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="latent")


# ----------------------------------------------------------------------------------------------
# Booleans, scales, seeds, eta, labels
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)])
def test_clip_denoised_must_be_a_bool(pair, value):
    ft, pre = pair
    z, y = z_y()
    with pytest.raises(TypeError, match=r"\bclip_denoised must be True or False"):
        dgfast.sample(ft, pre, z, y, steps="3", clip_denoised=value)


def test_clip_denoised_accepts_bools(pair):
    ft, pre = pair
    z, y = z_y()
    torch.manual_seed(0)
    a = dgfast.sample(ft, pre, z * 5, y, steps="3", clip_denoised=np.bool_(True))
    torch.manual_seed(0)
    b = dgfast.sample(ft, pre, z * 5, y, steps="3", clip_denoised=True)
    torch.manual_seed(0)
    c = dgfast.sample(ft, pre, z * 5, y, steps="3", clip_denoised=False)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("scale", [torch.tensor(float("nan")), torch.tensor(-1.0), torch.tensor([1.5, float("inf")]),
                                   torch.tensor([1.5, -2.0]), torch.tensor([2, 3])])
def test_dog_forward_checks_tensor_scales(pair, scale):
    ft, pre = pair
    fn = dgfast.dog_forward(ft, pre)
    x, _ = z_y(4)
    with pytest.raises((ValueError, TypeError), match=r"\bguidance_scale\b"):
        fn(x, torch.full((4,), 10), torch.tensor([1, 2, 1000, 1000]), scale)


def test_dog_forward_tensor_scales_work(pair):
    ft, pre = pair
    fn = dgfast.dog_forward(ft, pre)
    x, _ = z_y(4)
    t, y = torch.full((4,), 10), torch.tensor([1, 2, 1000, 1000])
    assert torch.equal(fn(x, t, y, torch.tensor(1.5)), fn(x, t, y, 1.5))
    per_sample = fn(x, t, y, torch.tensor([1.5, 2.0]).view(2, 1, 1, 1).repeat(2, 1, 1, 1)[:2])
    assert per_sample.shape == (4, 8, 8, 8)


@pytest.mark.parametrize("seeds", [[0, 2 ** 32], [-1, 3], [2 ** 64 - 1, 0]])
def test_seeds_outside_32_bits_are_refused(pair, seeds):
    ft, pre = pair
    _, y = z_y()
    with pytest.raises(ValueError, match=r"\bseeds\b.*\[0, 2\*\*32\).*identical"):
        dgfast.sample(ft, pre, None, y, steps="3", noise="per-sample", seeds=seeds)


def test_seeds_2_pow_32_apart_would_collide():
    """Why the range: torch's CPU generator keeps a seed's low 32 bits only."""
    def draw(seed):
        return torch.randn(4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(5), draw(5 + 2 ** 32))


@pytest.mark.parametrize("sampler", ["ddpm", "dpm2m", "flow_euler", "flow_heun"])
def test_eta_is_refused_where_it_would_be_ignored(pair, sampler):
    ft, pre = pair
    z, y = z_y()
    steps = 3 if sampler.startswith("flow") else "3"
    with pytest.raises(ValueError, match=rf"\beta=0.5\b.*{sampler!r} does not use it"):
        dgfast.sample(ft, pre, z, y, steps=steps, sampler=sampler, eta=0.5)
    dgfast.sample(ft, pre, z, y, steps=steps, sampler=sampler, eta=0)  # 0 is every sampler's


def test_eta_with_schedulers():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DDPMScheduler
    ft, pre = tiny(10, 1), tiny(1000, 2)
    z, y = z_y()
    with pytest.raises(ValueError, match=r"\beta\b.*\[0, 1\].*DDIMScheduler"):  # NaN samples before
        dgfast.sample(ft, pre, z, y, steps=3, scheduler=DDIMScheduler(), eta=5)
    with pytest.raises(ValueError, match=r"\beta=0.5\b.*DDPMScheduler does not use it"):
        dgfast.sample(ft, pre, z, y, steps=3, scheduler=DDPMScheduler(), eta=0.5)
    out = dgfast.sample(ft, pre, z, y, steps=3, scheduler=DDIMScheduler(), eta=1.0)
    assert torch.isfinite(out).all()


def test_ddim_scheduler_fallback_keeps_eta():
    """A DDIMScheduler configuration the fused step does not cover runs its own step(): eta reaches it."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler
    ft, pre = tiny(10, 1), tiny(1000, 2)
    z, y = z_y()
    sch = DDIMScheduler(thresholding=True)
    outs = []
    for eta in (0.0, 1.0):
        outs.append(dgfast.sample(ft, pre, z, y, steps=3, scheduler=sch, eta=eta, noise="per-sample", seeds=[1, 2]))
    assert not torch.equal(*outs)


def test_cfg_null_label_takes_numpy_and_tensor_ints(pair):
    ft, _ = pair
    z, y = z_y()
    torch.manual_seed(0)
    want = dgfast.sample(ft, None, z, y, steps="3", mode="cfg", cfg_null_label=10)
    for label in (np.int64(10), np.int32(10), torch.tensor(10)):
        torch.manual_seed(0)
        assert torch.equal(dgfast.sample(ft, None, z, y, steps="3", mode="cfg", cfg_null_label=label), want)
    with pytest.raises(ValueError, match="cfg_null_label"):
        dgfast.sample(ft, None, z, y, steps="3", mode="cfg", cfg_null_label=np.float64(10))
