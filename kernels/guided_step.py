"""guided_step: DoG guidance combination + one sampler update, one pass over memory.

Reads x, the fine-tuned output (eps, and the variance values in ddpm mode), the first k eps
channels of the pre-trained output and the noise; writes x_prev. Op for op the same float32
arithmetic as ops.guided_step_torch (DiT's p_mean_variance + p_sample / ddim_sample), so the
result is bit-equal to PyTorch's op-by-op kernels:
- launched with enable_fp_fusion=False: no FMA contraction (also passes --fmad=false to ptxas);
- exp is libdevice __nv_expf (what torch's CUDA exp calls), without flush-to-zero, as torch;
- u + s*(c - u), A*x - B*eps, C1*x0 + C2*x, (m*std)*z: the reference's order, no rewrites;
- the one true division (ddim) is tl.div_rn: Triton's `/` on fp32 is not correctly rounded.
Modes linear / flow_euler / flow_heun (dgfast.samplers' DPM-Solver++, diffusers DDIM/DDPM, Euler,
Heun) follow ops.guided_step_torch the same way; they may read a previous step's state (prev),
write this step's (state: x0 for linear, the guided d for flow_euler) and skip the noise.
The step's coefficients are read from a float32 device tensor, not passed as kernel arguments:
one compiled graph (torch.compile, a CUDA graph) then serves every step, each reading its own row.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from dgfast.ops import DIT_MODES, PREV_MODES, SAMPLER_MODES, STATE_MODES  # the modes, defined once

from .exp import exp as _exp  # libdevice expf on the GPU, tl.exp under the interpreter

MODES = {mode: i for i, mode in enumerate(SAMPLER_MODES)}  # the kernel's MODE: ddpm 0, ddim 1, linear 2, ...
NUM_SLOTS = 7                   # per-step float32 scalars c0..c6 the kernel reads (flow modes use c0)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _guided_step_kernel(x_ptr, ft_ptr, pre_ptr, z_ptr, out_ptr, prev_ptr, state_ptr,
                        C, HW, k,
                        sx_n, sx_c, sft_n, sft_c, spre_n, spre_c, sz_n, sz_c, so_n, so_c,
                        sp_n, sp_c, ss_n, ss_c,
                        coef_ptr, scale,
                        MODE: tl.constexpr, HAS_PRE: tl.constexpr, CLIP: tl.constexpr,
                        HAS_NOISE: tl.constexpr, HAS_PREV: tl.constexpr, WRITE_STATE: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Program (row, block): one block of one contiguous (H, W) plane of sample n, channel c.
    row = tl.program_id(0)
    n = (row // C).to(tl.int64)
    c = row % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    c0 = tl.load(coef_ptr)
    c1 = tl.load(coef_ptr + 1)
    c2 = tl.load(coef_ptr + 2)
    c3 = tl.load(coef_ptr + 3)
    c4 = tl.load(coef_ptr + 4)
    c5 = tl.load(coef_ptr + 5)
    c6 = tl.load(coef_ptr + 6)

    x = tl.load(x_ptr + n * sx_n + c * sx_c + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(ft_ptr + n * sft_n + c * sft_c + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        if c < k:  # guided channels: eps = u + s*(c - u), u the pre-trained eps
            u = tl.load(pre_ptr + n * spre_n + c * spre_c + offs, mask=mask, other=0.0).to(tl.float32)
            eps = u + scale * (eps - u)

    if MODE == 3:
        # flow_euler: x + h*d (d the guided velocity / eps). c = h. State: d.
        out = x + c0 * eps
        if WRITE_STATE:
            tl.store(state_ptr + n * ss_n + c * ss_c + offs, eps.to(state_ptr.dtype.element_ty), mask=mask)
    elif MODE == 4:
        # flow_heun second stage: x + h*(d1 + d2), d1 = prev. c = h (= dt/2).
        d1 = tl.load(prev_ptr + n * sp_n + c * sp_c + offs, mask=mask, other=0.0).to(tl.float32)
        out = x + c0 * (d1 + eps)
    else:
        x0 = c0 * x - c1 * eps                   # pred_xstart = A*x - B*eps
        if CLIP:  # clamp(-1, 1); comparisons keep NaN as torch.clamp does
            x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))
        if MODE == 2:
            # linear. c = A, B, R, P, Q, T, S:  R*x + P*x0 + Q*d + T*(x0 - prev) + S*z, in that order.
            out = c2 * x + c3 * x0
            out = out + c4 * eps
            if HAS_PREV:
                x0_prev = tl.load(prev_ptr + n * sp_n + c * sp_c + offs, mask=mask, other=0.0).to(tl.float32)
                out = out + c5 * (x0 - x0_prev)
            if HAS_NOISE:
                z = tl.load(z_ptr + n * sz_n + c * sz_c + offs, mask=mask, other=0.0).to(tl.float32)
                out = out + c6 * z
            if WRITE_STATE:
                tl.store(state_ptr + n * ss_n + c * ss_c + offs, x0.to(state_ptr.dtype.element_ty), mask=mask)
        elif MODE == 0:
            # ddpm, learned-range variance. c = A, B, C1, C2, Lmin, Lmax, mask
            z = tl.load(z_ptr + n * sz_n + c * sz_c + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(ft_ptr + n * sft_n + (c + C) * sft_c + offs, mask=mask, other=0.0).to(tl.float32)
            mean = c2 * x0 + c3 * x
            frac = (v + 1.0) * 0.5               # == (v + 1) / 2 exactly
            logvar = frac * c5 + (1.0 - frac) * c4
            out = mean + c6 * _exp(0.5 * logvar) * z
        else:
            # ddim. c = A, B, sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), mask*sigma
            z = tl.load(z_ptr + n * sz_n + c * sz_c + offs, mask=mask, other=0.0).to(tl.float32)
            eps2 = tl.div_rn(c0 * x - x0, c1)    # eps re-derived from x0, as ddim_sample
            mean = x0 * c2 + c3 * eps2
            out = mean + c4 * z

    tl.store(out_ptr + n * so_n + c * so_c + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _planes(t):
    """t itself when every (H, W) plane is one contiguous run (batch/channel strides are free),
    else a contiguous copy: the kernel walks a plane as H*W consecutive elements."""
    H, W = t.shape[-2:]
    if (W == 1 or t.stride(-1) == 1) and (H == 1 or t.stride(-2) == W):
        return t
    return t.contiguous()


def _check(name, t, n, min_c, H, W, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"guided_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"guided_step: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"guided_step: {name} is on {t.device}, x is on {device}")
    if t.dim() != 4 or t.shape[0] != n or t.shape[1] < min_c or tuple(t.shape[2:]) != (H, W):
        raise ValueError(f"guided_step: {name} must be ({n}, >={min_c}, {H}, {W}), got {tuple(t.shape)}")


def coef_slots(coefs, device):
    """The step's coefficients as the kernel reads them: NUM_SLOTS float32 values on `device`, zero
    padded. coefs: a sequence of floats or a 1-d tensor (kept on the device: no host round trip)."""
    c = coefs if isinstance(coefs, torch.Tensor) else torch.tensor([float(v) for v in coefs], dtype=torch.float32)
    if c.dim() != 1 or not 1 <= c.numel() <= NUM_SLOTS:
        raise ValueError(f"guided_step: coefs must hold 1 to {NUM_SLOTS} values, got shape {tuple(c.shape)}")
    c = c.to(device=device, dtype=torch.float32)
    return c if c.numel() == NUM_SLOTS else torch.cat([c, c.new_zeros(NUM_SLOTS - c.numel())])


def guided_step(x, out_ft, out_guide, noise, coefs, *, scale=1.0, k=0, step_mode="ddpm", clip_denoised=False,
                out=None, block=1024, prev=None, return_state=False, traceable=False):
    """x_prev (n, C, H, W) in x's dtype; float32 math. See ops.guided_step for the arguments.

    coefs: the step's row (floats, or a 1-d float32 tensor, best on x's device).
    out: optional preallocated (n, C, H, W) output of x's dtype with contiguous planes.
    prev / return_state (linear, flow_*): the previous step's state in; (x_prev, state) out.
    traceable: launch through torch.library.wrap_triton, so that torch.compile sees the kernel
    (dgfast.ops' custom op passes True; a plain call launches directly).
    """
    if step_mode not in MODES:
        raise ValueError(f"guided_step: step_mode must be one of {tuple(MODES)}, got {step_mode!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("guided_step: x must be a 4-d tensor (n, C, H, W)")
    n, C, H, W = x.shape
    _check("x", x, n, C, H, W, x.device)
    _check("out_ft", out_ft, n, 2 * C if step_mode == "ddpm" else C, H, W, x.device)
    if noise is not None or step_mode in DIT_MODES:  # the DiT modes always take a draw
        _check("noise", noise, n, C, H, W, x.device)
        if noise.shape[1] != C:
            raise ValueError(f"guided_step: noise must have {C} channels, got {noise.shape[1]}")
    if step_mode == "flow_heun" and prev is None:
        raise ValueError("guided_step: step_mode 'flow_heun' needs prev (the first stage's d)")
    if prev is not None:
        if step_mode not in PREV_MODES:
            raise ValueError(f"guided_step: step_mode {step_mode!r} takes no prev")
        _check("prev", prev, n, C, H, W, x.device)
        if prev.shape[1] != C:
            raise ValueError(f"guided_step: prev must have {C} channels, got {prev.shape[1]}")
    if return_state and step_mode not in STATE_MODES:
        raise ValueError(f"guided_step: step_mode {step_mode!r} has no state to return")
    k = int(k)
    if not 0 <= k <= C:
        raise ValueError(f"guided_step: k must be in [0, {C}], got {k}")
    if out_guide is not None:
        _check("out_guide", out_guide, n, k, H, W, x.device)
    elif k > 0:
        raise ValueError(f"guided_step: k={k} guided channels need out_guide")
    coefs = coef_slots(coefs, x.device)
    if out is None:
        out = torch.empty((n, C, H, W), dtype=x.dtype, device=x.device)
    else:
        _check("out", out, n, C, H, W, x.device)
        if out.dtype != x.dtype or out.shape[1] != C or _planes(out) is not out:
            raise ValueError("guided_step: out must match x's shape and dtype, with contiguous (H, W) planes")
    state = torch.empty((n, C, H, W), dtype=x.dtype, device=x.device) if return_state else None
    if x.numel() == 0:
        return (out, state) if return_state else out

    x, out_ft = _planes(x), _planes(out_ft)
    has_pre = out_guide is not None and k > 0
    pre = _planes(out_guide) if has_pre else x  # placeholder pointers, never read when their flag is False
    has_noise = noise is not None
    noise = _planes(noise) if has_noise else x
    prev_t = _planes(prev) if prev is not None else x
    state_t = state if state is not None else out
    HW = H * W
    block = min(block, triton.next_power_of_2(int(HW)))  # int(): a traced size is specialized (constexpr block)
    grid = (n * C, triton.cdiv(HW, block))
    kernel = wrap_triton(_guided_step_kernel) if traceable else _guided_step_kernel
    kernel[grid](
        x, out_ft, pre, noise, out, prev_t, state_t, C, HW, k,
        x.stride(0), x.stride(1), out_ft.stride(0), out_ft.stride(1), pre.stride(0), pre.stride(1),
        noise.stride(0), noise.stride(1), out.stride(0), out.stride(1),
        prev_t.stride(0), prev_t.stride(1), state_t.stride(0), state_t.stride(1),
        coefs, float(scale),
        MODE=MODES[step_mode], HAS_PRE=has_pre, CLIP=bool(clip_denoised), HAS_NOISE=has_noise,
        HAS_PREV=prev is not None, WRITE_STATE=state is not None, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False, enable_reflect_ftz=False)
    return (out, state) if return_state else out
