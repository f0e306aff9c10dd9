"""Samplers as data, and the one loop that runs them through the fused guided step.

A sampler here is a short function from a noise schedule to a `Plan`: for every step, the
ops.guided_step step_mode, its row of float32 coefficients, the timestep the model sees and whether the
step draws noise or reads the previous step's state. The loop (`run`) evaluates the two branches,
then hands everything to ops.guided_step, which forms the guided prediction and applies the update
in one pass. Coefficients are computed once per sampling call, never inside the loop.

    native (`sample(sampler=...)`)   ddpm, ddim        DiT's p_sample / ddim_sample (schedule.py)
                                     dpm2m             DPM-Solver++(2M) on DiT's respaced schedule
                                     flow_euler/heun   SiT's velocity ODE, t in [0, 1]
    diffusers (`sample(scheduler=...)`)  DDPM (learned_range too), DDIM, DPMSolverMultistep, EulerDiscrete,
                                     FlowMatchEulerDiscrete: their config and tables give the rows; any
                                     other scheduler (or config) runs through its own step().

The guidance controls (interval, pre-trained reuse, CFG with the fine-tuned null label) live in
`StepForwards`, which decides per step which forwards run.

Names: `pretrained` (`pre`) is DoG's pre-trained model; the guiding branch, whichever model runs it (DoG:
the pre-trained model with its null label; mode="cfg": the fine-tuned model with its own), is `guide`
(`out_guide`, `guide_label`); `uncond` appears only where code mirrors upstream (DiT's forward_with_cfg,
diffusers' guiders, the DoG scripts' CLI flags). `mode` is sample()'s dog/cfg; a step's kind (ddpm, ddim,
linear, flow_*) is its `step_mode`, as ops.guided_step takes it.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from dgfast import ops
from dgfast.divergence import Watch, warn_divergence
from dgfast.ops import NUM_COEFS
from dgfast.schedule import NUM_TRAIN_STEPS, Schedule

NATIVE_SAMPLERS = ("ddpm", "ddim", "dpm2m", "flow_euler", "flow_heun")
GUIDANCE_MODES = ("dog", "cfg")


@dataclass
class Plan:
    """What the loop does at step i (i = 0 is the first, noisiest step)."""
    step_modes: list             # ops.guided_step step_mode of each step
    rows: np.ndarray             # (S, NUM_COEFS) float32 coefficient rows
    timesteps: list              # the model's timestep at each step (heun: the S + 1 grid points)
    t_dtype: torch.dtype         # int64 (diffusion index) or float32 (continuous t, sigma-derived t)
    noise: list                  # step i draws one noise tensor
    prev: list                   # step i reads the previous step's state (multistep x0)
    heun: bool = False           # two evaluations per step: Euler to t_{i+1}, then the trapezoid
    in_div: list | None = None   # model input is x / in_div[i] (diffusers' scale_model_input)
    init_sigma: float = 1.0      # the loop starts from z * init_sigma
    clip: bool | None = None     # clamp x0 to [-1, 1]; None: the caller's clip_denoised
    doubled_noise: bool = False  # DiT's loops draw noise over the doubled (2n) batch
    scheduler: object = None     # fallback: run scheduler.step() (rows unused)
    eta: float = 0.0             # fallback: passed to a step() that takes it (DDIMScheduler)

    @property
    def num_steps(self) -> int:
        return len(self.step_modes)


def _rows(values) -> np.ndarray:
    """(S, NUM_COEFS) float32 from per-step lists of scalars (floats, 0-dim tensors), zero padded."""
    out = np.zeros((len(values), NUM_COEFS), dtype=np.float32)
    for i, row in enumerate(values):
        out[i, :len(row)] = [float(v) for v in row]  # one rounding to float32 (exact for f32 tensors)
    return out


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------

def dit(schedule: Schedule, sampler: str, eta: float = 0.0) -> Plan:
    """DiT's p_sample ("ddpm", learned-range variance) or ddim_sample loop: j = S-1 ... 0, one
    draw per step over the doubled batch, the model sees the original training index."""
    coefs = schedule.ddim_coefs(eta) if sampler == "ddim" else schedule.ddpm_coefs()
    S = schedule.num_steps
    return Plan(step_modes=[sampler] * S, rows=coefs[::-1].copy(),
                timesteps=[int(t) for t in schedule.timestep_map[::-1]], t_dtype=torch.int64, noise=[True] * S,
                prev=[False] * S, doubled_noise=True)


def dpmpp_2m(alpha, sigma, *, order: int = 2, sde: bool = False, solver: str = "midpoint",
             first_order_final: int = 1) -> tuple[np.ndarray, list]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) as "linear" rows.

    alpha, sigma: (S + 1,) tensors, the noise levels x = alpha x0 + sigma eps of the S evaluation
    points in sampling order, then the last step's target (sigma = 0 is clean data). Step i:
        x0_i = (x - sigma_i eps) / alpha_i                              data prediction
        h_i = lambda_{i+1} - lambda_i,   lambda = log(alpha / sigma)
        x_{i+1} = (sigma_{i+1} / sigma_i) x + alpha_{i+1} (1 - e^{-h}) D      (ODE)
        D = x0_i                                  first order (step 0, and the last first_order_final steps)
        D = x0_i + (x0_i - x0_{i-1}) / (2 r_i),  r_i = h_{i-1} / h_i     second order, midpoint
    solver="heun" (diffusers' solver_type="heun") instead adds alpha_{i+1} ((e^{-h} - 1)/h + 1)
    (x0_i - x0_{i-1}) / r_i to the first-order update.
    sde=True is SDE-DPM-Solver++(2M) (Lu et al. sec. 5): x_{i+1} = (sigma_{i+1}/sigma_i) e^{-h} x
    + alpha_{i+1} (1 - e^{-2h}) D + sigma_{i+1} sqrt(1 - e^{-2h}) z.
    The arithmetic runs in alpha's dtype (float32 for diffusers' tables, float64 for DiT's).
    Returns (rows, uses_prev).
    """
    lam = torch.log(alpha) - torch.log(sigma)
    S = len(alpha) - 1
    rows, uses_prev = [], []
    for i in range(S):
        a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        h = lam[i + 1] - lam[i]
        if sde:
            R = s_t / s_s * torch.exp(-h)
            P = a_t * (1 - torch.exp(-2.0 * h))
            Z = s_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:
            R = s_t / s_s
            P = -(a_t * (torch.exp(-h) - 1.0))
            Z = torch.zeros_like(h)
        second = order >= 2 and i >= 1 and i < S - first_order_final
        T = torch.zeros_like(h)
        if second:
            r = (lam[i] - lam[i - 1]) / h
            if solver == "midpoint":
                T = 0.5 * P / r
            elif sde:
                T = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) / r
            else:
                T = a_t * ((torch.exp(-h) - 1.0) / h + 1.0) / r
        rows.append((1 / a_s, s_s / a_s, R, P, 0.0, T, Z))
        uses_prev.append(second)
    return _rows(rows), uses_prev


def dit_dpm2m(schedule: Schedule, first_order_final: int = 2) -> Plan:
    """DPM-Solver++(2M) on DiT's respaced schedule: one evaluation per kept step (the model sees DiT's
    timesteps, t = 0 included, as DiT's ddpm/ddim loops); the last step goes to sigma = 0 (first
    order, i.e. it returns x0). x0 uses DiT's own f32(float64) A and B.

    The last two steps are first order (first_order_final=2): the step into the grid's t = 0 point
    too. DiT's grid is uniform in t, so its last interval (t = stride -> 0, sigma 0.18 -> 0.01 at 20
    steps) is 2-5x longer in log-SNR than the one before (r = h_{i-1}/h_i ~ 0.2-0.45 at 4-250 steps),
    and the 2M term would extrapolate the guided x0 change by 1/(2r) ~ 2.2x into the sample: on the
    embedded pair that cost 9-17 points of class accuracy at 10-20 steps (docs/upstream_sampling.md
    §2.10). first_order_final=1 is k-diffusion's sample_dpmpp_2m on the same grid."""
    t = schedule.tables
    ac = torch.from_numpy(t["alphas_cumprod"][::-1].copy())
    alpha = torch.cat([ac.sqrt(), torch.ones(1, dtype=torch.float64)])
    sigma = torch.cat([(1 - ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
    rows, prev = dpmpp_2m(alpha, sigma, first_order_final=first_order_final)
    rows[:, 0] = t["sqrt_recip_alphas_cumprod"][::-1].astype(np.float32)
    rows[:, 1] = t["sqrt_recipm1_alphas_cumprod"][::-1].astype(np.float32)
    S = schedule.num_steps
    return Plan(step_modes=["linear"] * S, rows=rows, timesteps=[int(v) for v in schedule.timestep_map[::-1]],
                t_dtype=torch.int64, noise=[False] * S, prev=prev)


def flow_grid(num_points: int) -> torch.Tensor:
    """SiT's ODE grid: torch.linspace(0, 1, num_steps), t = 0 noise, t = 1 data (float32)."""
    return torch.linspace(0, 1, num_points)


def flow(num_points: int, heun: bool = False) -> Plan:
    """SiT's velocity ODE dx/dt = v(x, t) on a fixed grid of `num_points` (num_points - 1 steps), as
    torchdiffeq's fixed-grid solvers take it (SiT sample_ode with method "euler" / "heun2"):
        Euler  x_{i+1} = x_i + dt v(x_i, t_i)
        Heun   x' = x_i + dt v(x_i, t_i);  x_{i+1} = x_i + dt/2 (v(x_i, t_i) + v(x', t_{i+1}))
    dt = t_{i+1} - t_i in float32, as torchdiffeq computes it. The model sees t itself (no x1000)."""
    t = flow_grid(num_points)
    dt = t[1:] - t[:-1]
    S = num_points - 1
    rows = _rows([(d,) for d in dt])
    return Plan(step_modes=["flow_euler"] * S, rows=rows, timesteps=[float(v) for v in (t if heun else t[:-1])],
                t_dtype=torch.float32, noise=[False] * S, prev=[False] * S, heun=heun)


def native_plan(sampler: str, steps, eta: float = 0.0) -> Plan:
    if sampler in ("ddpm", "ddim"):
        return dit(Schedule.from_steps(steps), sampler, eta)
    if sampler == "dpm2m":
        return dit_dpm2m(Schedule.from_steps(steps))
    points = int_steps(steps, "steps")
    if points < 2:
        raise ValueError(f"steps: the flow samplers take a grid of >= 2 points (SiT's num_steps), got {points}")
    return flow(points, heun=sampler == "flow_heun")


def int_steps(steps, name: str) -> int:
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        steps = int(steps)  # numpy integers too
    if isinstance(steps, bool) or not isinstance(steps, (int, str)) or (
            isinstance(steps, str) and not steps.strip().isdigit()):
        raise ValueError(f"{name} must be an int (or a string of digits) here, got {steps!r}")
    if int(steps) < 1:  # a scheduler set to 0 or fewer steps would return the noise as the sample
        raise ValueError(f"{name} must be >= 1, got {steps!r}")
    return int(steps)


# ----------------------------------------------------------------------------------------------
# diffusers schedulers
# ----------------------------------------------------------------------------------------------

def scheduler_plan(scheduler, steps, device, eta: float = 0.0) -> Plan:
    """A Plan from a diffusers scheduler instance: its config and tables drive the fused step.

    steps: an int calls scheduler.set_timesteps(steps); None uses the timesteps already set.
    Configurations the fused step does not cover (other schedulers, thresholding, clip ranges
    other than 1, prediction types other than epsilon, third-order DPM, noise-prediction DPM, ...)
    give a fallback Plan: each step then runs scheduler.step() on the guided prediction.
    """
    if isinstance(scheduler, type):
        raise TypeError(f"scheduler must be a scheduler instance, e.g. {scheduler.__name__}(), got the class")
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        raise TypeError(f"scheduler must be a diffusers scheduler instance, got {type(scheduler).__name__}")
    if steps is not None:
        scheduler.set_timesteps(int_steps(steps, "steps (with a diffusers scheduler)"), device=device)
    elif getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("steps=None: call scheduler.set_timesteps(...) first, or pass steps=<int>")
    name = type(scheduler).__name__
    builder = {"DDPMScheduler": _ddpm_plan, "DDIMScheduler": _ddim_plan,
               "DPMSolverMultistepScheduler": _dpm_plan, "EulerDiscreteScheduler": _euler_plan,
               "FlowMatchEulerDiscreteScheduler": _flow_match_plan}.get(name)
    plan = builder(scheduler, eta) if builder is not None else None
    if plan is None:
        S = len(scheduler.timesteps)
        plan = Plan(step_modes=["step"] * S, rows=np.zeros((S, NUM_COEFS), np.float32),
                    timesteps=list(scheduler.timesteps), t_dtype=scheduler.timesteps.dtype, noise=[False] * S,
                    prev=[False] * S, scheduler=scheduler, eta=float(eta))
    plan.init_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    return plan


# Named diffusers schedulers (sample(scheduler="dpmpp-2m-karras"), `dgfast sample --scheduler`): each on DiT's
# linear 1000-step schedule (schedule.base_betas), epsilon prediction, diffusers' defaults otherwise (linspace
# timesteps, final sigma 0, lower_order_final). Measured against DDPM-250 in bench/RESULTS.md (bench/frontier.py).
DIT_BETAS = dict(num_train_timesteps=NUM_TRAIN_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
NAMED_SCHEDULERS = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp-2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "dpmpp-3m-karras": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "dpmpp-3m-sde-karras": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}


def named_scheduler(name: str):
    """A fresh diffusers scheduler for one of NAMED_SCHEDULERS (they keep state between steps: one per call)."""
    if name not in NAMED_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not a named scheduler; choose one of {', '.join(NAMED_SCHEDULERS)}, "
                         f"or pass a diffusers scheduler instance")
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"scheduler {name!r} is a diffusers scheduler, and diffusers is not installed "
                          f"(pip install diffusers); the native samplers need nothing more") from None
    cls, config = NAMED_SCHEDULERS[name]
    return getattr(diffusers, cls)(**DIT_BETAS, **config)


def _clip(config):
    """clip flag, or None when the fused step cannot do the config's x0 treatment."""
    if config.get("thresholding", False):
        return None
    if config.get("clip_sample", False):
        return True if float(config.get("clip_sample_range", 1.0)) == 1.0 else None
    return False


def _ddpm_plan(sch, eta) -> Plan | None:
    """DDPMScheduler.step: x0 = (x - sqrt(1-ab) eps) / sqrt(ab); mean = c1 x0 + c2 x; noise for t > 0
    with the configured variance (learned_range reads the fine-tuned variance channels)."""
    cfg = sch.config
    clip = _clip(cfg)
    vt = cfg.variance_type
    if clip is None or cfg.prediction_type != "epsilon" or vt not in (
            "fixed_small", "fixed_small_log", "fixed_large", "learned_range"):
        return None
    ac = sch.alphas_cumprod.to(torch.float32)
    one = torch.tensor(1.0)
    modes, rows, noise = [], [], []
    for t in sch.timesteps:
        t = int(t)
        prev_t = int(sch.previous_timestep(t))
        ab = ac[t]
        abp = ac[prev_t] if prev_t >= 0 else one
        cur_alpha = ab / abp
        cur_beta = 1 - cur_alpha
        c1 = (abp ** 0.5 * cur_beta) / (1 - ab)
        c2 = cur_alpha ** 0.5 * (1 - abp) / (1 - ab)
        A, B = 1 / ab ** 0.5, (1 - ab) ** 0.5 / ab ** 0.5
        var = torch.clamp((1 - abp) / (1 - ab) * cur_beta, min=1e-20)
        if vt == "learned_range":
            modes.append("ddpm")
            rows.append((A, B, c1, c2, torch.log(var), torch.log(cur_beta), 1.0 if t > 0 else 0.0))
        else:
            std = {"fixed_small": lambda: var ** 0.5, "fixed_small_log": lambda: torch.exp(0.5 * torch.log(var)),
                   "fixed_large": lambda: cur_beta ** 0.5}[vt]()
            modes.append("linear")
            rows.append((A, B, c2, c1, 0.0, 0.0, std if t > 0 else 0.0))
        noise.append(t > 0)
    S = len(rows)
    return Plan(step_modes=modes, rows=_rows(rows), timesteps=[int(t) for t in sch.timesteps],
                t_dtype=torch.int64, noise=noise, prev=[False] * S, clip=clip)


def _ddim_plan(sch, eta) -> Plan | None:
    """DDIMScheduler.step(eta): prev = sqrt(abp) x0 + sqrt(1 - abp - s^2) eps + s z, eps the raw model
    eps (use_clipped_model_output=False), s = eta sqrt((1-abp)/(1-ab) (1 - ab/abp)), noise iff eta > 0."""
    cfg = sch.config
    clip = _clip(cfg)
    if clip is None or cfg.prediction_type != "epsilon":
        return None
    ac = sch.alphas_cumprod.to(torch.float32)
    final = sch.final_alpha_cumprod.to(torch.float32)
    stride = cfg.num_train_timesteps // sch.num_inference_steps
    rows = []
    for t in sch.timesteps:
        t = int(t)
        ab = ac[t]
        abp = ac[t - stride] if t - stride >= 0 else final
        variance = ((1 - abp) / (1 - ab)) * (1 - ab / abp)
        std = eta * variance ** 0.5
        rows.append((1 / ab ** 0.5, (1 - ab) ** 0.5 / ab ** 0.5, 0.0, abp ** 0.5, (1 - abp - std ** 2) ** 0.5,
                     0.0, std if eta > 0 else 0.0))
    S = len(rows)
    return Plan(step_modes=["linear"] * S, rows=_rows(rows), timesteps=[int(t) for t in sch.timesteps],
                t_dtype=torch.int64, noise=[eta > 0] * S, prev=[False] * S, clip=clip)


def _dpm_plan(sch, eta) -> Plan | None:
    """DPMSolverMultistepScheduler, algorithm dpmsolver++ / sde-dpmsolver++, order 1 or 2, epsilon.
    Its learned-sigma handling (variance_type) slices 3 channels; here the variance channels are
    simply not passed on, as DiTPipeline does."""
    cfg = sch.config
    if (cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") or cfg.solver_order not in (1, 2)
            or cfg.thresholding or cfg.prediction_type != "epsilon" or cfg.solver_type not in ("midpoint", "heun")):
        return None
    sig = sch.sigmas.to(torch.float32).cpu()
    if cfg.use_flow_sigmas:
        alpha, sigma = 1 - sig, sig
    else:
        alpha = 1 / ((sig ** 2 + 1) ** 0.5)
        sigma = sig * alpha
    S = len(sch.timesteps)
    last_first = bool(cfg.euler_at_final or (cfg.lower_order_final and S < 15) or cfg.final_sigmas_type == "zero")
    sde = cfg.algorithm_type == "sde-dpmsolver++"
    rows, prev = dpmpp_2m(alpha, sigma, order=cfg.solver_order, sde=sde, solver=cfg.solver_type,
                          first_order_final=1 if last_first else 0)
    return Plan(step_modes=["linear"] * S, rows=rows, timesteps=[int(t) for t in sch.timesteps], t_dtype=torch.int64,
                noise=[sde] * S, prev=prev)


def _euler_plan(sch, eta) -> Plan | None:
    """EulerDiscreteScheduler (s_churn = 0): x_{i+1} = x + (sigma_{i+1} - sigma_i) eps, the model
    seeing x / sqrt(sigma_i^2 + 1) and the scheduler's (float) timestep."""
    if sch.config.prediction_type != "epsilon":
        return None
    sig = sch.sigmas.to(torch.float32).cpu()
    S = len(sch.timesteps)
    return Plan(step_modes=["flow_euler"] * S, rows=_rows([(sig[i + 1] - sig[i],) for i in range(S)]),
                timesteps=[float(t) for t in sch.timesteps], t_dtype=torch.float32, noise=[False] * S,
                prev=[False] * S, in_div=[float((sig[i] ** 2 + 1) ** 0.5) for i in range(S)])


def _flow_match_plan(sch, eta) -> Plan | None:
    """FlowMatchEulerDiscreteScheduler: x + (sigma_{i+1} - sigma_i) v, or with stochastic_sampling
    x0 = x - sigma_i v, x_{i+1} = (1 - sigma_{i+1}) x0 + sigma_{i+1} z. The model sees sigma * 1000."""
    sig = sch.sigmas.to(torch.float32).cpu()
    S = len(sch.timesteps)
    ts = [float(t) for t in sch.timesteps]
    if sch.config.get("stochastic_sampling", False):
        rows = [(1.0, sig[i], 0.0, 1.0 - sig[i + 1], 0.0, 0.0, sig[i + 1]) for i in range(S)]
        return Plan(step_modes=["linear"] * S, rows=_rows(rows), timesteps=ts, t_dtype=torch.float32,
                    noise=[True] * S, prev=[False] * S)
    return Plan(step_modes=["flow_euler"] * S, rows=_rows([(sig[i + 1] - sig[i],) for i in range(S)]), timesteps=ts,
                t_dtype=torch.float32, noise=[False] * S, prev=[False] * S)


# ----------------------------------------------------------------------------------------------
# Guidance controls: which forwards a step runs
# ----------------------------------------------------------------------------------------------

def check_controls(guidance_interval, guidance_rescale, mode, pretrained_every):
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if not isinstance(guidance_interval, (tuple, list)) or len(guidance_interval) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in guidance_interval):
        raise TypeError(f"guidance_interval must be a (start, stop) pair of fractions, got {guidance_interval!r}")
    start, stop = (float(v) for v in guidance_interval)
    if not 0.0 <= start < 1.0 or not start <= stop <= 1.0:  # diffusers guiders' checks
        raise ValueError(f"guidance_interval must satisfy 0 <= start < 1 and start <= stop <= 1, "
                         f"got {guidance_interval!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or not (
            math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0):
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if isinstance(pretrained_every, bool) or not isinstance(pretrained_every, int) or pretrained_every < 1:
        raise ValueError(f"pretrained_every must be an int >= 1, got {pretrained_every!r}")
    return start, stop


def interval_steps(start: float, stop: float, num_steps: int) -> range:
    """Steps with guidance: int(start*N) <= i < int(stop*N), diffusers guiders' rule."""
    return range(int(start * num_steps), int(stop * num_steps))


def model_output(out, x=None):
    """A model's output tensor (first element of a tuple), in x's dtype: bf16/fp16 models feed the
    sampler, which steps in the latents' dtype (float32 for faithful sampling)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    if x is not None and isinstance(out, torch.Tensor) and out.dtype != x.dtype and out.is_floating_point():
        out = out.to(x.dtype)
    return out


def cfg_pair_forward(finetuned, name: str = "finetuned"):
    """Classifier-free guidance with the fine-tuned model's own null label: one 2n batch
    [x; x] with labels [y; null], as DiT's forward_with_cfg runs it."""
    def forward_pair(x, t, y, null):
        n = len(x)
        out = model_output(finetuned(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])))
        if not isinstance(out, torch.Tensor) or len(out) != 2 * n:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name} returned {got} for the doubled batch of {2 * n} rows (labels, then its null "
                             f"label); expected a tensor with {2 * n} rows")
        return out[:n], out[n:]
    return forward_pair


def check_model_output(out, x, name="pretrained"):
    """A model's output where only its eps channels are read (the guiding branch, dog_forward): a
    tensor (n, >= C, H, W). Anything else (None, another shape) is an error naming the model: a
    guiding branch's None would otherwise read as "no guidance" and silently give unguided samples."""
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] \
            or out.shape[1] < x.shape[1] or out.shape[2:] != x.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} returned {shape}; expected a tensor ({x.shape[0]}, >= {x.shape[1]}, "
                         f"{x.shape[2]}, {x.shape[3]}) (eps channels first)")


class StepForwards:
    """Which forwards one step runs, and their outputs, with the guidance controls applied.

    - steps outside `steps_on` (guidance_interval) run the fine-tuned model alone: the guiding
      branch is not evaluated at all and the step is unguided;
    - pretrained_every=k: the guiding branch runs on every k-th guided evaluation, its output is
      reused by the evaluations in between (the fine-tuned model runs alone there);
    - pair_forward(x, t, y, null) -> (out_ft, out_guide) runs both branches (DoG: the pre-trained
      model with its null label; CFG: the fine-tuned model with its own).
    Counts: `guide_evals` guiding-branch evaluations, `ft_evals` fine-tuned ones.
    names: what errors call the two models (the pipeline's are "transformer", "transformer_pre").
    """

    def __init__(self, finetuned, y, pair_forward=None, guide_label=None, steps_on=range(0), every: int = 1,
                 names=("finetuned", "pretrained")):
        self.finetuned, self.y, self.pair_forward, self.guide_label = finetuned, y, pair_forward, guide_label
        self.names = names
        self.steps_on, self.every = steps_on, every
        self.cache, self.guided_evals = None, 0
        self.ft_evals = self.guide_evals = 0

    def __call__(self, x, t, i):
        self.ft_evals += 1
        if self.pair_forward is None or i not in self.steps_on:
            return model_output(self.finetuned(x, t, self.y), x), None
        reuse = self.every > 1 and self.cache is not None and self.guided_evals % self.every != 0
        self.guided_evals += 1
        if reuse:
            return model_output(self.finetuned(x, t, self.y), x), self.cache
        out_ft, out_guide = self.pair_forward(x, t, self.y, self.guide_label)
        out_ft, out_guide = model_output(out_ft, x), model_output(out_guide, x)
        check_model_output(out_guide, x, self.names[1])
        self.guide_evals += 1
        if self.every > 1:  # a paired model may hand out views of buffers it reuses next step
            self.cache = out_guide.clone()
        return out_ft, out_guide


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def check_output(out, x, step_mode, name="finetuned"):
    """`out` fits x and the step (ddpm reads the variance channels too); step_mode is an ops.guided_step mode."""
    C = x.shape[1]
    need = 2 * C if step_mode == "ddpm" else C
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] or out.shape[1] < need \
            or out.shape[2:] != x.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} returned {shape}; sampler step {step_mode!r} needs (n, {need}, H, W) "
                         f"(eps then learned-range variance channels for ddpm)")


def run(plan: Plan, z, forwards: StepForwards, *, scale: float, guidance_channels: int, draw,
        clip_denoised: bool = False, backend: str = "auto", guidance_rescale: float = 0.0,
        generator=None, progress=False):
    """Sample from z along `plan`; returns x after the last step (z itself is not modified).

    draw() gives the noise of the steps that take some; generator goes to a fallback scheduler's
    step(); progress is a bool (tqdm) or a wrapper for the step range. A DivergenceWarning names the
    samples whose x became NaN/inf or left the sane range, the first such step and whose output it
    was (dgfast.divergence)."""
    n, device = len(z), z.device
    x = z if plan.init_sigma == 1.0 else z * plan.init_sigma
    clip = plan.clip if plan.clip is not None else clip_denoised
    # the ops.guided_step keywords every step shares
    step_args = dict(scale=scale, guidance_channels=guidance_channels, clip_denoised=clip, backend=backend,
                     guidance_rescale=guidance_rescale)
    steps = range(plan.num_steps)
    if callable(progress):  # e.g. a pipeline's progress_bar
        steps = progress(steps)
    elif progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="dgfast", unit="step")

    def t_at(v):
        return torch.full((n,), v, dtype=plan.t_dtype, device=device)

    # every step's outputs and x are recorded on the device; read once at the end (a warning naming
    # the first bad step and whose output it was, if any sample diverged)
    watch = Watch(plan.num_steps, forwards.names)
    if plan.scheduler is not None:
        x = _run_scheduler(plan, x, forwards, steps, t_at, generator, step_args, watch)
    elif plan.heun:
        x = _run_heun(plan, x, forwards, steps, t_at, step_args, watch)
    else:
        x = _run_steps(plan, x, forwards, steps, t_at, draw, step_args, watch)
    warn_divergence(watch, n, stacklevel=4)
    return x


def _run_steps(plan, x, forwards, steps, t_at, draw, step_args, watch):
    state = None
    for i in steps:
        step_mode = plan.step_modes[i]
        x_in = x if plan.in_div is None else x / torch.tensor(plan.in_div[i], dtype=torch.float32)
        out_ft, out_guide = forwards(x_in, t_at(plan.timesteps[i]), i)
        check_output(out_ft, x, step_mode, forwards.names[0])
        keep = i + 1 < plan.num_steps and plan.prev[i + 1]
        res = ops.guided_step(x, out_ft, out_guide, draw() if plan.noise[i] else None, plan.rows[i],
                              step_mode=step_mode, prev=state if plan.prev[i] else None, return_state=keep,
                              **step_args)
        x, state = res if keep else (res, None)
        watch.record(i, out_ft, out_guide, x)
    return x


def _run_heun(plan, x, forwards, steps, t_at, step_args, watch):
    for i in steps:
        h = plan.rows[i, 0]
        out_ft, out_guide = forwards(x, t_at(plan.timesteps[i]), i)
        check_output(out_ft, x, "flow_euler", forwards.names[0])
        x_euler, d = ops.guided_step(x, out_ft, out_guide, None, (h,), step_mode="flow_euler", return_state=True,
                                     **step_args)
        watch.record(i, out_ft, out_guide, x_euler)
        out_ft, out_guide = forwards(x_euler, t_at(plan.timesteps[i + 1]), i)
        check_output(out_ft, x, "flow_heun", forwards.names[0])
        x = ops.guided_step(x, out_ft, out_guide, None, (h * 0.5,), step_mode="flow_heun", prev=d,
                            **step_args)
        watch.record(i, out_ft, out_guide, x)
    return x


def _run_scheduler(plan, x, forwards, steps, t_at, generator, step_args, watch):
    """Any other scheduler: the guided prediction goes through scheduler.step() (its own noise,
    from `generator`); the variance channels are passed on only to a scheduler that learns them."""
    sch = plan.scheduler
    C = x.shape[1]
    learned = getattr(sch, "config", {}).get("variance_type", None) in ("learned", "learned_range")
    params = inspect.signature(sch.step).parameters
    rng = {"generator": generator} if "generator" in params else {}
    if plan.eta and "eta" in params:  # e.g. a DDIMScheduler with thresholding: eta must not be dropped
        rng["eta"] = plan.eta
    for i in steps:
        t = plan.timesteps[i]
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        out_ft, out_guide = forwards(x_in, t_at(t.item() if torch.is_tensor(t) else t), i)
        check_output(out_ft, x, "step", forwards.names[0])
        k = step_args["guidance_channels"] if out_guide is not None else 0
        if step_args["guidance_rescale"] and k > 0:
            eps = ops.rescale_guided(out_ft[:, :C], out_guide, step_args["scale"], k, C, step_args["guidance_rescale"])
        else:
            eps = ops.guide_eps(out_ft[:, :C], out_guide, step_args["scale"], k)
        pred = torch.cat([eps, out_ft[:, C:2 * C]], dim=1) if learned and out_ft.shape[1] >= 2 * C else eps
        x = sch.step(pred, t, x, return_dict=False, **rng)[0]
        watch.record(i, out_ft, out_guide, x)
    return x
