"""GEMM strategy chosen by measurement (dgfast.gemm_choice, PairedDiT with gemm="auto"): the fastest
candidate wins, a pair measured slower than two-pass runs two-pass, the measurement runs exactly the
GEMMs it budgets (bounded for DiT-XL/2 shapes), the choice is cached in memory and on disk.

Timings are never asserted: a fake timer (monkeypatching gemm_choice.time_call) returns chosen times."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dgfast
from dgfast import gemm_choice, pair_layers
from dgfast.gemm_choice import MAX_REPS, REPS, STRATEGIES, TWO_PASS, WARMUP, estimate_seconds
from dgfast.models import DiT
from dgfast.pair_layers import PairLinear
from dgfast.paired import PairedDiT, pair

from test_paired import finetune_of, inputs, rand_dit, rel, share_with

TOL = 1e-5
CFG_DEPTH = 3  # test_paired.CFG's depth


class FakeTimer:
    """gemm_choice.time_call's and warm_up's stand-in: runs nothing unless run=True (then each
    candidate as often as the real ones would), returns times[strategy] (or times[(role, strategy)],
    times[(role, input form, strategy)]); labels: one per candidate measured (at its warm-up)."""

    def __init__(self, times, run=False):
        self.times, self.run, self.labels = times, run, []

    def warm(self, fn, device, label=()):
        self.labels.append(label)
        if self.run:
            for _ in range(WARMUP):
                fn()

    def __call__(self, fn, device, label=()):
        key, strategy = label
        if self.run:
            fn()
        form = key[5] if len(key) > 5 else None  # the input form the entry was timed in
        return self.times.get((key[0], form, strategy),
                              self.times.get((key[0], strategy), self.times.get(strategy, 1.0)))


@pytest.fixture
def fake_timer(monkeypatch):
    """Install a FakeTimer; no disk cache; an empty memory cache."""
    monkeypatch.setenv("DGFAST_GEMM_CACHE", "0")
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})

    def install(times, run=False):
        timer = FakeTimer(times, run)
        monkeypatch.setattr(gemm_choice, "time_call", timer)
        monkeypatch.setattr(gemm_choice, "warm_up", timer.warm)
        return timer
    return install


@pytest.fixture(scope="module")
def pre():
    return rand_dit()


def separate_forwards(ft, pre, x, t, y, null=1000):
    with torch.no_grad():
        return ft(x, t, y), pre(x, t, torch.full_like(y, null))


def assert_matches_two_forwards(p, ft, pre):
    x, t, y = inputs()
    got = p.forward_pair(x, t, y, 1000)
    for g, w in zip(got, separate_forwards(ft, pre, x, t, y)):
        assert rel(g, w) <= TOL, rel(g, w)


def test_fastest_candidate_is_chosen(pre, fake_timer):
    ft = finetune_of(pre)
    fake_timer({("qkv", "bmm"): 1e-3, ("qkv", "onednn"): 3e-3, ("qkv", "mm"): 2e-3,
                ("fc1", "bmm"): 3e-3, ("fc1", "onednn"): 1e-3, ("fc1", "mm"): 2e-3,
                "bmm": 2e-3, "onednn": 3e-3, "mm": 1e-3, TWO_PASS: 1e-2})
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)
    plan = p._plans[3]
    assert not plan.two_pass
    want = {"qkv": "bmm", "fc1": "onednn", "ada": "mm", "proj": "mm", "fc2": "mm", "final_ada": "mm", "final": "mm"}
    assert {key[0]: s for key, s in plan.strategies.items()} == want
    # fc2 reads fc1's per-half oneDNN outputs as halves: its measurement used that input form
    assert [pk.entry.key[5] for pk in plan.picks if pk.entry.key[0] == "fc2"] == ["halves"]
    text = p.report()
    assert "GEMM strategy for batch 3" in text and "runs paired" in text
    assert "qkv       stacked 48->144 x3" in text
    # copies only for what was chosen: stacked qkv copies, prepacked fc1 weights, nothing else
    qkv = p.blocks[0]["qkv"]
    assert qkv.w2t is not None and qkv.packed is None
    assert p.blocks[0]["fc1"].packed is not None and p.blocks[0]["fc1"].w2t is None
    assert all(b["fc2"].w2t is None and b["fc2"].packed is None for b in p.blocks)


def test_fc1_choice_is_priced_with_what_it_costs_fc2(pre, fake_timer):
    """fc1's oneDNN GEMMs are the fastest alone but leave halves, which fc2 then reads at a cost
    (its "bmm" stacks them first); fc1's fastest one-tensor strategy plus fc2 on one tensor is
    cheaper in total, so the pair runs that, and says so."""
    ft = finetune_of(pre)
    fake_timer({("fc1", "onednn"): 1e-3, ("fc1", "bmm"): 1.2e-3, ("fc1", "mm"): 1.5e-3,
                ("fc2", "halves", "bmm"): 5e-3, ("fc2", "halves", "onednn"): 4e-3, ("fc2", "halves", "mm"): 4e-3,
                ("fc2", "full", "bmm"): 1e-3, ("fc2", "full", "onednn"): 2e-3, ("fc2", "full", "mm"): 2e-3,
                "bmm": 2e-3, "onednn": 3e-3, "mm": 1e-3, TWO_PASS: 1e-2})
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)
    plan = p._plans[3]
    got = {key[0]: s for key, s in plan.strategies.items()}
    assert got["fc1"] == "bmm" and got["fc2"] == "bmm"
    assert [pk.entry.key[5] for pk in plan.picks if pk.entry.key[0] == "fc2"] == ["full"]
    fc1_line = next(line for line in p.report().splitlines() if line.strip().startswith("fc1"))
    assert "bmm" in fc1_line and "priced with the next layer" in fc1_line
    # the same timings but a cheap read of halves: fc1 keeps its oneDNN GEMMs, fc2 reads halves
    gemm_choice._MEMORY.clear()  # the same shapes: measured again, not read from memory
    ft2 = finetune_of(pre, seed=5)
    p2 = pair(ft2, pre)
    fake_timer({("fc1", "onednn"): 1e-3, ("fc1", "bmm"): 1.2e-3, ("fc1", "mm"): 1.5e-3,
                ("fc2", "halves", "mm"): 1e-3, ("fc2", "full", "bmm"): 1e-3,
                "bmm": 2e-3, "onednn": 3e-3, "mm": 1e-3, TWO_PASS: 1e-2})
    assert_matches_two_forwards(p2, ft2, pre)
    got = {key[0]: s for key, s in p2._plans[3].strategies.items()}
    assert got["fc1"] == "onednn" and got["fc2"] == "mm"


def test_adaln_bmm_choice_runs_as_one_group(pre, fake_timer):
    ft = finetune_of(pre)
    fake_timer({"bmm": 1e-3, "onednn": 3e-3, "mm": 2e-3, TWO_PASS: 1e-2})
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)
    assert p._plans[3].group is not None and len(p._plans[3].group.members) == CFG_DEPTH + 1
    assert "in one baddbmm with all stacked adaLN layers" in p.report()


def test_plans_of_two_batch_sizes_keep_their_copies(pre, fake_timer):
    """n=3 groups every adaLN layer (all "bmm"); n=2 runs the blocks' adaLN as "mm" and the final
    one alone as "bmm" (its own stacked copy, while the group keeps its concatenated one). Both
    plans keep working, whichever runs; a plan's unused copies are dropped."""
    ft = finetune_of(pre)
    timer = fake_timer({"bmm": 1e-3, "onednn": 3e-3, "mm": 2e-3, TWO_PASS: 1e-2})
    p = pair(ft, pre)
    x, t, y = inputs()
    p.forward_pair(x, t, y)
    assert p._plans[3].group is not None and p.final_ada.w2t is None
    timer.times.update({("ada", "bmm"): 5e-3, ("qkv", "onednn"): 1e-4})
    p.forward_pair(x[:2], t[:2], y[:2])
    assert p._plans[2].group is None and p.final_ada.w2t is not None
    assert p.blocks[0]["qkv"].packed is not None and p.blocks[0]["qkv"].w2t is not None  # n=3 reads bmm, n=2 onednn
    for n in (2, 3, 2):
        got = p.forward_pair(x[:n], t[:n], y[:n])
        for g, w in zip(got, separate_forwards(ft, pre, x[:n], t[:n], y[:n])):
            assert rel(g, w) <= TOL


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frozen", [False, True], ids=["full-finetune", "2-blocks-frozen"])
def test_any_mix_of_choices_matches_two_forwards(pre, fake_timer, seed, frozen):
    """Random timings, so random strategies per layer shape and batch size (groups formed and
    split, copies made and dropped): every plan, run in any order, equals two separate forwards."""
    ft = finetune_of(pre)
    if frozen:
        share_with(ft, pre, ["x_embedder", "t_embedder", "pos_embed", "blocks.0.", "blocks.1."])
    g = torch.Generator().manual_seed(seed)
    timer = fake_timer({})
    p = pair(ft, pre)
    x, t, y = inputs()
    for n in (3, 2, 1, 3, 1):
        if n not in p._plans:
            timer.times = {(role, s): float(torch.rand((), generator=g)) for role in
                           ("ada", "qkv", "proj", "fc1", "fc2", "final_ada", "final") for s in (*STRATEGIES, TWO_PASS)}
        got = p.forward_pair(x[:n], t[:n], y[:n])
        for a, b in zip(got, separate_forwards(ft, pre, x[:n], t[:n], y[:n])):
            assert rel(a, b) <= TOL


def test_slower_pair_falls_back_to_two_pass(pre, fake_timer, monkeypatch):
    """Every paired candidate measured slower than two-pass: the pair runs each model on its own
    rows (no paired GEMM call at all), says so, and holds no weight copies."""
    ft = finetune_of(pre)
    fake_timer({"bmm": 2e-3, "onednn": 2e-3, "mm": 2e-3, TWO_PASS: 1e-3})
    p = pair(ft, pre)
    x, t, y = inputs()
    p.forward_pair(x, t, y, 1000)  # measures
    assert p._plans[3].two_pass
    monkeypatch.setattr(PairLinear, "__call__", lambda *a, **k: pytest.fail("a paired GEMM ran"))
    assert_matches_two_forwards(p, ft, pre)
    assert p.memory()["extra"] == 0
    text = p.report()
    assert "runs as two separate passes" in text and "two-pass: each model's GEMM on its own rows" in text


def test_noise_does_not_flip_the_pair(pre, fake_timer):
    """Within TOLERANCE of two-pass the pair keeps running paired (its other savings stay)."""
    ft = finetune_of(pre)
    fake_timer({"bmm": 1.01e-3, "onednn": 1.01e-3, "mm": 1.01e-3, TWO_PASS: 1e-3})
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)
    assert not p._plans[3].two_pass


def test_lora_pair_measures_the_shared_base(pre, fake_timer):
    peft = pytest.importorskip("peft")
    ft = DiT(input_size=8, patch_size=2, hidden_size=48, depth=3, num_heads=3, num_classes=10).eval()
    share_with(ft, pre, [k for k in pre.state_dict() if not k.startswith("y_embedder")])
    ft = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["qkv", "fc1"]), ft).eval()
    with torch.no_grad():
        for name, prm in ft.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.2)
    timer = fake_timer({"onednn": 1e-3, "mm": 2e-3, TWO_PASS: 3e-3}, run=True)
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)
    kinds = {key[:2] for key in p._plans[3].strategies}
    assert kinds == {(role, "shared") for role in ("ada", "qkv", "proj", "fc1", "fc2", "final_ada", "final")}
    assert {s for _, s in timer.labels} == {"mm", "onednn", TWO_PASS}  # shared layers: no stacked strategies
    assert set(p._plans[3].strategies.values()) == {"onednn"}


def test_gemm_forced_measures_nothing(pre, fake_timer):
    timer = fake_timer({})
    ft = finetune_of(pre)
    for gemm in STRATEGIES:
        assert_matches_two_forwards(pair(ft, pre, gemm=gemm), ft, pre)
    assert timer.labels == []


def test_each_batch_size_gets_its_plan(pre, fake_timer):
    timer = fake_timer({"mm": 1e-3, TWO_PASS: 2e-3})
    p = pair(finetune_of(pre), pre)
    x, t, y = inputs()
    p.forward_pair(x, t, y)
    calls = len(timer.labels)
    p.forward_pair(x, t, y)
    assert len(timer.labels) == calls  # the same n: the plan is reused
    p.forward_pair(x[:2], t[:2], y[:2])
    assert sorted(p.choices()) == [2, 3] and len(timer.labels) == 2 * calls  # other rows: measured
    assert "GEMM strategy for batch 2" in p.report()


class CountGemms(TorchDispatchMode):
    """FLOPs of every GEMM dispatched: 2 x output elements x reduction length."""
    FIRST = {"mm": 0, "addmm": 1, "bmm": 0, "baddbmm": 1, "linear": 0, "_linear_pointwise": 0}

    def __init__(self):
        super().__init__()
        self.flops, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.FIRST:
            self.calls += 1
            self.flops += 2 * out.numel() * args[self.FIRST[name]].shape[-1]
        return out


@pytest.mark.parametrize("n,cut", [(1, False), (3, False), (3, True)], ids=["n1", "n3", "n3-cut"])
def test_measurement_runs_the_gemms_it_budgets(pre, fake_timer, monkeypatch, n, cut):
    """The budget (estimate_seconds over measurement_entries) counts exactly the GEMM FLOPs the
    measurement then executes: every candidate and two-pass, WARMUP + REPS calls each, on the
    rows and output columns it was cut to (cut: no budget at all, so the fewest rows and columns).
    (The extra reps a fast machine may add within the estimate are tested on their own.)"""
    monkeypatch.setattr(gemm_choice, "MAX_REPS", REPS)
    if cut:
        monkeypatch.setattr(gemm_choice, "BUDGET_S", 0.0)
        pre = rand_dit(hidden_size=96)  # fc1: 384 outputs, timed on 256 (COL_STEPS[-1])
        ft = rand_dit(hidden_size=96, seed=4)
    else:
        ft = finetune_of(pre)
    fake_timer({"mm": 1e-3, TWO_PASS: 2e-3}, run=True)
    p = pair(ft, pre)
    entries = p.measurement_entries(n)
    if cut:
        assert [e.out_features for e in entries if e.key[0] == "fc1"] == [256]
        assert all(e.rows == min(16, e.rows) for e in entries)
    budget = sum(e.calls() * e.flops_per_call() for e in entries)
    x, t, y = (v[:n] for v in inputs())
    with CountGemms() as count:
        p._plan_for(x, "auto")
    assert count.flops == budget > 0
    gemms_per_run = {"bmm": 1, "onednn": 2, "mm": 2, TWO_PASS: 2}  # every layer of this pair is stacked
    assert count.calls == sum(e.calls() // len((*e.strategies, TWO_PASS)) *
                              sum(gemms_per_run[s] for s in (*e.strategies, TWO_PASS)) for e in entries)
    if not cut:
        assert [e.rows for e in entries] == [n if e.key[0] in ("ada", "final_ada") else n * 16 for e in entries]
    else:
        assert_matches_two_forwards(p, ft, pre)  # the plan from cut timings runs the full layers


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_sliced_layer_is_the_first_columns_of_the_layer(pre, strategy):
    """The measurement times PairLinear.sliced copies: the same GEMMs on the first outputs."""
    peft = pytest.importorskip("peft")
    ft = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), finetune_of(pre)).eval()
    with torch.no_grad():
        for name, prm in ft.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.2)
    full = PairLinear("blocks.1.mlp.fc1", "fc1", ft.blocks[1].mlp.fc1, pre.blocks[1].mlp.fc1)
    assert full.kind == "stacked+lora"
    part = full.sliced(100)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        full.prepare(strategy)
        part.prepare(strategy)
        want = full(x, strategy=strategy, gelu=True)[..., :100]
        got = part(x, strategy=strategy, gelu=True)
    assert full.sliced(500).out_features == 192
    if strategy != "mm":  # its own copies, of the first columns only
        assert (part.w2t if strategy == "bmm" else part.packed[0]) is not (full.w2t if strategy == "bmm" else
                                                                            full.packed[0])
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_measurement_is_bounded_for_dit_xl(monkeypatch):
    """DiT-XL/2 shapes (a full fine-tune, every candidate of a CPU with oneDNN): the measurement's
    estimate on the reference CPU (35 GFLOP/s, 10 GB/s) stays <= 2 s at any batch size; the rows
    timed are a subset of the batch's rows. Shapes only: meta models."""
    monkeypatch.setattr(pair_layers, "_same", lambda a, b: False)        # meta tensors: every layer differs
    monkeypatch.setattr(pair_layers, "onednn_available", lambda t: True)  # the CPU candidate set
    with torch.device("meta"):
        ft, pre = (dgfast.models.build_model("DiT-XL/2", num_classes=1000) for _ in range(2))
    p = PairedDiT(ft, pre)
    for n in (1, 4, 64):
        entries = p.measurement_entries(n)
        assert {e.key[0] for e in entries} == {"ada", "qkv", "proj", "fc1", "fc2", "final_ada", "final"}
        assert all(len(e.strategies) == 3 for e in entries)
        assert estimate_seconds(entries, "cpu") <= 2.0
        # token layers: at least one image's rows (few rows would favour prepacked weights), a subset at
        # large n, on part of the output columns; adaLN layers: all their columns, few rows
        token = [e for e in entries if e.sliceable]
        assert all(256 <= e.rows <= 256 * n for e in token) and all(e.scale >= 1 for e in entries)
        assert all(e.out_features == e.key[3] and e.rows <= n for e in entries if not e.sliceable)
    assert max(e.rows for e in p.measurement_entries(64)) < 256 * 64


def test_choice_is_cached_in_memory_and_on_disk(pre, fake_timer, monkeypatch, tmp_path):
    timer = fake_timer({"mm": 1e-3, TWO_PASS: 2e-3})
    path = tmp_path / "gemm.json"
    monkeypatch.setenv("DGFAST_GEMM_CACHE", str(path))
    ft = finetune_of(pre)
    x, t, y = inputs()
    p1 = pair(ft, pre)
    p1.forward_pair(x, t, y)
    calls = len(timer.labels)
    assert calls > 0 and {pk.source for pk in p1._plans[3].picks} == {"measured"}
    data = json.loads(path.read_text())
    key = json.loads(next(iter(data["entries"])))
    assert key[0] == torch.__version__ and key[1] == gemm_choice.machine_id(torch.device("cpu"))

    pair(ft, pre).forward_pair(x, t, y)  # a second pair of the same shapes: from memory
    assert len(timer.labels) == calls
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})  # a new process: from the disk
    p3 = pair(ft, pre)
    p3.forward_pair(x, t, y)
    assert len(timer.labels) == calls and {pk.source for pk in p3._plans[3].picks} == {"disk"}
    assert p3._plans[3].strategies == p1._plans[3].strategies

    monkeypatch.setattr(gemm_choice, "_MEMORY", {})  # another machine (or torch) never reuses the file
    monkeypatch.setattr(gemm_choice, "machine_id", lambda device: "cpu:another")
    pair(ft, pre).forward_pair(x, t, y)
    assert len(timer.labels) == 2 * calls


def test_disk_cache_off_and_damaged(pre, fake_timer, monkeypatch, tmp_path):
    fake_timer({"mm": 1e-3, TWO_PASS: 2e-3})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ft = finetune_of(pre)
    x, t, y = inputs()
    pair(ft, pre).forward_pair(x, t, y)  # DGFAST_GEMM_CACHE=0 (the fixture): nothing written
    assert not (tmp_path / "dgfast").exists()
    monkeypatch.delenv("DGFAST_GEMM_CACHE")
    assert gemm_choice.cache_path() == str(tmp_path / "dgfast" / "gemm_choice.json")
    (tmp_path / "dgfast").mkdir()
    (tmp_path / "dgfast" / "gemm_choice.json").write_text("{not json")
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})
    p = pair(ft, pre)
    assert_matches_two_forwards(p, ft, pre)  # a damaged file is ignored, then rewritten
    assert json.loads((tmp_path / "dgfast" / "gemm_choice.json").read_text())["entries"]


def test_measurement_leaves_the_random_stream_alone(pre, monkeypatch):
    """The measurement draws its inputs from a private generator: a sampler's noise is the same
    whether or not the first forward measured (real timer, tiny shapes)."""
    monkeypatch.setenv("DGFAST_GEMM_CACHE", "0")
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})
    p = pair(finetune_of(pre), pre)
    x, t, y = inputs()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    p.forward_pair(x, t, y)
    assert p._plans[3].picks and torch.equal(torch.get_rng_state(), before)
    assert p._plans[3].seconds > 0 and "measured in" in p.report()


def test_real_timer_warms_up_then_times_round_robin(monkeypatch):
    """Every candidate warmed up, then REPS rounds timing each candidate once in turn (a machine
    drifting mid-measurement slows a round's candidates alike); the fastest rep is kept."""
    clock = iter([0.0, 3.0, 10.0, 12.0, 20.0, 21.0, 30.0, 30.5])  # a: 3 s then 1 s; b: 2 s then 0.5 s
    monkeypatch.setattr(gemm_choice.time, "perf_counter", lambda: next(clock))
    order = []
    runs = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    assert gemm_choice.time_candidates(runs, torch.device("cpu"), ("key",)) == {"a": 1.0, "b": 0.5}
    assert WARMUP == 1 and REPS == 2 and order == ["a", "b", "a", "b", "a", "b"]


def test_spare_time_buys_more_reps_within_the_allowance(monkeypatch):
    """A machine faster than the reference takes more timed rounds (up to MAX_REPS) while the
    warm-up plus the rounds so far plus one more stay within the entry's allowance; none beyond it."""
    calls = []

    def fake_time(run, device, label=()):
        calls.append(label[1])
        return 0.5  # a round of two candidates: 1 s
    monkeypatch.setattr(gemm_choice, "time_call", fake_time)
    monkeypatch.setattr(gemm_choice, "warm_up", lambda run, device, label=(): None)
    runs = {"a": lambda: None, "b": lambda: None}
    for allowance, rounds in ((0.0, REPS), (4.0, 3), (4.9, 3), (5.0, 4), (1e9, MAX_REPS)):
        calls.clear()
        gemm_choice.time_candidates(runs, torch.device("cpu"), ("key",), allowance)
        assert calls.count("a") == calls.count("b") == rounds, allowance  # WARMUP (1) + rounds within allowance


def test_cuda_timer_and_identity_dry_run(monkeypatch):
    """The CUDA branches without a GPU: events around each timed call (elapsed ms -> s), the GPU's
    name and capability as the machine identity."""
    elapsed = iter([7.0, 4.0])
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            recorded.append(self)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(elapsed)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    assert gemm_choice.time_call(lambda: calls.append(1), torch.device("cuda")) == 0.007
    assert gemm_choice.time_call(lambda: calls.append(1), torch.device("cuda")) == 0.004
    assert len(calls) == 2 and len(recorded) == 4  # one timed call each, between two events
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    assert gemm_choice.machine_id.__wrapped__(torch.device("cuda", 0)) == "cuda:Some GPU:(9, 0)"


@pytest.mark.cuda
def test_auto_pair_on_cuda_measures_with_events(pre, monkeypatch):
    monkeypatch.setenv("DGFAST_GEMM_CACHE", "0")
    monkeypatch.setattr(gemm_choice, "_MEMORY", {})
    ft_c, pre_c = finetune_of(pre).cuda(), rand_dit().cuda()
    p = pair(ft_c, pre_c)
    x, t, y = (v.cuda() for v in inputs())
    got = p.forward_pair(x, t, y, 1000)
    with torch.no_grad():
        want = ft_c(x, t, y), pre_c(x, t, torch.full_like(y, 1000))
    assert all(rel(g, w) <= 1e-4 for g, w in zip(got, want))
    assert p._plans[3].seconds > 0 and all(v > 0 for pk in p._plans[3].picks for v in pk.times.values())
