"""Fused ops: one dispatch point per op, three implementations that must agree.

- "torch":  the plain formulas below. The reference every other backend is tested against.
- "cpp":    csrc/ (OpenMP + SIMD), for CPU tensors. Built by setup.py or JIT-loaded with ninja.
- "triton": kernels/ (installed as dgfast.kernels), for CUDA tensors; on CPU only under
            TRITON_INTERPRET=1 (how the kernels are tested on machines without a GPU).

backend="auto" picks triton on CUDA, cpp on CPU, torch otherwise. The environment variable
DGFAST_BACKEND replaces the "auto" choice (an explicit backend argument still wins).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "cpp", "torch")
SAMPLER_MODES = ("ddpm", "ddim", "linear", "flow_euler", "flow_heun")
# linear/flow_*: dgfast.samplers builds their coefficient rows. A compiled backend runs a mode only
# if it lists it (backend_modes); otherwise "auto" uses the torch twin for that mode.
STATE_MODES = ("linear", "flow_euler")  # modes that can also return their per-step state
LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Backend discovery
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpp_extension():
    """The compiled C++ module, or None (with one warning) when it cannot be had."""
    try:
        from dgfast import _C  # built by setup.py
        return _C
    except ImportError:
        pass
    if os.environ.get("DGFAST_NO_JIT") == "1":
        return None
    try:
        from dgfast._build import jit_load
        return jit_load()
    except Exception as err:  # no compiler, no ninja, build error: fall back to torch
        warnings.warn(f"dgfast: C++ ops unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                      f"using the torch path on CPU", stacklevel=2)
        return None


@functools.lru_cache(maxsize=None)
def triton_kernels():
    """dgfast.kernels, or None when Triton is missing or has no driver (no GPU, no interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    try:
        import dgfast.kernels as kernels
    except ImportError:
        kernels = _kernels_from_source_tree()
    return kernels


def _kernels_from_source_tree():
    """Run from a checkout without installing: the repo's top-level kernels/ as dgfast.kernels."""
    import importlib.util
    import sys
    init = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")
    if not os.path.isfile(init):
        return None
    spec = importlib.util.spec_from_file_location("dgfast.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dgfast.kernels"] = module
    spec.loader.exec_module(module)
    return module


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Which implementation runs `tensor`'s op. Raises a clear error for impossible choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DGFAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"DGFAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if tensor.is_cuda and triton_kernels() is not None:
            return "triton"
        # the C++ ops are float32 only: bf16/fp16 CPU tensors (half-precision models) take the twins
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and cpp_extension() is not None:
            return "cpp"
        return "torch"
    if backend == "triton":
        if triton_kernels() is None:
            raise RuntimeError("backend='triton': triton is not installed")
        if not tensor.is_cuda and not triton_interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if backend == "cpp":
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpp' runs CPU tensors only, got a tensor on {tensor.device}")
        if cpp_extension() is None:
            raise RuntimeError("backend='cpp': the C++ extension could not be built or loaded")
    return backend


# ----------------------------------------------------------------------------------------------
# guided_step: guidance combination + scheduler update, one pass
# ----------------------------------------------------------------------------------------------

def guided_step(x, out_ft, out_pre, noise, coefs, *, scale: float = 1.0, guidance_channels: int = 0,
                mode: str = "ddpm", clip_denoised: bool = False, backend: str = "auto", prev=None,
                return_state: bool = False, guidance_rescale: float = 0.0):
    """x_prev for one sampler step of the kept (fine-tuned) half.

    x:        (n, C, H, W) current sample
    out_ft:   (n, 2C, H, W) fine-tuned output: eps channels then variance values (other modes: >= C channels)
    out_pre:  (n, >=k, H, W) pre-trained output, or None for unguided sampling
    noise:    (n, C, H, W) standard normal draw (may be a strided view, e.g. rows of a 2n draw),
              or None for a step without a noise term
    coefs:    the step's row of per-step float32 scalars (Schedule.ddpm_coefs()/ddim_coefs(), or a
              dgfast.samplers row for the other modes)
    scale:    guidance scale w in  eps = u + w * (c - u)  (u = pre-trained, c = fine-tuned)
    guidance_channels: k, guidance applies to eps channels [0, k); the rest are the fine-tuned eps.

    Modes (d = the guided model output: eps, or a velocity for flow models):
      ddpm    DiT's p_sample, learned-range variance. coefs A, B, C1, C2, Lmin, Lmax, mask
      ddim    DiT's ddim_sample (eps re-derived from x0). coefs A, B, sqrt(abp), sqrt(1-abp-s^2), mask*s
      linear  x0 = A*x - B*d (clamped if clip_denoised);
              out = R*x + P*x0 + Q*d + T*(x0 - prev) + S*z.  coefs A, B, R, P, Q, T, S.
              One form for DPM-Solver++ (1 and 2M, ODE and SDE), diffusers' DDIM and fixed-variance
              DDPM; its state is x0 (the next multistep update's `prev`).
      flow_euler  out = x + h*d, an Euler step of the ODE dx = d dt (d a velocity, or eps in the
              sigma parametrisation, dx = eps dsigma).  coefs h.  Its state is d (a Heun first stage).
      flow_heun   out = x + h*(prev + d), prev = the first stage's d.  coefs h (= dt/2).
    prev:     (n, C, H, W) state of an earlier step (linear: previous x0, flow_heun: first-stage d)
    return_state: linear/flow_euler only: return (x_prev, state) instead of x_prev
    guidance_rescale: phi of Lin et al. (diffusers' rescale_noise_cfg): the guided eps is rescaled
              towards the fine-tuned eps's per-sample std. It needs a reduction over each sample,
              so the guided eps is formed here in torch and the backend step runs unguided on it.
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if return_state and mode not in STATE_MODES:
        raise ValueError(f"return_state: mode {mode!r} has no state; modes with one: {STATE_MODES}")
    if mode == "flow_heun" and prev is None:
        raise ValueError("mode='flow_heun' needs prev= (the first stage's guided output)")
    k = guidance_channels if out_pre is not None else 0
    if guidance_rescale and k > 0:
        out_ft, out_pre, k = rescale_guided(out_ft, out_pre, scale, k, x.shape[1], guidance_rescale), None, 0
    coefs = [float(c) for c in coefs]
    which = resolve_backend(backend, x)
    if which != "torch" and mode not in backend_modes(which):
        if backend != "auto":
            raise ValueError(f"backend={backend!r} does not implement mode {mode!r}; use backend='torch'")
        which = "torch"  # "auto": this build's compiled backend predates the mode
    if mode in ("ddpm", "ddim") and noise is None:  # the DiT modes always read a draw; m = 0 steps ignore it
        noise = torch.zeros_like(x)
    if which == "cpp":
        if mode in ("ddpm", "ddim"):
            return cpp_extension().guided_step(x, out_ft, out_pre, noise, coefs, float(scale), int(k),
                                               mode == "ddim", bool(clip_denoised))
        cpp_mode = {"linear": 2, "flow_euler": 3, "flow_heun": 4}[mode]
        res = cpp_extension().guided_step_modes(x, out_ft, out_pre, noise, prev, coefs, float(scale), int(k),
                                                cpp_mode, bool(clip_denoised), bool(return_state))
        return tuple(res) if return_state else res[0]
    if which == "triton":
        extra = {} if mode in ("ddpm", "ddim") else dict(prev=prev, return_state=bool(return_state))
        return triton_kernels().guided_step(x, out_ft, out_pre, noise, coefs, scale=float(scale), k=int(k),
                                            mode=mode, clip_denoised=bool(clip_denoised), **extra)
    return guided_step_torch(x, out_ft, out_pre, noise, coefs, scale=scale, guidance_channels=k, mode=mode,
                             clip_denoised=clip_denoised, prev=prev, return_state=return_state)


def backend_modes(which: str) -> tuple:
    """Sampler modes a compiled backend implements (ddpm/ddim always; the rest once added there)."""
    if which == "cpp":
        return tuple(getattr(cpp_extension(), "GUIDED_STEP_MODES", ("ddpm", "ddim")))
    if which == "triton":
        return tuple(getattr(triton_kernels(), "GUIDED_STEP_MODES", ("ddpm", "ddim")))
    return SAMPLER_MODES


def rescale_guided(out_ft, out_pre, scale, k, C, phi):
    """out_ft with its eps channels replaced by the guided, std-rescaled eps (variance channels kept)."""
    g = guide_eps(out_ft[:, :C], out_pre, scale, k)
    g = rescale_noise_cfg(g, out_ft[:, :C], phi)
    return g if out_ft.shape[1] == C else torch.cat([g, out_ft[:, C:]], dim=1)


def rescale_noise_cfg(guided, cond, phi):
    """Lin et al. 2024 (arXiv 2305.08891) sec. 3.4, as diffusers computes it: match each sample's std
    of the guided prediction to the conditional one, then mix phi of that with 1 - phi of the guided."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guide_eps(eps_ft, eps_pre, scale, k):
    """eps with channels [0, k) guided as u + s*(c - u) (the reference's op order), rest from eps_ft."""
    if eps_pre is None or k == 0:
        return eps_ft
    g = eps_pre[:, :k] + scale * (eps_ft[:, :k] - eps_pre[:, :k])
    return g if k == eps_ft.shape[1] else torch.cat([g, eps_ft[:, k:]], dim=1)


def guided_step_torch(x, out_ft, out_pre, noise, coefs, *, scale=1.0, guidance_channels=0, mode="ddpm",
                      clip_denoised=False, prev=None, return_state=False):
    """Plain-torch twin, op for op as DiT's p_mean_variance + p_sample (or ddim_sample); the other
    modes op for op as written in guided_step's docstring (the compiled backends follow this order)."""
    c = [torch.tensor(v, dtype=torch.float32, device=x.device) for v in coefs]  # f32 scalars, as _extract
    return guided_step_math(x, out_ft, out_pre, noise, c, scale=scale, guidance_channels=guidance_channels, mode=mode,
                            clip_denoised=clip_denoised, prev=prev, return_state=return_state)


def guided_step_math(x, out_ft, out_pre, noise, c, *, scale, guidance_channels, mode, clip_denoised, prev,
                     return_state):
    """guided_step_torch's arithmetic with the coefficients `c` as float32 0-dim tensors: a list
    (the twin), or the rows of a (7,) device tensor, which a captured CUDA graph reads afresh on
    every replay (cuda_graph.guided_step_graphable). One body, so both stay op for op the same."""
    C = x.shape[1]
    eps = guide_eps(out_ft[:, :C], out_pre, scale, guidance_channels)
    if mode == "flow_euler":
        out = x + c[0] * eps
        if not return_state:
            return out
        unguided = out_pre is None or guidance_channels == 0  # then eps is a view of the model's output
        return out, (eps.clone() if unguided else eps)
    if mode == "flow_heun":
        return x + c[0] * (prev + eps)
    x0 = c[0] * x - c[1] * eps
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    if mode == "linear":
        out = c[2] * x + c[3] * x0
        out = out + c[4] * eps
        if prev is not None:
            out = out + c[5] * (x0 - prev)
        if noise is not None:
            out = out + c[6] * noise
        return (out, x0) if return_state else out
    if mode == "ddim":
        eps2 = (c[0] * x - x0) / c[1]
        mean = x0 * c[2] + c[3] * eps2
        return mean + c[4] * noise
    mean = c[2] * x0 + c[3] * x
    frac = (out_ft[:, C:2 * C] + 1) / 2
    logvar = frac * c[5] + (1 - frac) * c[4]
    return mean + c[6] * torch.exp(0.5 * logvar) * noise


# ----------------------------------------------------------------------------------------------
# DiT block elementwise work
# ----------------------------------------------------------------------------------------------

def adaln_modulate(h, shift, scale, *, eps: float = LN_EPS, backend: str = "auto") -> torch.Tensor:
    """LayerNorm(h) (no affine) * (1 + scale) + shift, per sample. h (N, T, D); shift, scale (N, D)."""
    which = resolve_backend(backend, h)
    if which == "cpp":
        return cpp_extension().adaln_modulate(h, shift, scale, float(eps))
    if which == "triton":
        return triton_kernels().adaln_modulate(h, shift, scale, eps=float(eps))
    return adaln_modulate_torch(h, shift, scale, eps=eps)


def adaln_modulate_torch(h, shift, scale, *, eps=LN_EPS):
    z = F.layer_norm(h, (h.shape[-1],), eps=eps)
    return z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_modulate(h, gate, y, shift, scale, *, eps: float = LN_EPS, backend: str = "auto"):
    """(h + gate * y, adaln_modulate(h + gate * y, shift, scale)): residual and the next sub-layer's input."""
    which = resolve_backend(backend, h)
    if which == "cpp":
        return tuple(cpp_extension().gated_residual_modulate(h, gate, y, shift, scale, float(eps)))
    if which == "triton":
        return triton_kernels().gated_residual_modulate(h, gate, y, shift, scale, eps=float(eps))
    return gated_residual_modulate_torch(h, gate, y, shift, scale, eps=eps)


def gated_residual_modulate_torch(h, gate, y, shift, scale, *, eps=LN_EPS):
    h = h + gate.unsqueeze(1) * y
    return h, adaln_modulate_torch(h, shift, scale, eps=eps)


def gelu_tanh(x, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """GELU with the tanh approximation of (x + bias); bias (D,) broadcasts over the last dim."""
    which = resolve_backend(backend, x)
    if which == "cpp":
        return cpp_extension().gelu_tanh(x, bias)
    if which == "triton":
        return triton_kernels().gelu_tanh(x, bias)
    return gelu_tanh_torch(x, bias)


def gelu_tanh_torch(x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")
