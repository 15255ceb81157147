#!/usr/bin/env bash
# Creates .venv with requirements.txt and installs this package into it, editable.
# Used by both set-up commands of the README; safe to run again: it installs again only when the
# files, the interpreter or the build settings below change, and remakes a venv that does not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2}
stamp=.venv/.requirements.sha
# A venv whose python does not run (bin/ deleted, its base interpreter removed or moved) is made
# again from scratch: --clear also drops the stamp, so everything is installed into it again.
if ! .venv/bin/python -c '' 2>/dev/null; then
  "$PY" -m venv --clear .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# The settings setup.py reads take part: ADAPPROX_SKIP_CUDA_BUILD=1 once, then a plain run, must
# build the extension.
want=$({
  sha256sum requirements.txt setup.py pyproject.toml $(find csrc -type f 2>/dev/null | sort)
  .venv/bin/python -VV
  for var in ADAPPROX_SKIP_CUDA_BUILD ADAPPROX_FORCE_BUILD ADAPPROX_CUDA_ARCHS TORCH_CUDA_ARCH_LIST CUDA_HOME; do
    echo "$var=${!var:-}"
  done
} | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt
  # --no-build-isolation: build against the torch just installed (the extension must match it).
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
