"""The GPU scripts in bench/ run on a CPU too, so they cannot rot between the sessions that have a GPU."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def gpu_e2e(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import gpu_e2e
    return gpu_e2e


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_gpu_e2e_smoke_on_cpu(gpu_e2e, tmp_path, dtype, tol):
    out = tmp_path / "e2e.json"
    assert gpu_e2e.main(["--device", "cpu", "--model", "DiT-S/8", "--latent", "16", "--batch", "2", "--steps", "2",
                         "--dtype", dtype, "--rounds", "1", "--latency-batches", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_steps"] == 2 and res["dgfast_s"] > 0 and res["reference_s"] > 0
    assert res["max_rel_err_vs_reference"] < tol      # dgfast and the upstream loop agree
    assert res["mfu"] is None and res["latency"][0]["cuda_graph_s"] is None   # CUDA-only parts skipped


def test_gpu_e2e_flops_match_dit_paper(gpu_e2e):
    """DiT-XL/2 at 256px: the DiT paper's 118.6 GFLOPs per forward count one multiply-add as one
    FLOP (fvcore); ours count two, so ~237 GFLOP."""
    import torch

    import dgfast
    with torch.device("meta"):  # shapes only: no 2.7 GB of weights
        m = dgfast.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    assert gpu_e2e.forward_flops(m) / 2 / 1e9 == pytest.approx(118.6, rel=0.01)
