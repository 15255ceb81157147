"""The code passes the linters under the project's settings: ruff's check of the Python
(pyproject.toml: pycodestyle and pyflakes, 120 columns: unused imports and names, undefined
names, long lines) and clang-format on csrc/ (.clang-format). Each is skipped where its tool is
not installed (requirements.txt installs both)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_the_python_passes_ruff_check():
    run = _run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


def _clang_format() -> str | None:
    """The clang-format next to this interpreter (the pip wheel's), else on the PATH."""
    here = Path(sys.executable).with_name("clang-format")
    return str(here) if here.exists() else shutil.which("clang-format")


@pytest.mark.skipif(_clang_format() is None, reason="clang-format is not installed")
def test_csrc_is_clang_formatted():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".cuh"))
    assert sources
    run = _run([_clang_format(), "--dry-run", "--Werror", *sources])
    assert run.returncode == 0, run.stderr[-3000:]
