#!/usr/bin/env bash
# What a session with a GPU machine runs, one stage per call of the device tool (each meant to
# fit its 10 minutes), writing to $OUT (default bench/results/), from where results are committed:
#
#   bash bench/gpu_session.sh build                  # the extension for sm_90 (~35 s; kept between calls)
#   bash bench/gpu_session.sh tests                  # pytest -m gpu, log to $OUT
#   bash bench/gpu_session.sh compare DIR LABEL [SIZE]   # this tree's step against the checkout in DIR
#   bash bench/gpu_session.sh step                   # bench_step.py (GPU part), then traffic_bound.py on it
#   bash bench/gpu_session.sh tune                   # tune_blocks.py --quick: tiles, and the rank loop unrolled
#   bash bench/gpu_session.sh tune-dot               # the same with V's tiles rebuilt by a dot instead
#
# DIR for "compare": e.g. `git archive <commit> adapprox_kernels bench | tar -x -C ab_base` made
# beforehand (with ab_base in .git/info/exclude, and carried to the machine); its extension is
# copied from this tree. The machine has no network: nothing is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-bench/results}
# The machine's copy of the tree has no .git: pass ADAPPROX_COMMIT=<hash> (result files record it).
commit=${ADAPPROX_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export ADAPPROX_COMMIT=$commit

case "${1:-}" in
build)
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ADAPPROX_CUDA_ARCHS=${ADAPPROX_CUDA_ARCHS:-9.0} MAX_JOBS=16 \
        python3 setup.py build_ext --inplace > "$OUT/build_$commit.log" 2>&1
    python3 -m adapprox_kernels
    ;;
tests)
    python3 -m pytest python_tests -p no:cacheprovider -p no:warnings -m gpu -rfE 2>&1 | tee "$OUT/pytest_gpu_$commit.log" || true  # the log says
    # Not marked gpu (they run under the interpreter in CI) but new on CUDA: the Jacobi kernel and
    # the Rayleigh-Ritz runs that take it there; the host-read checks, on CUDA tensors there.
    python3 -m pytest python_tests/test_jacobi_eigh.py python_tests/test_triton_optimizer.py \
        -k "jacobi or rayleigh or host_read or never_wait" \
        -p no:cacheprovider -p no:warnings -rfE 2>&1 | tee -a "$OUT/pytest_gpu_$commit.log"
    ;;
compare)
    base=${2:?compare needs the baseline checkout}
    label=${3:?compare needs the baseline label}
    cp adapprox_kernels/_C*.so "$base/adapprox_kernels/"
    python3 bench/compare_step.py --baseline "$base" --baseline-label "$label" --size "${4:-gpt2-124M}" \
        --rounds 4 --out "$OUT"
    ;;
step)
    python3 bench/bench_step.py --skip-cpu --out "$OUT"
    latest=$(ls -t "$OUT"/bench_step_*.json | head -1)
    python3 bench/traffic_bound.py --results "$latest" --out "$OUT"
    ;;
tune)
    python3 bench/tune_blocks.py --quick --default-precision-only --rebuild loop unroll --out "$OUT"
    ;;
tune-dot)
    python3 bench/tune_blocks.py --quick --default-precision-only --rebuild loop dot --out "$OUT"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
