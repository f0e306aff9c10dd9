"""Test setup shared by the whole suite.

Without a GPU, Triton kernels run under the interpreter. TRITON_INTERPRET must be set before
any @triton.jit decorator runs, so it is set here, before anything imports dgfast.kernels.
"""
import contextlib
import os

try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite never writes the user's GEMM-choice cache (~/.cache/dgfast); tests of that cache set their own path.
os.environ.setdefault("DGFAST_GEMM_CACHE", "0")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (Triton compiled, not interpreted)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def one_thread():
    """`with one_thread():` runs torch on one thread. Tiny models gain nothing from threads, and on a
    busy machine idle OpenMP threads spin (and steal the cores subprocesses under test need)."""
    return _one_thread
