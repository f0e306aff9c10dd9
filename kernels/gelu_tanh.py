"""gelu_tanh: GELU with the tanh approximation of (x + bias), bias (D,) over the last dim.

F.gelu(approximate="tanh") is 0.5*x*(1 + tanh(a)), a = sqrt(2/pi)*(x + 0.044715*x^3). We use the
identity 0.5*(1 + tanh(a)) = 1 / (1 + exp(-2a)): no cancellation where tanh(a) -> -1, so the
result is within ~1e-6 relative of the exact function everywhere (torch's own formula loses
digits in the negative tail; the two agree to 1e-6 relative / 1e-6 absolute). exp is libdevice
__nv_expf on the GPU: tl.exp's fast ex2 path is off by up to ~5e-6 relative for large |2a|.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .exp import exp as _exp  # libdevice expf on the GPU, tl.exp under the interpreter


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gelu_tanh_kernel(x_ptr, b_ptr, out_ptr, D,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row, block): a block of one row of the (rows, D) view, so the bias index is the column.
    base = tl.program_id(0).to(tl.int64) * D
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    a = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    y = tl.div_rn(x, 1.0 + _exp(-2.0 * a))
    tl.store(out_ptr + base + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def gelu_tanh(x, bias=None, out=None, block=1024, traceable=False):
    """gelu_tanh(x + bias) in x's dtype (float32 math). bias: (D,) with D = x.shape[-1], or None.

    traceable: launch through torch.library.wrap_triton (see guided_step).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gelu_tanh: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"gelu_tanh: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("gelu_tanh: x must have at least one dimension")
    D = x.shape[-1]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"gelu_tanh: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"gelu_tanh: bias is on {bias.device}, x is on {x.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"gelu_tanh: bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (D,):
            raise ValueError(f"gelu_tanh: bias must be ({D},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
          or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"gelu_tanh: out must be a contiguous tensor like x {tuple(x.shape)} {x.dtype}")
    if x.numel() == 0:
        return out
    x = x.contiguous()  # flat indexing; activations from a GEMM are contiguous already
    block = min(block, triton.next_power_of_2(int(D)))  # int(): a traced size is specialized (constexpr block)
    kernel = wrap_triton(_gelu_tanh_kernel) if traceable else _gelu_tanh_kernel
    kernel[(x.numel() // D, triton.cdiv(D, block))](
        x, bias if bias is not None else x, out, D,
        HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False, enable_reflect_ftz=False)
    return out
