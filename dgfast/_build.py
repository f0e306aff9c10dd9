"""JIT build of the C++ ops (dgfast._C's twin) from the source tree, for checkouts run without
`pip install`. ops.cpp_extension() calls jit_load() only when the installed dgfast._C is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ["dgfast_ops.cpp"]
# No FMA contraction: guided_step must round exactly where torch's op-by-op kernels round.
# -fno-trapping-math changes no result; it lets GCC if-convert the clamps so those loops vectorize.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
LD_FLAGS = ["-fopenmp"]


def jit_load(verbose: bool = False):
    """Compile (once; cached by torch under TORCH_EXTENSIONS_DIR) and import the ops module."""
    sources = [CSRC / s for s in SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found ({', '.join(missing)}): this install has no "
                                f"csrc/ and no built dgfast._C; reinstall from a source checkout to get the C++ ops")
    from torch.utils.cpp_extension import load
    os.environ.setdefault("MAX_JOBS", "2")
    return load(name="dgfast_C", sources=[str(s) for s in sources], extra_cflags=CXX_FLAGS,
                extra_ldflags=LD_FLAGS, with_cuda=False, verbose=verbose)
