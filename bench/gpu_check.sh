#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and nothing but this repo (and a python3 with torch,
# triton, pytest, pip and setuptools>=64): the CUDA-only tests with Triton compiled (not
# interpreted), the benchmarks in bench/, copy-bandwidth / bf16-matmul references, guided_step
# bandwidth and bit-equality, the end-to-end DiT-XL/2 run (bench/gpu_e2e.py: speedup, MFU,
# cuda_graph latency), and a summary table last. Runs from the repo root with PYTHONPATH=. after
# an editable install of this checkout (no dependencies, no build isolation, no C++ build): the
# only way kernels/ imports as dgfast.kernels.
#   bash bench/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
# Exit status 0 when every check passes, or when there is no GPU ("no CUDA GPU: skipped").
# With $OUT set (the device tool's output folder), everything printed is also kept in
# $OUT/gpu_check.log, with cuda_tests.xml (junit), bench.json, gpu_e2e.json and gpu_summary.json:
# a caller that sees only the tail of the output loses nothing.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled Triton: the interpreter would test numpy, not the GPU
export DGFAST_NO_JIT=1  # the C++ ops are CPU-only: don't spend GPU time compiling them

check() {  # everything, so that one pipe can keep a copy of its output
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "no CUDA GPU: skipped ($PY cannot import torch or sees no CUDA device)"
        exit 0
    fi
    if ! "$PY" -c 'import triton, pytest' 2>/dev/null; then
        echo "gpu_check: $PY needs triton and pytest" >&2
        exit 2
    fi

    # setup.py's package_dir maps the top-level kernels/ to dgfast.kernels, and only an install makes
    # that mapping. Editable: the tests run these files. Against the torch found here: no build isolation
    # and no dependencies (the machine may be offline). --use-pep517: pip's `setup.py develop` route
    # re-runs pip with build isolation. DGFAST_NO_JIT=1 (above) keeps setup.py from building the C++ ops.
    kernels_here='import os, sys, dgfast.kernels as k
sys.exit(os.path.realpath(os.path.dirname(k.__file__)) != os.path.realpath("kernels"))'
    if ! "$PY" -c "$kernels_here" 2>/dev/null; then
        echo "== pip install -e . (kernels/ as dgfast.kernels) =="
        "$PY" -m pip install -q --no-deps --no-build-isolation --use-pep517 -e .
        if ! "$PY" -c "$kernels_here"; then
            echo "gpu_check: dgfast.kernels does not import from this checkout's kernels/ after the install" >&2
            exit 2
        fi
    fi

    echo "== pytest -m cuda tests/ =="
    "$PY" -m pytest -m cuda tests/ -q -rs ${OUT:+--junitxml="$OUT/cuda_tests.xml"}
    tests_rc=$?

    # Benchmark files are named bench_*.py (pytest collects files named on the command line whatever
    # their name); without pytest-benchmark, gpu_summary.py's do_bench timings stand in for them.
    # bench_sample.py is the CPU end-to-end benchmark (gpu_e2e.py is its GPU twin) and -k "not cpu"
    # drops bench_ops' CPU rows: both are measured on CPU machines, not worth GPU time.
    bench_files=$(ls bench/bench_*.py bench/test_*.py 2>/dev/null | grep -v 'bench/bench_sample.py')
    bench_rc=0
    if [ -z "$bench_files" ]; then
        bench_mode=none
    elif "$PY" -c 'import pytest_benchmark' 2>/dev/null; then
        echo "== pytest" $bench_files "--benchmark-only =="
        # shellcheck disable=SC2086
        "$PY" -m pytest $bench_files -k "not cpu" --benchmark-only -q --benchmark-columns=min,median,rounds \
            ${OUT:+--benchmark-json="$OUT/bench.json"}
        bench_rc=$?
        bench_mode=pytest
    else
        echo "== pytest-benchmark is not installed: timing the ops with triton.testing.do_bench instead =="
        bench_mode=fallback
    fi

    # End to end first (its table scrolls up), the op summary table last.
    echo "== end to end: DiT-XL/2 256px batch 64 bf16, MFU, cuda_graph latency (bench/gpu_e2e.py) =="
    "$PY" bench/gpu_e2e.py ${OUT:+--json "$OUT/gpu_e2e.json"}
    e2e_rc=$?

    echo "== measurements =="
    "$PY" bench/gpu_summary.py --tests-rc "$tests_rc" --bench-rc "$bench_rc" --bench-mode "$bench_mode" \
        ${OUT:+--e2e-json "$OUT/gpu_e2e.json" --json "$OUT/gpu_summary.json"}
    summary_rc=$?
    [ "$e2e_rc" -eq 0 ] || echo "gpu_e2e.py failed (exit $e2e_rc)"
    exit $(( summary_rc != 0 || e2e_rc != 0 ))
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    check 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
check
