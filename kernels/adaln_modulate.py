"""adaln_modulate: LayerNorm(h) (no affine) * (1 + scale) + shift, one program per (n, t) row.

h (N, T, D); shift, scale (N, D), typically chunks of the (N, 6D) adaLN projection, so their row
stride is 6D: strides are passed, nothing is copied. Statistics in float32, output in h's dtype.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _adaln_modulate_kernel(h_ptr, shift_ptr, scale_ptr, out_ptr,
                           T, D, eps,
                           sh_n, sh_t, ssh_n, ssc_n, so_n, so_t,
                           BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    n = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    h = tl.load(h_ptr + n * sh_n + t * sh_t + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=0) / D
    hc = tl.where(mask, h - mean, 0.0)  # padded lanes must not enter the variance
    var = tl.sum(hc * hc, axis=0) / D
    z = hc * tl.rsqrt(var + eps)

    shift = tl.load(shift_ptr + n * ssh_n + cols, mask=mask).to(tl.float32)
    scale = tl.load(scale_ptr + n * ssc_n + cols, mask=mask).to(tl.float32)
    y = z * (1.0 + scale) + shift
    tl.store(out_ptr + n * so_n + t * so_t + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def check_rows(op, h, rows):
    """Shared input checks for the adaLN ops: h (N, T, D); rows (name -> (N, D) tensor)."""
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"{op}: h must be a 3-d tensor (N, T, D), got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"{op}: h must be float32, float16 or bfloat16, got {h.dtype}")
    N, T, D = h.shape
    for name, t in rows.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != h.device:
            raise ValueError(f"{op}: {name} is on {t.device}, h is on {h.device}")
        if t.dtype != h.dtype:
            raise TypeError(f"{op}: {name} must have h's dtype {h.dtype}, got {t.dtype}")
        want = (N, T, D) if name == "y" else (N, D)
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must be {want}, got {tuple(t.shape)}")


def unit_last(t):
    """t when its last dim is contiguous (other strides go to the kernel), else a contiguous copy."""
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def row_out(op, h, out):
    if out is None:
        return torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if (not isinstance(out, torch.Tensor) or out.shape != h.shape or out.dtype != h.dtype
            or out.device != h.device or unit_last(out) is not out):
        raise ValueError(f"{op}: out must be a tensor like h {tuple(h.shape)} {h.dtype} with a contiguous last dim")
    return out


def num_warps_for(block_d):
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16


def adaln_modulate(h, shift, scale, eps=1e-6, out=None, traceable=False):
    """LayerNorm(h) * (1 + scale[:, None]) + shift[:, None]; h (N, T, D), shift/scale (N, D).

    traceable: launch through torch.library.wrap_triton (see guided_step).
    """
    check_rows("adaln_modulate", h, {"shift": shift, "scale": scale})
    out = row_out("adaln_modulate", h, out)
    N, T, D = h.shape
    if h.numel() == 0:
        return out
    h, shift, scale = unit_last(h), unit_last(shift), unit_last(scale)
    block_d = triton.next_power_of_2(int(D))  # int(): a traced size is specialized here (constexpr block)
    kernel = wrap_triton(_adaln_modulate_kernel) if traceable else _adaln_modulate_kernel
    kernel[(N * T,)](
        h, shift, scale, out, T, D, float(eps),
        h.stride(0), h.stride(1), shift.stride(0), scale.stride(0), out.stride(0), out.stride(1),
        BLOCK_D=block_d, num_warps=num_warps_for(block_d), enable_fp_fusion=False)
    return out
