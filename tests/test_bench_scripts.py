"""The GPU scripts in bench/ run on a CPU too, so they cannot rot between the sessions that have a GPU."""
import json
import os

import pytest

from dgfast.zoo import load_pair

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
                         "--dtype", dtype, "--rounds", "1", "--latency-batches", "1", "--no-compile",
                         "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_steps"] == 2 and res["dgfast_s"] > 0 and res["reference_s"] > 0
    assert res["max_rel_err_vs_reference"] < tol      # dgfast and the upstream loop agree
    assert res["mfu"] is None and res["latency"][0]["cuda_graph_s"] is None   # CUDA-only parts skipped


def test_gpu_e2e_compile_rows_on_cpu(gpu_e2e, tmp_path, monkeypatch):
    """The torch.compile rows (the upstream loop's peer, dgfast compile=True and compile='reduce-overhead'
    latency) run and reach the JSON. dynamo with its eager backend stands in for inductor (whose C++
    builds take minutes on 2 cores); torch.compile is looked up at call time by both sides."""
    import torch
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    out = tmp_path / "e2e.json"
    assert gpu_e2e.main(["--device", "cpu", "--model", "DiT-S/8", "--latent", "16", "--batch", "2", "--steps", "2",
                         "--dtype", "fp32", "--rounds", "1", "--latency-batches", "1", "--graph-compile-batches", "1",
                         "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reference_compile_s"] > 0 and res["dgfast_compile_s"] > 0 and not res["errors"]
    assert res["latency"][0]["reduce_overhead_s"] > 0
    assert {"dgfast_vs_reference", "dgfast_vs_reference_compile", "dgfast_compile_vs_reference_compile"} <= set(res)


def test_gpu_e2e_keeps_results_when_a_stage_fails(gpu_e2e, tmp_path, monkeypatch):
    """The one GPU run must not lose what it measured because a later part raised."""
    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("reference loop broke")

    monkeypatch.setattr(gpu_e2e, "ReferenceDiffusion", Broken)
    out = tmp_path / "e2e.json"
    assert gpu_e2e.main(["--device", "cpu", "--model", "DiT-S/8", "--latent", "16", "--batch", "2", "--steps", "2",
                         "--dtype", "fp32", "--rounds", "1", "--latency-batches", "1", "--no-compile",
                         "--json", str(out)]) == 1
    res = json.loads(out.read_text())
    assert "reference loop broke" in res["errors"]["reference"] and "reference timing" in res["errors"]
    assert res["dgfast_s"] > 0 and res["latency"][0]["eager_s"] > 0 and "speedup" not in res


def test_gpu_e2e_flops_match_dit_paper(gpu_e2e):
    """DiT-XL/2 at 256px: the DiT paper's 118.6 GFLOPs per forward count one multiply-add as one
    FLOP (fvcore); ours count two, so ~237 GFLOP."""
    import torch

    import dgfast
    with torch.device("meta"):  # shapes only: no 2.7 GB of weights
        m = dgfast.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    assert gpu_e2e.forward_flops(m) / 2 / 1e9 == pytest.approx(118.6, rel=0.01)


def test_gpu_summary_takes_the_e2e_rows(gpu_e2e, tmp_path):
    """gpu_summary.py's final table carries gpu_e2e.py's figures and its failures."""
    import gpu_summary
    out = tmp_path / "e2e.json"
    gpu_e2e.main(["--device", "cpu", "--model", "DiT-S/8", "--latent", "16", "--batch", "2", "--steps", "2",
                  "--dtype", "fp32", "--rounds", "1", "--latency-batches", "1", "2", "--no-compile",
                  "--json", str(out)])
    res = json.loads(out.read_text())
    res.update(mfu=0.5, achieved_tflops=400.0, bf16_matmul_peak_tflops=800.0, errors={"batch 2 cuda_graph": "boom"})
    out.write_text(json.dumps(res))
    rows = gpu_summary.e2e_rows(str(out))
    text = "\n".join(" | ".join(r) for r in rows)
    assert f"{res['speedup']:.2f}x" in text and "MFU" in text and "50.0% (400 of 800 TFLOP/s)" in text
    assert sum(r[0].startswith("batch ") for r in rows) == 2
    assert ("gpu_e2e: batch 2 cuda_graph", "FAIL", "boom") in rows
    assert gpu_summary.e2e_rows(str(tmp_path / "missing.json"))[0][1] == "SKIP"


def test_ratios_table(monkeypatch):
    """bench/ratios.py: each row's speedup over both peers, from pytest-benchmark's JSON (one entry
    per row: an older file)."""
    monkeypatch.syspath_prepend(BENCH)
    import ratios
    info = dict(cpu="Test CPU", isa="avx2 fma", threads=1, torch="x")
    data = {"benchmarks": [
        {"group": "g", "params": {"impl": impl}, "extra_info": dict(info, impl=impl), "stats": {"median": med}}
        for impl, med in (("upstream eager", 4.0), ("upstream compile", 3.0), ("dgfast", 2.0))]}
    rows = ratios.table(data)
    dg = next(r for r in rows if r[1] == "dgfast")
    assert dg[2:] == ["1", "2.000", "2.000x", "1.500x", "-", "-"]
    assert next(r for r in rows if r[1] == "upstream compile")[4:6] == ["1.333x", "1.000x"]
    assert "avx2 fma" in rows[-1][0] and "Test CPU" in rows[-1][0]


def test_ratios_per_round(monkeypatch):
    """Interleaved rounds: the median over a row's rounds, and the ratio within each round, which a
    drift between rounds does not move (here the machine is twice as slow in round 1)."""
    monkeypatch.syspath_prepend(BENCH)
    import ratios
    times = {"upstream eager": [4.0, 8.0, 4.4], "upstream compile": [3.0, 6.0, 3.3], "dgfast": [2.5, 5.0, 2.4]}
    data = {"benchmarks": [
        {"group": "g", "params": {"impl": impl, "rnd": r}, "extra_info": dict(impl=impl, round=r),
         "stats": {"median": t}} for r in range(3) for impl, ts in times.items() for t in [ts[r]]]}
    dg = next(r for r in ratios.table(data) if r[1] == "dgfast")
    assert dg[2:4] == ["3", "2.500"]
    assert dg[5] == f"{3.3 / 2.5:.3f}x"  # ratio of medians
    assert dg[7] == "1.200x [1.20-1.38]"  # per round: 3/2.5, 6/5, 3.3/2.4


@pytest.fixture
def frontier(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import frontier
    return frontier


def test_frontier_quick(frontier, tmp_path):
    """bench/frontier.py --quick end to end: every point measured and written, the table and the plot;
    --resume keeps what was measured (nothing is sampled again) and adds the new seeds."""
    pytest.importorskip("diffusers")  # the quick points include a named diffusers scheduler
    out = tmp_path / "f"
    assert frontier.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    names = [p.name for p in frontier.quick_points()]
    assert [r["point"] for r in res["records"]] == names
    assert all(r["fd"] > 0 and 0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in res["records"])
    table = (out / "frontier.md").read_text()
    assert table.count("\n| ") == len(names) + 1 and "1.0x / 1.0x" in table  # the baseline's own row
    try:
        import matplotlib  # noqa: F401
        assert (out / "frontier.png").stat().st_size > 1000
    except ImportError:
        pass
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# R\n\n{frontier.MARK_BEGIN}\nSTALE TABLE\n{frontier.MARK_END}\n\nafter\n")
    assert frontier.main(["--quick", "--out", str(out), "--resume", "--points", "ddim:4", "--seeds", "0", "1",
                          "--update-results", str(md)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["records"]) == len(names) + 1 and res["records"][-1]["point"] == "ddim:4"
    text = md.read_text()
    assert "STALE" not in text and "ddim (2 seeds)" in text and text.endswith("after\n")
    assert text.count("\n| ") == len(names) + 1  # the points kept from the first run are in the table too


def test_frontier_merge_makes_one_table_of_runs_side_by_side(frontier, tmp_path):
    """--merge: the records of per-seed folders join OUT's (nothing sampled without --points), the table
    is over all seeds; a folder made with other settings (another scale, another pair's weights) is a
    one-line error naming it."""
    shipped = frontier.pair_digest(*load_pair()[:2])

    def run_dir(name, seeds, scale=1.2, pair=shipped):
        recs = [dict(point=p, seed=s, seconds=10.0 if p == "ddpm:250" else 1.0, ft_forwards=5, pre_forwards=5,
                     fd=10.0 + s + (0.5 if p != "ddpm:250" else 0), accuracy=0.9, n=16.0)
                for p in ("ddpm:250", "ddim:25") for s in seeds]
        setup = dict(scale=scale, samples=16, zoo="shipped dgfast/zoo", pair=pair, batch=500, baseline="ddpm:250")
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(dict(setup=setup, records=recs)))
        return str(tmp_path / name)
    a, b, c = run_dir("a", [1]), run_dir("b", [2, 3]), run_dir("c", [4], scale=1.5)
    remade = run_dir("d", [5], pair="0" * 12)  # the same folder's earlier pair
    out = tmp_path / "out"
    args = ["--scale", "1.2", "--samples", "16", "--out", str(out), "--threads", "1"]
    assert frontier.main(args + ["--merge", a, b]) == 0
    res = json.loads((out / "results.json").read_text())
    table = (out / "frontier.md").read_text()
    assert "ddim (3 seeds)" in table and "ddpm (3 seeds)" in table, table
    assert sorted((r["point"], r["seed"]) for r in res["records"]) == [(p, s) for p in ("ddim:25", "ddpm:250")
                                                                        for s in (1, 2, 3)]
    with pytest.raises(SystemExit):
        frontier.main(args + ["--merge", a, c])
    with pytest.raises(ValueError, match="--merge .*c: made with other settings .*scale 1.5"):
        frontier.merge_records([], [c], dict(scale=1.2, samples=16, zoo="shipped dgfast/zoo", pair=shipped, batch=500))
    with pytest.raises(ValueError, match="--merge .*d: made with other settings .*pair '000000000000'"):
        frontier.merge_records([], [remade], dict(scale=1.2, samples=16, zoo="shipped dgfast/zoo", pair=shipped,
                                                  batch=500))


def test_frontier_points_and_forwards(frontier):
    """Point names round-trip; the forwards per sample follow the guidance controls (counted with
    stand-ins: no model runs)."""
    from dgfast.zoo import load_pair
    P = frontier.Point
    for name in ("ddpm:250", "dpmpp-2m-karras:12:0.2-1", "dpm2m:12:every3", "unipc:8:0.1-0.6:every2"):
        assert P.parse(name).name == name
    assert P.parse("dpm2m:12:0.2-1").curve == "dpm2m:0.2-1"
    for bad in ("ddpm", "nope:10", "ddpm:x", "ddim:10:0.8-0.2", "ddim:10:fast"):
        with pytest.raises(ValueError, match="--points"):
            P.parse(bad)
    pool = frontier.default_points()
    assert pool[0].name == frontier.BASELINE and frontier.RECOMMENDED in {p.name for p in pool}
    assert set(frontier.CHECK_POINTS) <= {p.name for p in pool} and frontier.RECOMMENDED in frontier.CHECK_POINTS
    with pytest.raises(SystemExit):  # --check picks its own points
        frontier.main(["--check", "--points", "ddim:4"])
    assert len({p.name for p in pool}) == len(pool)
    assert [p.name for p in frontier.select_points(["ddim:*"], pool)] == ["ddim:50", "ddim:25"]
    assert [p.name for p in frontier.select_points(["ddim:7"], pool)] == ["ddim:7"]  # not in the pool: added
    ft, pre, info = load_pair()
    want = {"ddpm:10": (10, 10), "dpm2m:12:every3": (12, 4), "dpm2m:12:0.2-1": (12, 10),
            "dpm2m:10:0.3-0.7:every2": (10, 2)}
    for name, forwards in want.items():
        assert frontier.count_forwards(P.parse(name), ft, pre, info, 1.2) == forwards, name


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import roofline
    return roofline


def test_roofline_records_every_matrix_product_of_a_forward(roofline):
    """The floor counts each linear layer, the patch embedding and each attention call of one forward, and
    a replayed call runs on operands of the recorded shapes and strides (the weights' transposed views)."""
    import torch

    from dgfast.reference import ReferenceDiT
    depth = 2
    model = ReferenceDiT(input_size=16, patch_size=8, hidden_size=384, depth=depth, num_heads=6, num_classes=10).eval()
    z, y = torch.randn(3, 4, 16, 16), torch.tensor([0, 1, 2])
    calls, funcs = roofline.floor_calls(model, z, y)
    by_op = {}
    for (name, _, _), count in calls.items():
        by_op[name] = by_op.get(name, 0) + count
    # per block adaLN, qkv, proj, fc1, fc2 (+ two timestep-MLP layers, the final adaLN and linear)
    assert by_op["aten.addmm"] == 5 * depth + 4
    assert by_op["aten.convolution"] == 1
    assert sum(c for k, c in by_op.items() if "scaled_dot_product" in k) == depth
    qkv = next(k for k in calls if k[0] == "aten.addmm" and k[1][1][1] == (3 * 4, 384))
    assert qkv[1][2][2] == (1, 384)  # weight.t(): the replay keeps the transposed strides
    assert roofline.time_call(funcs[qkv], qkv[1], dict(qkv[2]), min_s=0.001, repeats=1) > 0
