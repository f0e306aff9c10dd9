"""gated_residual_modulate: h_new = h + gate * y, then LayerNorm(h_new) * (1 + scale) + shift.

One program per (n, t) row reads h, y and the three (N, D) modulation rows once and writes both
h_new (the residual stream) and the next sub-layer's input. gate/shift/scale are usually chunks
of the (N, 6D) adaLN projection (row stride 6D); strides are passed, nothing is copied.
"""
import triton
import triton.language as tl
from torch.library import wrap_triton

from .adaln_modulate import check_rows, num_warps_for, row_out, unit_last


@triton.jit
def _gated_residual_modulate_kernel(h_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, hout_ptr, xout_ptr,
                                    T, D, eps,
                                    sh_n, sh_t, sg_n, sy_n, sy_t, ssh_n, ssc_n,
                                    sho_n, sho_t, sxo_n, sxo_t,
                                    BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    n = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    h = tl.load(h_ptr + n * sh_n + t * sh_t + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + n * sg_n + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + n * sy_n + t * sy_t + cols, mask=mask, other=0.0).to(tl.float32)
    h = h + g * y  # mul then add (no FMA): bit-equal to torch in float32
    tl.store(hout_ptr + n * sho_n + t * sho_t + cols, h.to(hout_ptr.dtype.element_ty), mask=mask)
    # Normalise the residual as stored (rounded to its dtype), as the reference does.
    h = h.to(hout_ptr.dtype.element_ty).to(tl.float32)

    mean = tl.sum(h, axis=0) / D
    hc = tl.where(mask, h - mean, 0.0)
    var = tl.sum(hc * hc, axis=0) / D
    z = hc * tl.rsqrt(var + eps)
    shift = tl.load(shift_ptr + n * ssh_n + cols, mask=mask).to(tl.float32)
    scale = tl.load(scale_ptr + n * ssc_n + cols, mask=mask).to(tl.float32)
    x = z * (1.0 + scale) + shift
    tl.store(xout_ptr + n * sxo_n + t * sxo_t + cols, x.to(xout_ptr.dtype.element_ty), mask=mask)


def gated_residual_modulate(h, gate, y, shift, scale, eps=1e-6, out=None, traceable=False):
    """(h + gate[:, None] * y, adaln_modulate(that, shift, scale)); h, y (N, T, D); gate/shift/scale (N, D).

    out: optional pair (h_new, x_mod) of preallocated tensors like h.
    traceable: launch through torch.library.wrap_triton (see guided_step).
    """
    op = "gated_residual_modulate"
    check_rows(op, h, {"gate": gate, "y": y, "shift": shift, "scale": scale})
    h_out, x_out = (None, None) if out is None else out
    h_out, x_out = row_out(op, h, h_out), row_out(op, h, x_out)
    N, T, D = h.shape
    if h.numel() == 0:
        return h_out, x_out
    h, gate, y, shift, scale = (unit_last(t) for t in (h, gate, y, shift, scale))
    block_d = triton.next_power_of_2(int(D))  # int(): a traced size is specialized here (constexpr block)
    kernel = wrap_triton(_gated_residual_modulate_kernel) if traceable else _gated_residual_modulate_kernel
    kernel[(N * T,)](
        h, gate, y, shift, scale, h_out, x_out, T, D, float(eps),
        h.stride(0), h.stride(1), gate.stride(0), y.stride(0), y.stride(1), shift.stride(0), scale.stride(0),
        h_out.stride(0), h_out.stride(1), x_out.stride(0), x_out.stride(1),
        BLOCK_D=block_d, num_warps=num_warps_for(block_d), enable_fp_fusion=False)
    return h_out, x_out
