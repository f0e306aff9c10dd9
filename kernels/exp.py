"""exp for the kernels: libdevice __nv_expf on the GPU (what torch's CUDA exp calls, no
flush-to-zero), so results match torch bit for bit; tl.exp's fast ex2 path does not.
libdevice calls cannot run under TRITON_INTERPRET=1: there it is tl.exp (numpy's float32 exp).
"""
import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def exp(x):
        return tl.exp(x)
else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def exp(x):
        return libdevice.exp(x)
