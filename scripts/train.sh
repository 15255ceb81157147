#!/usr/bin/env bash
# The main job of the README: sets up .venv, then trains the small GPT with every optimizer.
# Extra arguments go to `python -m adapprox_kernels.train` (see --help); relative paths in them
# (--data, --out) are taken from the folder it is run from, as the user typed them.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
(cd "$repo" && bash scripts/setup_env.sh)
exec "$repo/.venv/bin/python" -m adapprox_kernels.train "$@"
