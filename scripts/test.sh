#!/usr/bin/env bash
# The test command of the README: sets up .venv, then runs the default (fast) test selection.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One thread: on 2 cores, 2 BLAS threads made the small matmuls of the tests many times slower.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest python_tests "$@"
