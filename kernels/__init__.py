"""Triton kernels for dgfast's fused ops (installed as dgfast.kernels).

One module per op, each holding its @triton.jit kernel and launcher. dgfast.ops dispatches here
for CUDA tensors; the plain-torch twins there are the reference. On a machine without a GPU the
kernels run only under TRITON_INTERPRET=1, which must be set before this package is imported.
"""
import os as _os
import sys as _sys

_distribution = None
if __name__ == "kernels":
    # Imported as a top-level package because a checkout's root is on sys.path (`python -m ...` run
    # from it). The name belongs to Hugging Face's `kernels` distribution, which transformers >= 5.25
    # imports when it is installed (diffusers -> peft -> transformers): hand the import to it. Without
    # it, stay what this folder always was under that name (transformers 5.24 imports whatever
    # `kernels` it finds, only to read a version).
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved, _self = _sys.path[:], _sys.modules["kernels"]
    del _sys.modules["kernels"]
    _sys.path[:] = [p for p in _saved if _os.path.abspath(p or _os.curdir) != _root]
    try:
        import kernels as _distribution  # noqa: F401  (the import machinery returns sys.modules["kernels"])
    except ImportError:
        _sys.modules["kernels"] = _self
    finally:
        _sys.path[:] = _saved
if _distribution is None:
    from .adaln_modulate import adaln_modulate
    from .gated_residual_modulate import gated_residual_modulate
    from .gelu_tanh import gelu_tanh
    from .guided_step import MODES, guided_step

    GUIDED_STEP_MODES = tuple(MODES)  # ops.guided_step uses the torch twin for modes not listed here

    __all__ = ["guided_step", "adaln_modulate", "gated_residual_modulate", "gelu_tanh", "GUIDED_STEP_MODES"]
