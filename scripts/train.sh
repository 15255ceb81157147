#!/usr/bin/env bash
# The main job of the README: sets up .venv, then trains the small GPT with every optimizer.
# Extra arguments go to `python -m adapprox_kernels.train` (see --help); relative paths in them
# (--data, --out) are taken from the folder it is run from, as the user typed them; so is the
# default --out, runs/main.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
(cd "$repo" && bash scripts/setup_env.sh)
# PYTHONSAFEPATH: the caller's folder is not put on sys.path (another checkout there would be
# imported instead of this one's package).
PYTHONSAFEPATH=1 exec "$repo/.venv/bin/python" -m adapprox_kernels.train "$@"
