"""Triton kernels for dgfast's fused ops (installed as dgfast.kernels).

One module per op, each holding its @triton.jit kernel and launcher. dgfast.ops dispatches here
for CUDA tensors; the plain-torch twins there are the reference. On a machine without a GPU the
kernels run only under TRITON_INTERPRET=1, which must be set before this package is imported.
"""
from .adaln_modulate import adaln_modulate
from .gated_residual_modulate import gated_residual_modulate
from .gelu_tanh import gelu_tanh
from .guided_step import MODES, guided_step

GUIDED_STEP_MODES = tuple(MODES)  # ops.guided_step uses the torch twin for modes not listed here

__all__ = ["guided_step", "adaln_modulate", "gated_residual_modulate", "gelu_tanh", "GUIDED_STEP_MODES"]
