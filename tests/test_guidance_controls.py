"""Guidance controls of dgfast.sample: guidance_interval, guidance_rescale, mode="cfg", pretrained_every.

Forwards are counted with recording models (paired=False, so every branch is one call), results are
compared with literal loops that apply each control by hand.
"""
import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import ops, samplers

C = 4


class Recorder(nn.Module):
    """Elementwise synthetic model that records every call's labels and timesteps."""

    def __init__(self, seed, num_classes=10, table_rows=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(2 * C, C, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(2 * C, generator=g) * 0.1)
        self.num_classes = num_classes
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(table_rows or num_classes + 1, 1)
        self.labels, self.times = [], []

    def forward(self, x, t, y):
        self.labels.append(y.clone())
        self.times.append(t.clone())
        h = torch.einsum("oc,nchw->nohw", self.w, x) + self.b.view(1, -1, 1, 1)
        return torch.tanh(h * (1 + t.float().view(-1, 1, 1, 1) / 1000) + y.float().view(-1, 1, 1, 1) * 0.01)

    def reset(self):
        self.labels, self.times = [], []
        return self


def models():
    return Recorder(1).eval(), Recorder(2, num_classes=1000).eval()


def inputs(n=2, seed=0):
    return torch.randn(n, C, 4, 6, generator=torch.Generator().manual_seed(seed)), torch.arange(1, n + 1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# guidance_interval
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps,evals_per_step", [("ddpm", "20", 1), ("ddim", "ddim25", 1),
                                                          ("dpm2m", "13", 1), ("flow_heun", 8, 2)])
@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.5), (0.3, 0.7), (0.25, 1.0), (0.5, 0.5), (0.1, 0.15)])
def test_interval_pretrained_forwards_exact(sampler, steps, evals_per_step, interval):
    ft, pre = models()
    z, y = inputs()
    dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps=steps, sampler=sampler, guidance_interval=interval,
                  paired=False)
    N = len(ft.times) // evals_per_step
    lo, hi = int(interval[0] * N), int(interval[1] * N)
    assert len(pre.labels) == (hi - lo) * evals_per_step  # the prediction, exactly
    assert all(bool((lab == 1000).all()) for lab in pre.labels)
    # and on exactly those steps: the pre-trained model saw the fine-tuned model's timesteps lo..hi-1
    step_t = [float(t[0]) for t in ft.times[::evals_per_step]]
    assert [float(t[0]) for t in pre.times[::evals_per_step]] == step_t[lo:hi]


def test_interval_with_a_diffusers_scheduler_counts():
    from diffusers import DPMSolverMultistepScheduler
    ft, pre = models()
    z, y = inputs()
    dgfast.sample(ft, pre, z, y, scheduler=DPMSolverMultistepScheduler(), steps=10, guidance_interval=(0.2, 0.6),
                  paired=False)
    assert len(ft.labels) == 10 and len(pre.labels) == 4


def test_interval_result_matches_literal_loop():
    """Outside the interval the step is the fine-tuned model's own (DDIM, diffusers' loop + rule)."""
    from diffusers import DDIMScheduler
    ft, pre = models()
    z, y = inputs(3)
    sch = DDIMScheduler(clip_sample=False)
    sch.set_timesteps(10)
    lo, hi = int(0.2 * 10), int(0.7 * 10)
    x = z
    for i, t in enumerate(sch.timesteps):
        tt = t.expand(3)
        eps = ft(x, tt, y)[:, :C]
        if lo <= i < hi:
            u = pre(x, tt, torch.full_like(y, 1000))[:, :C]
            eps = u + 2.0 * (eps - u)
        x = sch.step(eps, t, x).prev_sample
    out = dgfast.sample(ft, pre, z, y, guidance_scale=2.0, scheduler=DDIMScheduler(clip_sample=False), steps=10,
                        guidance_interval=(0.2, 0.7), guidance_channels="all")
    assert rel_err(out, x) < 1e-5


def test_full_interval_is_the_default_bitwise():
    ft, pre = models()
    z, y = inputs()
    torch.manual_seed(0)
    a = dgfast.sample(ft, pre, z, y, steps="10", backend="torch")
    torch.manual_seed(0)
    b = dgfast.sample(ft, pre, z, y, steps="10", backend="torch", guidance_interval=(0.0, 1.0), pretrained_every=1,
                      guidance_rescale=0.0)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# guidance_rescale
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 4])
def test_rescale_matches_diffusers_rescale_noise_cfg(k):
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    g = torch.Generator().manual_seed(3)
    x, ft_out, pre_out = (torch.randn(3, s, 5, 7, generator=g) for s in (C, 2 * C, 2 * C))
    noise = torch.randn(3, C, 5, 7, generator=g)
    row = (1.3, 0.7, 0.9, 0.4, -0.2, 0.0, 0.3)
    guided = ops.guide_eps(ft_out[:, :C], pre_out, 2.0, k)
    eps = guider_utils.rescale_noise_cfg(guided, ft_out[:, :C], 0.7)
    want = ops.guided_step_torch(x, eps, None, noise, row, step_mode="linear")
    for backend in ("torch", "auto"):
        out = ops.guided_step(x, ft_out, pre_out, noise, row, scale=2.0, guidance_channels=k, step_mode="linear",
                              guidance_rescale=0.7, backend=backend)
        assert torch.equal(out, want)
    # ddpm mode keeps the fine-tuned variance channels next to the rescaled eps
    ddpm_row = (1.1, 0.3, 0.8, 0.2, -5.0, -3.0, 1.0)
    want = ops.guided_step_torch(x, torch.cat([eps, ft_out[:, C:]], 1), None, noise, ddpm_row)
    out = ops.guided_step(x, ft_out, pre_out, noise, ddpm_row, scale=2.0, guidance_channels=k,
                          guidance_rescale=0.7, backend="torch")
    assert torch.equal(out, want)


def test_rescale_in_a_sampling_loop():
    from diffusers import DDIMScheduler
    from diffusers.guiders.guider_utils import rescale_noise_cfg
    ft, pre = models()
    z, y = inputs(3)
    sch = DDIMScheduler(clip_sample=False)
    sch.set_timesteps(8)
    x = z
    for t in sch.timesteps:
        tt = t.expand(3)
        c, u = ft(x, tt, y)[:, :C], pre(x, tt, torch.full_like(y, 1000))[:, :C]
        x = sch.step(rescale_noise_cfg(u + 3.0 * (c - u), c, 0.5), t, x).prev_sample
    out = dgfast.sample(ft, pre, z, y, guidance_scale=3.0, scheduler=DDIMScheduler(clip_sample=False), steps=8,
                        guidance_rescale=0.5, guidance_channels="all")
    assert rel_err(out, x) < 1e-5


# ----------------------------------------------------------------------------------------------
# mode="cfg"
# ----------------------------------------------------------------------------------------------

def test_cfg_uses_the_finetuned_null_label():
    ft, _ = models()
    z, y = inputs(2)
    out = dgfast.sample(ft, None, z, y, guidance_scale=1.5, steps="ddim10", sampler="ddim", mode="cfg",
                        guidance_channels="all", backend="torch")
    assert len(ft.labels) == 10
    for lab in ft.labels:  # one 2n batch per step: [y; null], null = the fine-tuned num_classes
        assert lab.tolist() == [1, 2, 10, 10]
    # literal CFG loop on DiT's DDIM (same rows, torch step)
    ft2, _ = models()
    plan = samplers.native_plan("ddim", "ddim10")
    torch.manual_seed(0)
    x = z
    for i in range(plan.num_steps):
        t = torch.full((2,), plan.timesteps[i])
        c, u = ft2(x, t, y), ft2(x, t, torch.full_like(y, 10))
        x = ops.guided_step_torch(x, c, u, torch.randn(4, C, 4, 6)[:2], plan.rows[i], scale=1.5,
                                  guidance_channels=C, step_mode="ddim")
    assert rel_err(out, x) < 1e-6


def test_cfg_null_label_override_and_checks():
    ft, pre = models()
    z, y = inputs(2)
    dgfast.sample(ft, None, z, y, guidance_scale=2.0, steps="5", mode="cfg", cfg_null_label=7)
    assert ft.labels[0].tolist() == [1, 2, 7, 7]
    with pytest.raises(ValueError, match="pretrained=None"):
        dgfast.sample(ft, pre, z, y, guidance_scale=2.0, steps="5", mode="cfg")
    no_null = Recorder(3, num_classes=10, table_rows=10).eval()  # trained without label dropout: no null row
    with pytest.raises(ValueError, match="cfg_null_label"):
        dgfast.sample(no_null, None, z, y, guidance_scale=2.0, steps="5", mode="cfg")
    with pytest.raises(ValueError, match="mode"):
        dgfast.sample(ft, pre, z, y, steps="5", mode="autoguidance")


# ----------------------------------------------------------------------------------------------
# pretrained_every
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [2, 3])
def test_pretrained_every_counts_and_reuse(every):
    ft, pre = models()
    z, y = inputs(2)
    out = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps="12", sampler="dpm2m", pretrained_every=every,
                        guidance_interval=(0.0, 0.75), guidance_channels="all", paired=False)
    guided = int(0.75 * 12)
    assert len(ft.labels) == 12 and len(pre.labels) == -(-guided // every)
    # literal: evaluate the pre-trained model on guided evaluations 0, k, 2k, ... and reuse it in between
    ft2, pre2 = models()
    plan = samplers.native_plan("dpm2m", "12")
    x, state, cache = z, None, None
    for i in range(12):
        t = torch.full((2,), plan.timesteps[i])
        c = ft2(x, t, y)
        u = None
        if i < guided:
            if i % every == 0:
                cache = pre2(x, t, torch.full_like(y, 1000))
            u = cache
        x, state = ops.guided_step_torch(x, c, u, None, plan.rows[i], scale=1.5, guidance_channels=C if u is not None
                                         else 0, step_mode="linear", prev=state if plan.prev[i] else None,
                                         return_state=True)
    assert torch.equal(out, x)


def test_controls_validate():
    ft, pre = models()
    z, y = inputs(1)
    for bad in [(0.5, 0.4), (1.0, 1.0), (-0.1, 0.5), (0.0, 1.5)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            dgfast.sample(ft, pre, z, y, steps="5", guidance_interval=bad)
    with pytest.raises(TypeError, match="guidance_interval"):
        dgfast.sample(ft, pre, z, y, steps="5", guidance_interval=0.5)
    for bad in [-0.1, 1.5, float("nan"), "x"]:
        with pytest.raises(ValueError, match="guidance_rescale"):
            dgfast.sample(ft, pre, z, y, steps="5", guidance_rescale=bad)
    for bad in [0, 1.5, True]:
        with pytest.raises(ValueError, match="pretrained_every"):
            dgfast.sample(ft, pre, z, y, steps="5", pretrained_every=bad)
