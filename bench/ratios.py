"""The ratio table of a pytest-benchmark JSON file written by bench/bench_sample.py.

    python bench/ratios.py .benchmarks/latest.json [--markdown]

Per group (pair, latent, steps): each row's median seconds, and the speedup of each row over
"upstream eager" and over "upstream compile" (the peer a user would pick), > 1 meaning faster.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASELINES = ("upstream eager", "upstream compile")


def table(data: dict) -> list[list[str]]:
    groups: dict = defaultdict(dict)
    info = {}
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl") or b["params"].get("impl")
        groups[b["group"]][impl] = b["stats"]["median"]
        info = b.get("extra_info", info)
    rows = [["group", "impl", "median s", *(f"vs {base}" for base in BASELINES)]]
    for group, meds in groups.items():
        for impl, med in meds.items():
            ratios = [f"{meds[base] / med:.3f}x" if base in meds else "-" for base in BASELINES]
            rows.append([group, impl, f"{med:.3f}", *ratios])
    rows.append([f"cpu: {info.get('cpu', '?')}; isa: {info.get('isa', '?')}; threads {info.get('threads', '?')}; "
                 f"torch {info.get('torch', '?')}", "", "", *([""] * len(BASELINES))])
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
