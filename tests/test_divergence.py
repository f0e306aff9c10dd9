"""Divergence in the sampling loop (dgfast/divergence.py): NaN/inf or exploding x is reported once,
after the loop, with the samples, the first step and whose output it was; healthy runs say nothing;
recording a step reads nothing back from the device."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import samplers
from dgfast.divergence import SANE_LIMIT, DivergenceWarning, Watch
from test_input_checks import pair, z_y  # noqa: F401 (pair: the tiny models, a fixture)

class Breaks(nn.Module):
    """model(x, t, y), except that from the `at`-th call on, rows `rows` of its output become `value`."""

    def __init__(self, model, at, rows, value):
        super().__init__()
        self.model, self.at, self.rows, self.value, self.calls = model, at, rows, value, 0

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        self.calls += 1
        if self.calls > self.at:
            out = out.clone()
            out[self.rows] = self.value
        return out


def divergence_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    found = [w.message for w in caught if isinstance(w.message, DivergenceWarning)]
    assert len(found) <= 1
    return out, (found[0] if found else None)


@pytest.mark.parametrize("sampler,steps", [("ddpm", "6"), ("ddim", "6"), ("dpm2m", "6"), ("flow_euler", 7),
                                           ("flow_heun", 7)])
@pytest.mark.parametrize("which", ["finetuned", "pretrained"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_first_step_and_model_are_named(pair, sampler, steps, which, value):
    ft, pre = pair
    models = dict(finetuned=ft, pretrained=pre)
    models[which] = Breaks(models[which], at=2, rows=[1], value=value).eval()
    z, y = z_y(3)
    out, w = divergence_of(lambda: dgfast.sample(models["finetuned"], models["pretrained"], z, y, steps=steps,
                                                 sampler=sampler, guidance_channels="all", paired=False))
    assert w is not None, "no warning"
    d = w.divergence
    num_steps = 6
    step = 3 if sampler != "flow_heun" else 2  # Heun calls each model twice per step
    assert (d.step + 1, d.num_steps, d.source, d.rows) == (step, num_steps, which, [1])
    text = str(w)
    assert "1 of 3 samples" in text and f"first at step {step} of {num_steps}, in the {which} model's output" in text
    if not np.isfinite(value):  # (1e30 in ddpm's variance channels is exp(1e30) = inf too)
        assert "NaN/inf" in text, text
    assert torch.isfinite(out[[0, 2]]).all() and (out[[0, 2]].abs() < SANE_LIMIT).all()


def test_the_reported_explosion(pair):
    """Model eps of 1e30 gave a sample of 6.9e31 without a word."""
    ft, pre = pair
    z, y = z_y(2)
    exploding = Breaks(ft, at=0, rows=slice(None), value=1e30).eval()
    out, w = divergence_of(lambda: dgfast.sample(exploding, pre, z, y, steps="5", sampler="ddim", guidance_scale=1))
    assert torch.isfinite(out).all() and out.abs().max() > 1e30  # finite: the old NaN count missed it
    assert w is not None and "2 of 2 samples" in str(w) and "first at step 1 of 5, in the finetuned" in str(w)
    assert "|x| = " in str(w) and f"> {SANE_LIMIT:g}" in str(w)


def test_scheduler_and_pipeline_loops_are_watched(pair):
    diffusers = pytest.importorskip("diffusers")
    ft, pre = pair
    z, y = z_y(3)
    bad = Breaks(pre, at=1, rows=[0, 2], value=float("nan")).eval()
    for sch in (diffusers.DDIMScheduler(), diffusers.UniPCMultistepScheduler()):  # fused, and its own step()
        bad.calls = 0
        _, w = divergence_of(lambda: dgfast.sample(ft, bad, z, y, steps=4, scheduler=sch, paired=False))
        assert w is not None and w.divergence.source == "pretrained" and w.divergence.rows == [0, 2]
        assert w.divergence.step == 1


def test_sampler_step_itself_is_named(pair):
    """Finite, in-range model outputs and a step whose arithmetic overflows: the sampler step is named."""
    ft, _ = pair
    z, y = z_y(3)
    plan = samplers.Plan(step_modes=["linear"] * 3, rows=np.array([[1, 0, 1e30, 0, 0, 0, 0]] * 3, np.float32),
                         timesteps=[10, 5, 0], t_dtype=torch.int64, noise=[False] * 3, prev=[False] * 3)
    forwards = samplers.StepForwards(ft, y)
    with pytest.warns(DivergenceWarning, match="first at step 1 of 3, in the sampler step") as record:
        samplers.run(plan, z, forwards, scale=1.0, guidance_channels=0, draw=None, backend="torch")
    assert [w.message.divergence.rows for w in record if w.category is DivergenceWarning] == [[0, 1, 2]]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "flow_heun"])
def test_healthy_sampling_is_silent(pair, sampler):
    ft, pre = pair
    z, y = z_y(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        dgfast.sample(ft, pre, z * 3, y, steps="5" if sampler != "flow_heun" else 5, sampler=sampler,
                      guidance_scale=4.0)


class _NoHostReads:
    """Within the block, any tensor read back to the host (item, tolist, bool, cpu, numpy) raises."""
    names = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def refuse(*a, **k):
            raise AssertionError("a host read inside Watch.record")
        for n in self.names:
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_recording_a_step_reads_nothing_back():
    """One reduction per tensor per step stays on the device; the only read is in divergence()."""
    watch = Watch(2)
    x = torch.randn(3, 4, 5, 5)
    with _NoHostReads():
        watch.record(0, torch.randn(3, 8, 5, 5), None, x)
        watch.record(1, torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5), x * float("nan"))
    d = watch.divergence()
    assert (d.step, d.rows, d.source) == (1, [0, 1, 2], "the sampler step")


@pytest.mark.cuda
def test_recording_a_step_does_not_sync_the_gpu():
    watch = Watch(1)
    out, x = torch.randn(3, 8, 5, 5, device="cuda"), torch.randn(3, 4, 5, 5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        watch.record(0, out, out, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.divergence() is None
