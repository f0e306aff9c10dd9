"""The ratio table of a pytest-benchmark JSON file written by bench/bench_sample.py.

    python bench/ratios.py .benchmarks/latest.json [--markdown]

Per group (pair, latent, steps): each row's median seconds over its rounds, the speedup of each
row over "upstream eager" and over "upstream compile" (the peer a user would pick) as the ratio of
medians, > 1 meaning faster, and the same ratios taken within each round (bench_sample times
every row once per round, rounds interleaved): their median [min-max]. On a VM whose speed
drifts between minutes the per-round figure is the steadier one; both are printed. Files from
before the rounds were interleaved (one entry per row) give the medians only.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

BASELINES = ("upstream eager", "upstream compile")


def _runs(data: dict) -> dict:
    """{group: {impl: {round: seconds}}}; an entry without a round (older files) is round 0 at
    its median."""
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        impl = extra.get("impl") or b["params"].get("impl")
        groups[b["group"]][impl][extra.get("round", 0)] = b["stats"]["median"]
    return groups


def _per_round(base: dict, row: dict) -> str:
    ratios = sorted(base[r] / row[r] for r in base.keys() & row.keys())
    if len(ratios) < 2:
        return "-"
    return f"{statistics.median(ratios):.3f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


def table(data: dict) -> list[list[str]]:
    info = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", info)
    rows = [["group", "impl", "rounds", "median s", *(f"vs {base}" for base in BASELINES),
             *(f"per round vs {base}" for base in BASELINES)]]
    for group, impls in _runs(data).items():
        meds = {impl: statistics.median(runs.values()) for impl, runs in impls.items()}
        for impl, runs in impls.items():
            ratios = [f"{meds[base] / meds[impl]:.3f}x" if base in meds else "-" for base in BASELINES]
            per_round = [_per_round(impls[base], runs) if base in impls else "-" for base in BASELINES]
            rows.append([group, impl, str(len(runs)), f"{meds[impl]:.3f}", *ratios, *per_round])
    rows.append([f"cpu: {info.get('cpu', '?')}; isa: {info.get('isa', '?')}; threads {info.get('threads', '?')}; "
                 f"torch {info.get('torch', '?')}", *([""] * (len(rows[0]) - 1))])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (for bench/RESULTS.md)")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        rows = table(json.load(f))
    if a.markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows[1:-1]:
            print("| " + " | ".join(r) + " |")
        print(f"\n{rows[-1][0]}")
    else:
        widths = [max(len(r[i]) for r in rows[:-1]) for i in range(len(rows[0]))]
        for r in rows[:-1]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print(rows[-1][0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
