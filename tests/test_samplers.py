"""Samplers through the fused guided step (dgfast.samplers, ops.guided_step modes linear/euler/heun).

- diffusers schedulers: dgfast.sample(scheduler=...) against the scheduler's own step() loop on the
  same guided prediction and the same noise stream (float tolerance: the fused step forms x0 with
  precomputed reciprocals and folds DPM's 1/r into its coefficient);
- native samplers against literal transcriptions: DPM-Solver++(2M) as k-diffusion writes it (sigma
  space, float64), SiT's fixed-grid Euler / Heun velocity ODE;
- the new op modes: every backend bit-equal to the torch twin on awkward, strided inputs.
The "models" are elementwise synthetic functions (fast, batch-independent) except where a tiny DiT
is the point.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgfast
from dgfast import ops, samplers
from dgfast.schedule import Schedule

try:  # only the scheduler tests need diffusers; the native samplers and op modes run without it
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,
                           UniPCMultistepScheduler)
    HAS_DIFFUSERS = True
except ImportError:
    HAS_DIFFUSERS = False
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")

C = 4
RTOL = 1e-5


class Synth(nn.Module):
    """Elementwise stand-in for a DiT: out = tanh(W x (1 + t/1000) + b + y/100), 2C channels."""

    def __init__(self, seed, out=2 * C):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(out, C, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(out, generator=g) * 0.1)
        self.in_channels, self.out_channels, self.num_classes = C, out, 10
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(y.clone())
        tt = t.float().view(-1, 1, 1, 1) / 1000
        h = torch.einsum("oc,nchw->nohw", self.w, x) + self.b.view(1, -1, 1, 1)
        return torch.tanh(h * (1 + tt) + y.float().view(-1, 1, 1, 1) * 0.01)


@pytest.fixture(scope="module")
def pair():
    return Synth(1).eval(), Synth(2).eval()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def backends(moves_to_cuda=False):
    """torch, cpp, triton params. Triton runs interpreted on CPU tensors, or compiled on CUDA ones
    only in tests that put their tensors on device_for(backend) (moves_to_cuda): those are marked
    cuda there, so `pytest -m cuda` (make gpu-check) runs them."""
    params = [pytest.param("torch", id="torch")]
    cpp_ok = ops.cpp_extension() is not None
    params.append(pytest.param("cpp", id="cpp", marks=[] if cpp_ok else pytest.mark.skip(reason="C++ ops not built")))
    if ops.triton_kernels() is None:
        marks = pytest.mark.skip(reason="Triton kernels not importable")
    elif ops.triton_interpreting():
        marks = []
    elif torch.cuda.is_available():
        marks = pytest.mark.cuda if moves_to_cuda else pytest.mark.skip(
            reason="CPU tensors, compiled Triton: needs TRITON_INTERPRET=1 (the cuda-marked tests cover CUDA)")
    else:
        marks = pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is not 1")
    params.append(pytest.param("triton", id="triton", marks=marks))
    return params


def need_modes(backend, *modes):
    if backend == "torch":
        return
    missing = [m for m in modes if m not in ops.backend_modes(backend)]
    if missing:
        pytest.skip(f"backend {backend} does not implement {missing} yet")


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# diffusers schedulers: fused plan vs the scheduler's own step()
# ----------------------------------------------------------------------------------------------

SCHEDULERS = {
    "ddpm-learned_range": (lambda: DDPMScheduler(variance_type="learned_range", clip_sample=False), {}),
    "ddpm-fixed_small-clip": (lambda: DDPMScheduler(), {}),
    "ddpm-fixed_large": (lambda: DDPMScheduler(variance_type="fixed_large", clip_sample=False), {}),
    "ddpm-fixed_small_log-linspace": (lambda: DDPMScheduler(variance_type="fixed_small_log", clip_sample=False,
                                                            timestep_spacing="linspace"), {}),
    "ddim": (lambda: DDIMScheduler(clip_sample=False), {"eta": 0.0}),
    "ddim-eta-clip": (lambda: DDIMScheduler(), {"eta": 0.6}),
    "dpm++2m": (lambda: DPMSolverMultistepScheduler(), {}),
    "dpm++1": (lambda: DPMSolverMultistepScheduler(solver_order=1), {}),
    "dpm++2m-heun-sigma_min": (lambda: DPMSolverMultistepScheduler(solver_type="heun", final_sigmas_type="sigma_min",
                                                                   lower_order_final=False), {}),
    "dpm++2m-karras": (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True), {}),
    "sde-dpm++2m": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}),
    "euler": (lambda: EulerDiscreteScheduler(), {}),
    "euler-karras-trailing": (lambda: EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="trailing"), {}),
    "flowmatch": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
    "flowmatch-stochastic": (lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {}),
}
FALLBACK = {
    "pndm": lambda: PNDMScheduler(),
    "unipc": lambda: UniPCMultistepScheduler(),
    "ddim-thresholding": lambda: DDIMScheduler(thresholding=True),
    "dpm-order3": lambda: DPMSolverMultistepScheduler(solver_order=3),
}
# Interpreted Triton costs milliseconds per program: one scheduler per kernel path there (the modes
# themselves are checked bit for bit against the torch twin below).
TRITON_CASES = ("ddpm-learned_range", "ddim-eta-clip", "sde-dpm++2m", "flowmatch")


def diffusers_loop(sch, ft, pre, z, y, scale, steps, k=C, eta=None, null=1000):
    """The reference: a DiTPipeline-style loop on the n kept rows, guidance on channels [0, k),
    learned variance passed on only to a scheduler that reads it."""
    sch.set_timesteps(steps)
    learned = sch.config.get("variance_type") in ("learned", "learned_range")
    x = z * getattr(sch, "init_noise_sigma", 1.0)
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        tt = t.expand(len(x))
        c, u = ft(x_in, tt, y), pre(x_in, tt, torch.full_like(y, null))
        eps = torch.cat([u[:, :k] + scale * (c[:, :k] - u[:, :k]), c[:, k:C]], dim=1)
        out = torch.cat([eps, c[:, C:]], dim=1) if learned else eps
        x = sch.step(out, t, x, **({} if eta is None else {"eta": eta})).prev_sample
    return x


@needs_diffusers
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_fused_matches_its_step(pair, name, backend):
    make, kw = SCHEDULERS[name]
    if backend == "triton" and not torch.cuda.is_available() and name not in TRITON_CASES:
        pytest.skip("interpreted Triton: one scheduler per kernel path (see TRITON_CASES)")
    plan = samplers.scheduler_plan(make(), 12, "cpu", kw.get("eta", 0.0))
    assert plan.scheduler is None, "expected a fused plan"
    need_modes(backend, *set(plan.step_modes))
    ft, pre = pair
    z, y = torch.randn(3, C, 5, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    torch.manual_seed(7)  # both loops draw their noise from the default generator, same steps and shapes
    ref = diffusers_loop(make(), ft, pre, z, y, 1.7, 12, k=3, **kw)
    torch.manual_seed(7)
    out = dgfast.sample(ft, pre, z, y, guidance_scale=1.7, scheduler=make(), steps=12, guidance_channels=3,
                        backend=backend, **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < RTOL, name


@needs_diffusers
@pytest.mark.parametrize("name", list(FALLBACK))
def test_other_schedulers_run_their_own_step(pair, name):
    ft, pre = pair
    assert samplers.scheduler_plan(FALLBACK[name](), 10, "cpu").scheduler is not None
    z, y = torch.randn(2, C, 4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 5])
    torch.manual_seed(3)
    ref = diffusers_loop(FALLBACK[name](), ft, pre, z, y, 2.0, 10)
    torch.manual_seed(3)
    out = dgfast.sample(ft, pre, z, y, guidance_scale=2.0, scheduler=FALLBACK[name](), steps=10,
                        guidance_channels="all")
    assert torch.equal(out, ref)


@needs_diffusers
def test_scheduler_per_sample_noise_is_batch_independent(pair):
    """noise='per-sample' with a stochastic scheduler: sample i depends only on seeds[i]."""
    ft, pre = pair
    z = torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3])
    kw = dict(guidance_scale=1.5, steps=8, noise="per-sample")
    both = dgfast.sample(ft, pre, z, y, scheduler=DDPMScheduler(clip_sample=False), seeds=[10, 11, 12], **kw)
    one = dgfast.sample(ft, pre, z[1:2], y[1:2], scheduler=DDPMScheduler(clip_sample=False), seeds=[11], **kw)
    assert torch.equal(both[1:2], one)


@needs_diffusers
def test_scheduler_steps_none_keeps_its_timesteps(pair):
    ft, pre = pair
    sch = DPMSolverMultistepScheduler()
    sch.set_timesteps(timesteps=[999, 700, 400, 100])
    z, y = torch.randn(1, C, 4, 4), torch.tensor([1])
    dgfast.sample(ft, pre, z, y, scheduler=sch, steps=None)
    assert sch.timesteps.tolist() == [999, 700, 400, 100]
    with pytest.raises(ValueError, match="set_timesteps"):
        dgfast.sample(ft, pre, z, y, scheduler=DPMSolverMultistepScheduler(), steps=None)
    with pytest.raises(ValueError, match="sampler= or scheduler="):
        dgfast.sample(ft, pre, z, y, scheduler=sch, sampler="ddim")


@needs_diffusers
@pytest.mark.parametrize("steps", [0, -3])
def test_scheduler_steps_must_be_positive(pair, steps):
    """-3 used to run no step at all and return the noise as the sample; 0 a raw ZeroDivisionError."""
    ft, pre = pair
    with pytest.raises(ValueError, match="steps .*>= 1"):
        dgfast.sample(ft, pre, torch.randn(1, C, 4, 4), torch.tensor([1]), scheduler=DDPMScheduler(), steps=steps)


@needs_diffusers
def test_scheduler_class_instead_of_instance(pair):
    ft, pre = pair
    with pytest.raises(TypeError, match=r"scheduler must be a scheduler instance, e.g. DDPMScheduler\(\)"):
        dgfast.sample(ft, pre, torch.randn(1, C, 4, 4), torch.tensor([1]), scheduler=DDPMScheduler, steps=4)


@needs_diffusers
@pytest.mark.parametrize("name", list(samplers.NAMED_SCHEDULERS))
def test_named_scheduler_is_the_instance(pair, name):
    """sample(scheduler="dpmpp-2m-karras") is the diffusers scheduler it names, on DiT's betas (the
    defaults of these two classes), built afresh for every call."""
    ft, pre = pair
    cls, config = samplers.NAMED_SCHEDULERS[name]
    sch = samplers.named_scheduler(name)
    assert type(sch).__name__ == cls and all(sch.config[k] == v for k, v in config.items())
    assert (sch.config.beta_start, sch.config.beta_end, sch.config.beta_schedule) == (1e-4, 0.02, "linear")
    make = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler, "UniPCMultistepScheduler":
            UniPCMultistepScheduler}[cls]
    z, y = torch.randn(2, C, 4, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 5])
    kw = dict(guidance_scale=1.5, steps=9, noise="per-sample", seeds=[3, 4])
    want = dgfast.sample(ft, pre, z, y, scheduler=make(**config), **kw)
    assert torch.equal(dgfast.sample(ft, pre, z, y, scheduler=name, **kw), want)
    assert torch.equal(dgfast.sample(ft, pre, z, y, scheduler=name, **kw), want)  # no state kept between calls


def test_named_scheduler_errors(pair, monkeypatch):
    ft, pre = pair
    z, y = torch.randn(1, C, 4, 4), torch.tensor([1])
    with pytest.raises(ValueError, match="'dpm-fast' is not a named scheduler; choose one of dpmpp-2m, "):
        dgfast.sample(ft, pre, z, y, scheduler="dpm-fast", steps=4)
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="diffusers is not installed"):
        dgfast.sample(ft, pre, z, y, scheduler="dpmpp-2m-karras", steps=4)


@needs_diffusers
def test_learned_range_on_a_tiny_dit():
    """DDPMScheduler(learned_range) with real DiTs: the fine-tuned variance channels are used."""
    torch.manual_seed(0)
    cfg = dict(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    ft = dgfast.DiT(num_classes=10, **cfg).eval()
    pre = dgfast.DiT(num_classes=1000, **cfg).eval()
    for m in (ft, pre):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    z, y = torch.randn(2, C, 8, 8), torch.tensor([3, 4])
    make = lambda: DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")  # noqa
    torch.manual_seed(1)
    ref = diffusers_loop(make(), ft, pre, z, y, 1.5, 10)
    torch.manual_seed(1)
    out = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, scheduler=make(), steps=10, guidance_channels="all",
                        paired=False, backend="torch")
    assert rel_err(out, ref) < RTOL


# ----------------------------------------------------------------------------------------------
# Native samplers vs literal transcriptions
# ----------------------------------------------------------------------------------------------

def guided_fn(ft, pre, y, scale, k=C):
    def f(x, t):
        c, u = ft(x, t, y)[:, :C], pre(x, t, torch.full_like(y, 1000))[:, :C]
        return torch.cat([u[:, :k] + scale * (c[:, :k] - u[:, :k]), c[:, k:]], dim=1)
    return f


def kdiffusion_dpmpp_2m(f, z, schedule, first_order_into_last=False):
    """k-diffusion's sample_dpmpp_2m (sigma space, x_ve = x_vp / alpha) on DiT's respaced schedule,
    in float64; the model sees x_vp and the original timestep index. first_order_into_last: the step
    into the grid's last point (t = 0) is first order too, as dgfast's dpm2m takes it (dit_dpm2m)."""
    ac = schedule.tables["alphas_cumprod"][::-1]
    tmap = schedule.timestep_map[::-1]
    sig = np.append(np.sqrt((1 - ac) / ac), 0.0)
    x = z.double() * np.sqrt(1 + sig[0] ** 2)
    old = None
    for i in range(len(tmap)):
        alpha = 1 / np.sqrt(1 + sig[i] ** 2)
        eps = f((x * alpha).float(), torch.full((len(z),), int(tmap[i]))).double()
        denoised = x - sig[i] * eps
        if sig[i + 1] == 0:
            return denoised
        t, t_next = -np.log(sig[i]), -np.log(sig[i + 1])
        h = t_next - t
        if old is None or (first_order_into_last and sig[i + 2] == 0):
            x = (sig[i + 1] / sig[i]) * x - np.expm1(-h) * denoised
        else:
            r = (t - (-np.log(sig[i - 1]))) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sig[i + 1] / sig[i]) * x - np.expm1(-h) * d
        old = denoised
    return x


def sit_ode(f, z, num_steps, heun):
    """SiT sample_ode on torchdiffeq's fixed grid linspace(0, 1, num_steps): Euler or Heun."""
    t = torch.linspace(0, 1, num_steps)
    x = z
    for i in range(num_steps - 1):
        dt = t[i + 1] - t[i]
        k1 = f(x, torch.ones(len(z)) * t[i])
        if heun:
            k2 = f(x + dt * k1, torch.ones(len(z)) * t[i + 1])
            x = x + dt * (k1 + k2) / 2
        else:
            x = x + dt * k1
    return x


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("steps", ["20", "ddim10"])
def test_dpm2m_matches_kdiffusion(pair, steps, backend):
    need_modes(backend, "linear")
    ft, pre = pair
    z, y = torch.randn(3, C, 5, 7, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 2, 3])
    ref = kdiffusion_dpmpp_2m(guided_fn(ft, pre, y, 1.5), z, Schedule.from_steps(steps), first_order_into_last=True)
    out = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps=steps, sampler="dpm2m", guidance_channels="all",
                        backend=backend)
    assert rel_err(out, ref) < RTOL


@pytest.mark.parametrize("steps", ["20", "ddim10"])
def test_dpm2m_plan_with_one_first_order_step_is_kdiffusion(pair, steps):
    """dit_dpm2m(first_order_final=1) is k-diffusion's sample_dpmpp_2m exactly (second order up to
    the t = 0 point); the default differs from it in that one step only."""
    ft, pre = pair
    z, y = torch.randn(3, C, 5, 7, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 2, 3])
    f = guided_fn(ft, pre, y, 1.5)
    ref = kdiffusion_dpmpp_2m(f, z, Schedule.from_steps(steps))
    plan = samplers.dit_dpm2m(Schedule.from_steps(steps), first_order_final=1)
    def two_pass(x, t, labels, null):
        return ft(x, t, labels), pre(x, t, torch.full_like(labels, null))
    forwards = samplers.StepForwards(ft, y, two_pass, 1000, range(plan.num_steps))
    out = samplers.run(plan, z, forwards, scale=1.5, guidance_channels=C, draw=None, backend="torch")
    assert rel_err(out, ref) < RTOL
    default = samplers.dit_dpm2m(Schedule.from_steps(steps))
    assert [i for i in range(plan.num_steps) if plan.prev[i] != default.prev[i]] == [plan.num_steps - 2]


@pytest.mark.parametrize("steps", ["3", "4", "5", "8", "10", "12", "15", "20", "25", "50", "100", "250", "ddim10",
                                   "ddim25"])
def test_dpm2m_never_extrapolates_the_x0_change(steps):
    """On DiT's uniform grids no second-order step amplifies the change of the guided x0: its weight
    1/(2r) = T/P stays <= 1 (r = h_{i-1}/h_i >= 1/2). The step into t = 0 had r ~ 0.2-0.45, weight up
    to 2.4: with k-diffusion's order rule native dpm2m lost ~10 points of class accuracy on the
    embedded pair at 10-20 steps (docs/upstream_sampling.md)."""
    plan = samplers.native_plan("dpm2m", steps)
    weight = plan.rows[:, 5] / plan.rows[:, 3]
    assert all(plan.prev[i] == (weight[i] != 0) for i in range(plan.num_steps))
    assert weight.max() <= 1.0, (steps, weight)
    old = samplers.dit_dpm2m(Schedule.from_steps(steps), first_order_final=1)
    if old.num_steps > 3:  # the property is what tells the two order rules apart
        assert (old.rows[:, 5] / old.rows[:, 3]).max() > 1.0


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun"])
def test_flow_matches_sit_ode(pair, sampler, backend):
    """Velocity guidance with SiT's 3-channel quirk (channel 3 of v unguided), continuous t."""
    need_modes(backend, "flow_euler", "flow_heun")
    ft, pre = pair
    z, y = torch.randn(3, C, 5, 7, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 2, 3])
    ref = sit_ode(guided_fn(ft, pre, y, 1.5, k=3), z, 9, heun=sampler == "flow_heun")
    out = dgfast.sample(ft, pre, z, y, guidance_scale=1.5, steps=9, sampler=sampler, guidance_channels=3,
                        backend=backend)
    assert torch.equal(out, ref) if backend == "torch" else rel_err(out, ref) < 1e-6


def test_flow_model_sees_continuous_t(pair):
    ft, pre = pair
    seen = []
    f = lambda x, t, y: (seen.append(t.clone()), ft(x, t, y))[1]  # noqa: E731
    dgfast.sample(f, None, torch.randn(1, C, 4, 4), torch.tensor([0]), guidance_scale=1, steps=5,
                  sampler="flow_heun")
    ts = [float(t[0]) for t in seen]
    assert seen[0].dtype == torch.float32
    assert ts == [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    with pytest.raises(ValueError, match="steps"):
        dgfast.sample(f, None, torch.randn(1, C, 4, 4), torch.tensor([0]), guidance_scale=1, steps="ddim5",
                      sampler="flow_euler")


def test_ddpm_default_plan_is_dits_table():
    """The native ddpm/ddim plans are Schedule's rows in sampling order (the faithful path)."""
    sch = Schedule.from_steps("50")
    plan = samplers.native_plan("ddpm", "50")
    assert np.array_equal(plan.rows, sch.ddpm_coefs()[::-1])
    assert plan.timesteps[0] == 999 and plan.timesteps[-1] == 0 and plan.doubled_noise


# ----------------------------------------------------------------------------------------------
# The new op modes: backends vs the torch twin, bit for bit
# ----------------------------------------------------------------------------------------------

def op_inputs(seed, n=3, H=5, W=7, device="cpu"):
    """Awkward sizes and strides: x and prev are every other row of a bigger batch, out_ft carries
    an extra channel, noise is rows of a 2n draw, out_guide is a channel slice."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return dict(x=r(2 * n, C, H, W)[::2], out_ft=r(n, 2 * C + 1, H, W), out_guide=r(n, C + 2, H, W)[:, 1:],
                noise=r(2 * n, C, H, W)[:n], prev=r(2 * n, C, H, W)[1::2])


LINEAR_ROW = (1.3, 0.7, 0.9, 0.4, -0.2, 0.25, 0.3)


@pytest.mark.parametrize("backend", backends(moves_to_cuda=True))
@pytest.mark.parametrize("k", [0, 3, 4])
@pytest.mark.parametrize("variant", ["full", "no-prev", "no-noise", "clip"])
def test_linear_mode_backends_bit_equal(backend, k, variant):
    need_modes(backend, "linear")
    a = op_inputs(11, device=device_for(backend))
    prev = None if variant == "no-prev" else a["prev"]
    noise = None if variant == "no-noise" else a["noise"]
    kw = dict(scale=1.6, guidance_channels=k, step_mode="linear", clip_denoised=variant == "clip", prev=prev,
              return_state=True)
    out, x0 = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], noise, LINEAR_ROW, backend=backend, **kw)
    ref, ref_x0 = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], noise, LINEAR_ROW, backend="torch", **kw)
    assert torch.isfinite(out).all() and torch.isfinite(x0).all()
    assert torch.equal(out.cpu(), ref.cpu()) and torch.equal(x0.cpu(), ref_x0.cpu())
    single = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], noise, LINEAR_ROW, backend=backend,
                             **{**kw, "return_state": False})
    assert torch.equal(single.cpu(), ref.cpu())


@pytest.mark.parametrize("backend", backends(moves_to_cuda=True))
@pytest.mark.parametrize("k", [0, 3])
def test_euler_heun_modes_backends_bit_equal(backend, k):
    need_modes(backend, "flow_euler", "flow_heun")
    a = op_inputs(12, device=device_for(backend))
    kw = dict(scale=2.5, guidance_channels=k)
    out, d = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], None, (-0.0625,), step_mode="flow_euler",
                             return_state=True, backend=backend, **kw)
    ref, ref_d = ops.guided_step_torch(a["x"], a["out_ft"], a["out_guide"] if k else None, None, (-0.0625,),
                                       step_mode="flow_euler", return_state=True, scale=2.5, guidance_channels=k)
    assert torch.equal(out.cpu(), ref.cpu()) and torch.equal(d.cpu(), ref_d.cpu())
    out = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], None, (0.03125,), step_mode="flow_heun", prev=a["prev"],
                          backend=backend, **kw)
    ref = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], None, (0.03125,), step_mode="flow_heun", prev=a["prev"],
                          backend="torch", **kw)
    assert torch.isfinite(out).all() and torch.equal(out.cpu(), ref.cpu())


def test_linear_mode_formula():
    """The torch twin is the documented formula (x0 = A x - B d, out = R x + P x0 + Q d + T (x0 - prev) + S z)."""
    a = op_inputs(13)
    A, B, R, P, Q, T, S = LINEAR_ROW
    d = a["out_guide"][:, :C] + 1.6 * (a["out_ft"][:, :C] - a["out_guide"][:, :C])
    x0 = A * a["x"] - B * d
    want = R * a["x"] + P * x0 + Q * d + T * (x0 - a["prev"]) + S * a["noise"]
    out = ops.guided_step(a["x"], a["out_ft"], a["out_guide"], a["noise"], LINEAR_ROW, scale=1.6, guidance_channels=C,
                          step_mode="linear", prev=a["prev"], backend="torch")
    assert rel_err(out, want) < 1e-6


def test_new_modes_validate():
    a = op_inputs(14)
    with pytest.raises(ValueError, match="prev"):
        ops.guided_step(a["x"], a["out_ft"], None, None, (0.1,), step_mode="flow_heun")
    with pytest.raises(ValueError, match="return_state"):
        ops.guided_step(a["x"], a["out_ft"], None, a["noise"], LINEAR_ROW, step_mode="ddim", return_state=True)
    with pytest.raises(ValueError, match="mode"):
        ops.guided_step(a["x"], a["out_ft"], None, None, (0.1,), step_mode="rk4")
