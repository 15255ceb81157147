#!/usr/bin/env bash
# The main job of the README: sets up .venv, then trains the small GPT with every optimizer.
# Extra arguments go to `python -m adapprox_kernels.train` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m adapprox_kernels.train "$@"
