"""Which GEMM strategy a pair's layers use, chosen by timing the candidates on this machine.

A paired layer whose two weights differ can run as one baddbmm over a stacked copy ("bmm"), as
two oneDNN GEMMs with the bias and GELU fused into the epilogue on prepacked copies ("onednn",
float32 CPU), or as two addmm writing the halves of one buffer ("mm", no copy); a layer whose
weights are equal runs one GEMM over both halves ("mm": F.linear, or "onednn"). Which is fastest
depends on the machine (oneDNN's fp32 GEMM beats MKL's on some x86 CPUs and loses on others;
launches dominate small GEMMs on a GPU), so no constant tuned on one machine decides it: the pair
times each candidate once per distinct layer shape and keeps the fastest (dgfast.paired).

Every measurement also times the two-pass path (each model's own F.linear on its n rows, what two
separate dgfast DiT forwards run): a pair whose chosen GEMMs are slower in total than two-pass
runs two-pass instead (TOLERANCE is the timing noise allowed before that happens).

Bounded cost: each entry is timed on `rows` of its rows per half (a subset of M when M is large),
WARMUP + REPS calls per candidate (more, up to MAX_REPS, where the machine is faster than the
reference and the entry's estimate leaves room), and the rows are chosen so that the whole
measurement is estimated at <= BUDGET_S on a reference machine of each device type (REFERENCE_SPEED: CPU 35 GFLOP/s
and 10 GB/s, the slowest CPU this project measured on). `estimate_seconds` is that estimate; tests
check it for DiT-XL/2 shapes and that the measurement runs exactly the GEMMs it counts (at REPS;
the extra reps only where measured time leaves room).

Caching: results are kept in memory per (device, dtype, threads, layer shape, measured rows) and
on disk in a JSON file (DGFAST_GEMM_CACHE=0 turns the disk cache off; DGFAST_GEMM_CACHE=<path>.json
names the file; default $XDG_CACHE_HOME/dgfast/gemm_choice.json, else ~/.cache/dgfast/...).
Disk entries are keyed by torch's version and this machine's CPU (or GPU) identity too, so a
file copied to another machine is never reused there.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

STRATEGIES = ("bmm", "onednn", "mm")
TWO_PASS = "two-pass"
WARMUP, REPS = 1, 2           # per candidate: warm-up calls (oneDNN primitives, page faults), timed reps (min kept)
MAX_REPS = 6                  # timed reps while the measurement stays within its estimate (time_candidates)
BUDGET_S = 1.6                # estimated seconds of one pair's whole measurement on the reference machine
ROW_STEPS = (512, 384, 256, 192, 128, 96, 64, 48, 32, 16)      # rows per half tried, largest first
FEW_ROWS = 16                 # rows timed for layers that are not sliceable (adaLN)
COL_STEPS = (4096, 2048, 1536, 1024, 768, 512, 384, 256)        # output columns tried (sliceable layers)
TOLERANCE = 0.02              # the pair is kept unless its GEMMs are > 2% slower than two-pass: timing noise
REFERENCE_SPEED = {"cpu": (35e9, 10e9), "cuda": (20e12, 2e12)}   # (FLOP/s, weight bytes/s)
FORMAT = 3                    # disk cache format (2: candidates timed round-robin; 3: up to MAX_REPS reps)


def onednn_available(t: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear can run t's layer: float32 CPU weights, torch built with oneDNN."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# ----------------------------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One distinct layer shape of a pair: `count` layers share it, so they share one measurement.

    key: (role, kind, in, out, has bias[, input form, GELU backend]) -- what decides the candidates' speed
    besides the size timed. rows / out_features: the rows per half and output columns the timing
    runs (the layer's M and out, or a cut of them: `cut`); scale = full size / timed size.
    sliceable: token layers may be timed on their first output columns; layers with one row per
    sample (adaLN) are timed on all their columns (streaming their weights is much of their cost,
    which a cache-sized slice would hide) and at most FEW_ROWS rows (they are ~0.2% of DiT's FLOPs).
    candidates(): {strategy: run, TWO_PASS: run}, built only when a measurement is needed (the
    runs allocate inputs and weight copies).
    """
    key: tuple
    count: int
    rows: int
    in_features: int
    out_features: int
    strategies: tuple
    sliceable: bool = True
    scale: float = 1.0
    candidates: Callable[[], dict] | None = None

    def cut(self, rows: int, cols: int) -> "Entry":
        """This entry timed on at most `rows` rows per half and (if sliceable) `cols` output columns."""
        if self.sliceable:
            r, c = min(rows, self.rows), min(cols, self.out_features)
        else:
            r, c = min(rows, self.rows, FEW_ROWS), self.out_features
        return replace(self, rows=r, out_features=c, scale=self.scale * (self.rows / r) * (self.out_features / c))

    def flops_per_call(self) -> float:
        """Multiply-adds x 2 of one call of one candidate: both halves."""
        return 2.0 * 2 * self.rows * self.in_features * self.out_features

    def weight_bytes_per_call(self, itemsize: int) -> float:
        return 2.0 * self.in_features * self.out_features * itemsize

    def calls(self) -> int:
        """GEMM-running calls its measurement makes: every strategy and two-pass, warm-up + reps."""
        return (len(self.strategies) + 1) * (WARMUP + REPS)


def estimate_seconds(entries: list[Entry], device_type: str, itemsize: int = 4) -> float:
    """The whole measurement's time on the reference machine of this device type (REFERENCE_SPEED)."""
    flops, bytes_per_s = REFERENCE_SPEED.get(device_type, REFERENCE_SPEED["cpu"])
    return sum(e.calls() * (e.flops_per_call() / flops + e.weight_bytes_per_call(itemsize) / bytes_per_s)
               for e in entries)


def measured_size(entries: list[Entry], device_type: str, itemsize: int = 4) -> tuple[int, int]:
    """(rows per half, output columns) to time every entry on (each cut to its own size): the most
    rows of ROW_STEPS, then the most columns of COL_STEPS, whose whole measurement is estimated
    within BUDGET_S. Rows come first: the weight packing a prepacked GEMM saves is paid once per
    call and amortized over the rows, so few rows would favour prepacking unduly."""
    for r in ROW_STEPS:
        for c in COL_STEPS:
            if estimate_seconds([e.cut(r, c) for e in entries], device_type, itemsize) <= BUDGET_S:
                return r, c
    return ROW_STEPS[-1], COL_STEPS[-1]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def warm_up(run: Callable[[], object], device: torch.device, label: tuple = ()) -> None:
    """WARMUP untimed calls of run() (oneDNN primitives, page faults of the first outputs).

    `label` is (entry key, strategy): unused here, for fake timers in tests (monkeypatch this
    function and time_call)."""
    for _ in range(WARMUP):
        run()


def time_call(run: Callable[[], object], device: torch.device, label: tuple = ()) -> float:
    """Seconds of one timed run() (CUDA: event-timed). `label` as in warm_up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def time_candidates(runs: dict, device: torch.device, key: tuple, allowance: float = 0.0) -> dict:
    """{name: seconds per call} of every run: each warmed up, then REPS rounds that time every
    candidate once in turn, the fastest rep kept. Round-robin, not one candidate's reps after
    another's: a machine whose speed drifts between seconds (a shared VM: 10-20% measured, see
    bench/RESULTS.md) then slows all candidates of a round alike instead of whichever ran last.

    More rounds, up to MAX_REPS, while the warm-up and the rounds so far plus one more (at the
    rounds' mean cost) stay within `allowance` seconds, the entry's estimate on the reference
    machine (estimate_seconds): a machine faster than the reference spends what it saves on more
    reps, which makes its pick steadier (candidates are often within a few % of each other), and
    the measurement still ends within the budget."""
    for name, run in runs.items():
        warm_up(run, device, (key, name))
    best = dict.fromkeys(runs, math.inf)
    spent, rounds = 0.0, 0
    while rounds < REPS or (rounds < MAX_REPS and spent / rounds * (WARMUP + rounds + 1) <= allowance):
        for name, run in runs.items():
            t = time_call(run, device, (key, name))
            best[name] = min(best[name], t)
            spent += t
        rounds += 1
    return best


# ----------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------

@dataclass
class Pick:
    """One entry's timings (seconds per call, both halves) and the strategy run: the fastest, unless
    `chosen` overrides it (a choice priced together with the next layer's, dgfast.paired)."""
    entry: Entry
    times: dict            # strategy -> seconds
    two_pass: float
    source: str            # "measured", "memory" or "disk"
    chosen: str = ""

    @property
    def choice(self) -> str:
        return self.chosen or min(self.times, key=self.times.get)


@dataclass
class Plan:
    """The strategies of one batch size: {entry key: strategy}; two_pass=True runs the pair as two
    separate passes. forced: gemm= named the strategy (nothing was measured)."""
    strategies: dict
    two_pass: bool = False
    picks: list = field(default_factory=list)
    seconds: float = 0.0   # wall time spent measuring (0 when every pick came from a cache)
    forced: str = ""
    group: object = None   # the AdaLNGroup running this plan's "bmm" adaLN layers (dgfast.paired)

    def totals(self) -> tuple[float, float]:
        """(the pair's chosen GEMMs, two-pass): seconds of one forward's GEMMs, every layer's timing
        scaled from the size timed to its full size."""
        pair = sum(p.entry.count * p.entry.scale * p.times[p.choice] for p in self.picks)
        return pair, sum(p.entry.count * p.entry.scale * p.two_pass for p in self.picks)


def decide(picks: list[Pick]) -> bool:
    """Whether the pair should run two-pass: its GEMMs are slower in total, beyond the noise."""
    plan = Plan({}, picks=picks)
    pair, two = plan.totals()
    return pair > two * (1 + TOLERANCE)


_MEMORY: dict = {}


def pick(entry: Entry, device: torch.device, dtype: torch.dtype) -> Pick:
    """The entry's timings: from memory, else from the disk cache, else measured now."""
    key = cache_key(entry, device, dtype)
    if key in _MEMORY:
        times, two = _MEMORY[key]
        return Pick(entry, dict(times), two, "memory")
    stored = disk_lookup(key)
    if stored is not None:
        _MEMORY[key] = stored
        return Pick(entry, dict(stored[0]), stored[1], "disk")
    runs = entry.candidates()
    allowance = estimate_seconds([entry], device.type, dtype.itemsize)
    times = time_candidates({s: runs[s] for s in (*entry.strategies, TWO_PASS)}, device, entry.key, allowance)
    two = times.pop(TWO_PASS)
    _MEMORY[key] = (times, two)
    disk_store(key, times, two)
    return Pick(entry, times, two, "measured")


# ----------------------------------------------------------------------------------------------
# Cache keys and the disk cache
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def machine_id(device: torch.device) -> str:
    """Who measured: the GPU's name and capability, or the CPU's model, ISA level and core count."""
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(i)}:{torch.cuda.get_device_capability(i)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu:{model}:{torch.backends.cpu.get_cpu_capability()}:{os.cpu_count()}"


def cache_key(entry: Entry, device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return json.dumps([torch.__version__, machine_id(device), str(dtype), threads, list(entry.key), entry.rows,
                       entry.out_features, list(entry.strategies), WARMUP, REPS, MAX_REPS])


def cache_path() -> str | None:
    """The disk cache file, or None when DGFAST_GEMM_CACHE=0 turned it off."""
    env = os.environ.get("DGFAST_GEMM_CACHE", "")
    if env == "0":
        return None
    if env:
        return env
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dgfast", "gemm_choice.json")


def _read_disk(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):  # missing, unreadable or damaged: as if empty (it is rewritten on store)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def disk_lookup(key: str):
    path = cache_path()
    if path is None:
        return None
    got = _read_disk(path).get(key)
    try:
        times = {str(k): float(v) for k, v in got["times"].items()}
        return times, float(got["two_pass"])
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


def disk_store(key: str, times: dict, two_pass: float) -> None:
    """Add one entry to the disk cache (read-merge-replace, so concurrent writers lose at most an
    entry, never the file). A cache that cannot be written is skipped: it only saves time."""
    path = cache_path()
    if path is None:
        return
    entries = _read_disk(path)
    entries[key] = {"times": times, "two_pass": two_pass}
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "entries": entries}, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
