"""Fused ops: each one torch custom op, torch.ops.dgfast.<op>, with implementations that must agree.

- plain torch: the *_torch twins below. The reference every other implementation is tested against.
- C++ (csrc/, OpenMP + SIMD): the CPU implementation for float32 tensors; other CPU tensors (bf16,
  fp16, fp64) run the twin. Built by setup.py or JIT-loaded with ninja; without it the twin runs.
- Triton (kernels/, installed as dgfast.kernels): the CUDA implementation, defined through
  torch.library.triton_op so that torch.compile sees the kernel. CPU tensors run it only when forced
  (backend="triton") under TRITON_INTERPRET=1: how the kernels are tested on machines without a GPU.
- a fake implementation (output shapes, dtypes, devices) for tracing.

torch.compile traces into the Triton kernel on CUDA and keeps an op as one call on CPU, so a compiled
CPU graph runs the C++ kernel. Outputs never alias inputs and are contiguous, in the first input's dtype.

backend= (every public op below):
  "auto"            torch.ops.dgfast.<op>: the dispatcher picks the implementation by device;
  "torch"           the twins, no custom op at all (the reference, for a whole forward and step alike);
  "cpp", "triton"   force that implementation, with a clear error where it cannot run.
The environment variable DGFAST_BACKEND replaces "auto" only: an explicit argument always wins.
"""
import functools
import inspect
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

BACKENDS = ("auto", "triton", "cpp", "torch")
BACKEND_ENV = "DGFAST_BACKEND"
# The step modes, defined here once: a mode's number in the compiled kernels (the Triton kernel's MODE,
# csrc's StepMode) is its index. linear/flow_*: dgfast.samplers builds their coefficient rows. A C++
# build that predates a mode runs the twin for it (backend_modes).
SAMPLER_MODES = ("ddpm", "ddim", "linear", "flow_euler", "flow_heun")
DIT_MODES = ("ddpm", "ddim")            # DiT's own steps: always read a noise draw
STATE_MODES = ("linear", "flow_euler")  # modes that can also return their per-step state
PREV_MODES = ("linear", "flow_heun")    # modes that read an earlier step's state (prev)
FLOW_MODES = ("flow_euler", "flow_heun")  # coefficient row: h alone (the other modes read 7 values)
NUM_COEFS = 7
LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Implementations available here
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
        first_line = str(err).splitlines()[0] if str(err) else ""
        warnings.warn(f"dgfast: C++ ops unavailable ({type(err).__name__}: {first_line}); using the torch path on CPU",
                      stacklevel=2)
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
    except ModuleNotFoundError as err:
        if err.name != "dgfast.kernels":
            raise
        # setup.py's package_dir maps the top-level kernels/ to dgfast.kernels; any install makes that
        # mapping (an editable one included, as `make test` does), a bare checkout on PYTHONPATH does not.
        raise ImportError("dgfast.kernels (the repo's kernels/) imports only from an installed dgfast: "
                          "run `pip install --no-build-isolation -e .` in the checkout") from err
    return kernels


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_launcher(name):
    """dgfast.kernels.<name>. On CUDA builds of torch the kernels are imported with the ops: triton_op
    reads the kernels out of each CUDA implementation's source when the op is defined, and
    torch.compile's caches key on their source. Elsewhere they load at the first call (on CPU they run
    only under TRITON_INTERPRET=1, which a test may set after dgfast is imported)."""
    try:
        kernels = triton_kernels() if torch.version.cuda else None
    except Exception:  # a broken triton install: the error comes at the first call, not at `import dgfast`
        kernels = None
    if kernels is not None:
        return getattr(kernels, name)

    def first_call(*args, **kwargs):
        if triton_kernels() is None:
            raise RuntimeError("dgfast: the Triton kernels need triton, which is not installed")
        return getattr(triton_kernels(), name)(*args, **kwargs)
    return first_call


_triton_guided_step = _triton_launcher("guided_step")
_triton_adaln_modulate = _triton_launcher("adaln_modulate")
_triton_gated_residual_modulate = _triton_launcher("gated_residual_modulate")
_triton_gelu_tanh = _triton_launcher("gelu_tanh")


def backend_modes(which: str) -> tuple:
    """Sampler modes an implementation runs (C++: what this build lists; older builds ddpm/ddim only)."""
    if which == "cpp":
        return tuple(getattr(cpp_extension(), "GUIDED_STEP_MODES", DIT_MODES))
    if which == "triton":
        return tuple(getattr(triton_kernels(), "GUIDED_STEP_MODES", DIT_MODES))
    return SAMPLER_MODES


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------

def _origin(backend: str, which: str) -> str:
    """How an error names the choice: the argument, or the environment variable that replaced "auto"."""
    return f"{BACKEND_ENV}={which}" if backend == "auto" else f"backend={which!r}"


def _chosen(backend: str, tensor: Tensor) -> str:
    """"auto" (the custom op) or the forced "cpp" / "triton" / "torch", DGFAST_BACKEND applied;
    raises when a forced implementation cannot run `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    which = backend
    if backend == "auto":
        which = os.environ.get(BACKEND_ENV) or "auto"
        if which not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {which!r}")
    if which == "triton":
        if triton_kernels() is None:
            raise RuntimeError(f"{_origin(backend, which)}: triton is not installed")
        if not tensor.is_cuda and not triton_interpreting():
            raise ValueError(f"{_origin(backend, which)} needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    elif which == "cpp":
        if tensor.device.type != "cpu":
            raise ValueError(f"{_origin(backend, which)} runs CPU tensors only, got a tensor on {tensor.device}")
        if cpp_extension() is None:
            raise RuntimeError(f"{_origin(backend, which)}: the C++ extension could not be built or loaded")
    return which


def resolve_backend(backend: str, tensor: Tensor) -> str:
    """The implementation that runs an op on `tensor`: "triton", "cpp" or "torch" (for "auto", the one
    the dispatcher picks for a float32 tensor like it). Raises a clear error for impossible choices."""
    which = _chosen(backend, tensor)
    if which != "auto":
        return which
    if tensor.is_cuda:
        return "triton" if triton_kernels() is not None else "torch"
    cpp = tensor.device.type == "cpu" and tensor.dtype == torch.float32 and cpp_extension() is not None
    return "cpp" if cpp else "torch"


def _run(name: str, which: str, args: tuple):
    """Op `name` on its schema arguments: through the dispatcher ("auto") or the forced implementation."""
    if which == "auto":
        return _OPS[name](*args)
    return _IMPLS[which][name](*args)


# ----------------------------------------------------------------------------------------------
# guided_step: guidance combination + scheduler update, one pass
# ----------------------------------------------------------------------------------------------

def _renamed_keywords(**old_to_new):
    """Keyword arguments renamed for one name per thing (`mode` is sample()'s dog/cfg; a step's is
    `step_mode`; the guiding branch is `guide`) keep their old names for one release: the old name
    warns (DeprecationWarning) and is passed on as the new one; giving both is a TypeError."""
    def wrap(fn):
        params = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs or params.index(new) < len(args):
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}= ({old} is {new}'s old name)")
                    warnings.warn(f"{fn.__name__}(): {old}= is deprecated (removed in the next release); "
                                  f"use {new}=", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return call
    return wrap


@_renamed_keywords(mode="step_mode", out_pre="out_guide")
def guided_step(x, out_ft, out_guide, noise, coefs, *, scale: float = 1.0, guidance_channels: int = 0,
                step_mode: str = "ddpm", clip_denoised: bool = False, backend: str = "auto", prev=None,
                return_state: bool = False, guidance_rescale: float = 0.0):
    """x_prev for one sampler step of the kept (fine-tuned) half.

    x:        (n, C, H, W) current sample
    out_ft:   (n, 2C, H, W) fine-tuned output: eps channels then variance values (other modes: >= C channels)
    out_guide: (n, >=k, H, W) the guiding branch's output (DoG: the pre-trained model's; CFG: the
              fine-tuned model's with its null label), or None for unguided sampling
    noise:    (n, C, H, W) standard normal draw (may be a strided view, e.g. rows of a 2n draw),
              or None for a step without a noise term
    coefs:    the step's row of per-step float32 scalars (Schedule.ddpm_coefs()/ddim_coefs(), or a
              dgfast.samplers row for the other modes): a sequence, a numpy row or a tensor. A float32
              tensor on x's device is used as it is, so one compiled graph serves every step.
    scale:    guidance scale w in  eps = u + w * (c - u)  (u = out_guide, c = out_ft)
    guidance_channels: k, guidance applies to eps channels [0, k); the rest are the fine-tuned eps.

    step_mode (d = the guided model output: eps, or a velocity for flow models):
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
              so the guided eps is formed here in torch and the fused step runs unguided on it.
    """
    _check_step_mode(step_mode, prev, return_state)
    k = guidance_channels if out_guide is not None else 0
    if guidance_rescale and k > 0:
        out_ft, out_guide, k = rescale_guided(out_ft, out_guide, scale, k, x.shape[1], guidance_rescale), None, 0
    which = _chosen(backend, x)
    if which in ("cpp", "triton") and step_mode not in backend_modes(which):
        raise ValueError(f"{_origin(backend, which)} does not implement step_mode {step_mode!r}; use backend='torch'")
    args = (x, out_ft, out_guide, noise, prev, coef_row(coefs, step_mode, x), float(scale), int(k), step_mode,
            bool(clip_denoised))
    return _run("guided_step_with_state" if return_state else "guided_step", which, args)


def _check_step_mode(step_mode, prev, return_state):
    if step_mode not in SAMPLER_MODES:
        raise ValueError(f"step_mode must be one of {SAMPLER_MODES}, got {step_mode!r}")
    if return_state and step_mode not in STATE_MODES:
        raise ValueError(f"return_state: step_mode {step_mode!r} has no state; modes with one: {STATE_MODES}")
    if step_mode == "flow_heun" and prev is None:
        raise ValueError("step_mode='flow_heun' needs prev= (the first stage's guided output)")
    if prev is not None and step_mode not in PREV_MODES:
        raise ValueError(f"prev: step_mode {step_mode!r} reads no earlier state; modes that do: {PREV_MODES}")


def coef_row(coefs, step_mode: str, x: Tensor) -> Tensor:
    """The step's coefficients as the ops take them: a 1-d float32 tensor on x's device (each value
    rounded once to float32, as DiT's _extract_into_tensor). Flow modes read h alone, the others 7."""
    c = torch.as_tensor(coefs, dtype=torch.float32, device=x.device)
    least = 1 if step_mode in FLOW_MODES else NUM_COEFS
    if c.dim() != 1 or not least <= c.shape[0] <= NUM_COEFS:
        raise ValueError(f"coefs: step_mode {step_mode!r} takes a row of {least} to {NUM_COEFS} values, got shape "
                         f"{tuple(c.shape)}")
    return c


def rescale_guided(out_ft, out_guide, scale, k, C, phi):
    """out_ft with its eps channels replaced by the guided, std-rescaled eps (variance channels kept)."""
    g = guide_eps(out_ft[:, :C], out_guide, scale, k)
    g = rescale_noise_cfg(g, out_ft[:, :C], phi)
    return g if out_ft.shape[1] == C else torch.cat([g, out_ft[:, C:]], dim=1)


def rescale_noise_cfg(guided, cond, phi):
    """Lin et al. 2024 (arXiv 2305.08891) sec. 3.4, as diffusers computes it: match each sample's std
    of the guided prediction to the conditional one, then mix phi of that with 1 - phi of the guided."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guide_eps(eps_ft, eps_guide, scale, k):
    """eps with channels [0, k) guided as u + s*(c - u) (the reference's op order), rest from eps_ft."""
    if eps_guide is None or k == 0:
        return eps_ft
    g = eps_guide[:, :k] + scale * (eps_ft[:, :k] - eps_guide[:, :k])
    return g if k == eps_ft.shape[1] else torch.cat([g, eps_ft[:, k:]], dim=1)


@_renamed_keywords(mode="step_mode", out_pre="out_guide")
def guided_step_torch(x, out_ft, out_guide, noise, coefs, *, scale=1.0, guidance_channels=0, step_mode="ddpm",
                      clip_denoised=False, prev=None, return_state=False):
    """Plain-torch twin, op for op as DiT's p_mean_variance + p_sample (or ddim_sample); the other
    modes op for op as written in guided_step's docstring (the compiled backends follow this order)."""
    c = [torch.tensor(v, dtype=torch.float32, device=x.device) for v in coefs]  # f32 scalars, as _extract
    return guided_step_math(x, out_ft, out_guide, noise, c, scale=scale, guidance_channels=guidance_channels,
                            step_mode=step_mode, clip_denoised=clip_denoised, prev=prev, return_state=return_state)


def guided_step_math(x, out_ft, out_guide, noise, c, *, scale, guidance_channels, step_mode, clip_denoised, prev,
                     return_state):
    """guided_step_torch's arithmetic with the coefficients `c` as float32 0-dim tensors: a list
    (the twin), or the rows of a (7,) device tensor, which a captured CUDA graph reads afresh on
    every replay (cuda_graph.guided_step_graphable). One body, so both stay op for op the same."""
    C = x.shape[1]
    eps = guide_eps(out_ft[:, :C], out_guide, scale, guidance_channels)
    if step_mode == "flow_euler":
        out = x + c[0] * eps
        if not return_state:
            return out
        unguided = out_guide is None or guidance_channels == 0  # then eps is a view of the model's output
        return out, (eps.clone() if unguided else eps)
    if step_mode == "flow_heun":
        return x + c[0] * (prev + eps)
    x0 = c[0] * x - c[1] * eps
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    if step_mode == "linear":
        out = c[2] * x + c[3] * x0
        out = out + c[4] * eps
        if prev is not None:
            out = out + c[5] * (x0 - prev)
        if noise is not None:
            out = out + c[6] * noise
        return (out, x0) if return_state else out
    if step_mode == "ddim":
        eps2 = (c[0] * x - x0) / c[1]
        mean = x0 * c[2] + c[3] * eps2
        return mean + c[4] * noise
    mean = c[2] * x0 + c[3] * x
    frac = (out_ft[:, C:2 * C] + 1) / 2
    logvar = frac * c[5] + (1 - frac) * c[4]
    return mean + c[6] * torch.exp(0.5 * logvar) * noise


# The step on the op's arguments (x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode,
# clip_denoised), one function per implementation. The DiT modes read a draw: a step without one
# (noise None) reads zeros.

def _dit_noise(x, noise, step_mode):
    return torch.zeros_like(x) if noise is None and step_mode in DIT_MODES else noise


def _torch_step(x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip_denoised, return_state=False):
    return guided_step_math(x, out_ft, out_guide, _dit_noise(x, noise, step_mode), coefs.to(torch.float32),
                            scale=scale, guidance_channels=k, step_mode=step_mode, clip_denoised=clip_denoised,
                            prev=prev, return_state=return_state)


def _cpp_step(x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip_denoised, return_state=False):
    ext, c, noise = cpp_extension(), coefs.tolist(), _dit_noise(x, noise, step_mode)
    if step_mode in DIT_MODES:
        return ext.guided_step(x, out_ft, out_guide, noise, c, scale, k, step_mode == "ddim", clip_denoised)
    res = ext.guided_step_modes(x, out_ft, out_guide, noise, prev, c, scale, k, SAMPLER_MODES.index(step_mode),
                                clip_denoised, return_state)
    return tuple(res) if return_state else res[0]


def _triton_step(x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip_denoised, return_state=False,
                 traceable=False):
    return _triton_guided_step(x, out_ft, out_guide, _dit_noise(x, noise, step_mode), coefs, scale=scale, k=k,
                               step_mode=step_mode, clip_denoised=clip_denoised, prev=prev,
                               return_state=return_state, traceable=traceable)


# ----------------------------------------------------------------------------------------------
# DiT block elementwise work
# ----------------------------------------------------------------------------------------------

def adaln_modulate(h, shift, scale, *, eps: float = LN_EPS, backend: str = "auto") -> Tensor:
    """LayerNorm(h) (no affine) * (1 + scale) + shift, per sample. h (N, T, D); shift, scale (N, D)."""
    return _run("adaln_modulate", _chosen(backend, h), (h, shift, scale, float(eps)))


def adaln_modulate_torch(h, shift, scale, eps=LN_EPS):
    z = F.layer_norm(h, (h.shape[-1],), eps=eps)
    return z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_modulate(h, gate, y, shift, scale, *, eps: float = LN_EPS, backend: str = "auto"):
    """(h + gate * y, adaln_modulate(h + gate * y, shift, scale)): residual and the next sub-layer's input."""
    return _run("gated_residual_modulate", _chosen(backend, h), (h, gate, y, shift, scale, float(eps)))


def gated_residual_modulate_torch(h, gate, y, shift, scale, eps=LN_EPS):
    h = h + gate.unsqueeze(1) * y
    return h, adaln_modulate_torch(h, shift, scale, eps=eps)


def gelu_tanh(x, bias=None, *, backend: str = "auto") -> Tensor:
    """GELU with the tanh approximation of (x + bias); bias (D,) broadcasts over the last dim."""
    return _run("gelu_tanh", _chosen(backend, x), (x, bias))


def gelu_tanh_(x, bias=None, *, backend: str = "auto") -> Tensor:
    """gelu_tanh written into x itself (contiguous); returns x. For a GEMM output that is dead after
    its GELU: no second multi-MB tensor, whose first touch costs page faults (bench/RESULTS.md)."""
    if not x.is_contiguous():
        raise ValueError(f"gelu_tanh_: x must be contiguous (it is written in place), got strides {x.stride()}")
    _run("gelu_tanh_", _chosen(backend, x), (x, bias))
    return x


def gelu_tanh_torch(x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def gelu_tanh_torch_(x, bias=None) -> None:
    x.copy_(gelu_tanh_torch(x, bias))


def _in_place(_written) -> None:
    """An in-place op's implementation returns nothing (its kernel returned the tensor it wrote)."""
    return None


def _cpp_gated_residual_modulate(h, gate, y, shift, scale, eps):
    return tuple(cpp_extension().gated_residual_modulate(h, gate, y, shift, scale, eps))


# ----------------------------------------------------------------------------------------------
# The custom ops: torch.ops.dgfast.<op>
# ----------------------------------------------------------------------------------------------
# Every implementation takes the op's schema arguments, in schema order.
_IMPLS = {
    "torch": {"guided_step": _torch_step, "guided_step_with_state": functools.partial(_torch_step, return_state=True),
              "adaln_modulate": adaln_modulate_torch, "gated_residual_modulate": gated_residual_modulate_torch,
              "gelu_tanh": gelu_tanh_torch, "gelu_tanh_": gelu_tanh_torch_},
    "cpp": {"guided_step": _cpp_step, "guided_step_with_state": functools.partial(_cpp_step, return_state=True),
            "adaln_modulate": lambda h, shift, scale, eps: cpp_extension().adaln_modulate(h, shift, scale, eps),
            "gated_residual_modulate": _cpp_gated_residual_modulate,
            "gelu_tanh": lambda x, bias: cpp_extension().gelu_tanh(x, bias),
            "gelu_tanh_": lambda x, bias: _in_place(cpp_extension().gelu_tanh(x, bias, x))},
    "triton": {"guided_step": _triton_step,
               "guided_step_with_state": functools.partial(_triton_step, return_state=True),
               "adaln_modulate": _triton_adaln_modulate, "gated_residual_modulate": _triton_gated_residual_modulate,
               "gelu_tanh": _triton_gelu_tanh,
               "gelu_tanh_": lambda x, bias, traceable=False: _in_place(_triton_gelu_tanh(x, bias, x,
                                                                                          traceable=traceable))},
}


def _op_output(out, like: Tensor):
    """A twin's result as the op promises it (and its fake implementation describes): like's dtype,
    contiguous. The twins never return an input."""
    if isinstance(out, tuple):
        return tuple(_op_output(o, like) for o in out)
    return None if out is None else out.to(like.dtype).contiguous()  # None: an in-place op


def _cpu_kernel(name: str, cpp_runs=lambda args: True):
    """The CPU implementation of op `name`: the C++ kernel where it runs the inputs (float32, and
    `cpp_runs`), else the twin. Both are looked up per call (tests watch which one runs)."""
    def kernel(*args):
        if (cpp_extension() is not None and cpp_runs(args)
                and all(a.dtype == torch.float32 for a in args if isinstance(a, Tensor))):
            return _IMPLS["cpp"][name](*args)
        return _op_output(_IMPLS["torch"][name](*args), args[0])
    return kernel


def _step_in_cpp(args):
    return args[8] in backend_modes("cpp")  # args[8]: step_mode


# The device implementations triton_op registers (their annotations are the schemas): the Triton
# kernel on CUDA, the twin on other devices without a kernel of their own. CPU has its own (_cpu_kernel).

def _on_device(name: str, args: tuple, triton_impl):
    if args[0].is_cuda and triton_kernels() is not None:
        return triton_impl(*args, traceable=True)
    return _op_output(_IMPLS["torch"][name](*args), args[0])


def _guided_step(x: Tensor, out_ft: Tensor, out_guide: Optional[Tensor], noise: Optional[Tensor],
                 prev: Optional[Tensor], coefs: Tensor, scale: float, k: int, step_mode: str,
                 clip_denoised: bool) -> Tensor:
    return _on_device("guided_step", (x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip_denoised),
                      _triton_step)


def _guided_step_with_state(x: Tensor, out_ft: Tensor, out_guide: Optional[Tensor], noise: Optional[Tensor],
                            prev: Optional[Tensor], coefs: Tensor, scale: float, k: int, step_mode: str,
                            clip_denoised: bool) -> tuple[Tensor, Tensor]:
    return _on_device("guided_step_with_state",
                      (x, out_ft, out_guide, noise, prev, coefs, scale, k, step_mode, clip_denoised),
                      functools.partial(_triton_step, return_state=True))


def _adaln_modulate(h: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _on_device("adaln_modulate", (h, shift, scale, eps), _triton_adaln_modulate)


def _gated_residual_modulate(h: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                             eps: float) -> tuple[Tensor, Tensor]:
    return _on_device("gated_residual_modulate", (h, gate, y, shift, scale, eps), _triton_gated_residual_modulate)


def _gelu_tanh(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _on_device("gelu_tanh", (x, bias), _triton_gelu_tanh)


def _gelu_tanh_(x: Tensor, bias: Optional[Tensor]) -> None:
    _on_device("gelu_tanh_", (x, bias), _IMPLS["triton"]["gelu_tanh_"])


def _fake(x, *args):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_pair(x, *args):
    return _fake(x), _fake(x)


def _compile_rule(impl):
    """How torch.compile's functionalization treats the op: on CUDA it traces into impl, so inductor
    sees the Triton kernel (triton_op's own rule, which would do so on every device); elsewhere the op
    stays one call, so the compiled CPU graph runs the C++ kernel (bit-equal to eager)."""
    def rule(mode, op, types, args, kwargs):
        if args[0].is_cuda:
            with mode:
                return impl(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return rule


_CPU_LIB = torch.library.Library("dgfast", "IMPL")  # keeps the CPU registrations alive


def _define(name: str, impl, fake, cpp_runs=lambda args: True, mutates=()):
    op = torch.library.triton_op(f"dgfast::{name}", impl, mutates_args=mutates)
    op.register_fake(fake)
    # In-place ops too: on the CPU the mutating op is auto-functionalized as one call and inductor
    # re-inplaces it on the buffer it mutates (the compiled paired forward's GELU on the bmm output);
    # without the rule it would be traced into its torch twin (inductor's GELU, ~3x slower on CPU).
    op.register_torch_dispatch(FunctionalTensorMode, _compile_rule(impl))
    # Registered on the dispatcher directly, not with op.register_kernel: that adds a Python wrapper
    # (and its microseconds) to every call.
    _CPU_LIB.impl(name, _cpu_kernel(name, cpp_runs), "CPU")
    return getattr(torch.ops.dgfast, name).default


_OPS = {
    "guided_step": _define("guided_step", _guided_step, _fake, _step_in_cpp),
    "guided_step_with_state": _define("guided_step_with_state", _guided_step_with_state, _fake_pair, _step_in_cpp),
    "adaln_modulate": _define("adaln_modulate", _adaln_modulate, _fake),
    "gated_residual_modulate": _define("gated_residual_modulate", _gated_residual_modulate, _fake_pair),
    "gelu_tanh": _define("gelu_tanh", _gelu_tanh, _fake),
    "gelu_tanh_": _define("gelu_tanh_", _gelu_tanh_, lambda x, bias: None, mutates=("x",)),
}
