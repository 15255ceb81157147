#!/usr/bin/env bash
# Creates .venv (once) with requirements.txt and installs this package into it, editable.
# Used by both set-up commands of the README; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt setup.py pyproject.toml $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -r requirements.txt
  # --no-build-isolation: build against the torch just installed (the extension must match it).
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2} \
    .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
