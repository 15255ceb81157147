"""The code passes the linters under the project's settings: ruff's check of the Python
(pyproject.toml: pycodestyle and pyflakes at 120 columns, strict zips in the package, strings
joined across lines in parentheses, an ``except Exception`` only with its reason in a noqa, no
noqa or ``fmt: skip`` that does nothing), ruff's formatter (the Python laid out as ``ruff format``
would, but where a ``# fmt: skip`` keeps a hand layout) and clang-format on csrc/
(.clang-format). Each is skipped where its pip package is not installed (requirements.txt
installs both)."""

import importlib.util
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


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_the_python_is_ruff_formatted():
    run = _run([sys.executable, "-m", "ruff", "format", "--no-cache", "--check", "--diff", "."])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


@pytest.mark.skipif(importlib.util.find_spec("clang_format") is None, reason="clang-format is not installed")
def test_csrc_is_clang_formatted():
    """With the pip wheel's binary, the version requirements.txt pins: another clang-format (one on
    the PATH) may lay the same code out otherwise."""
    import clang_format

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".cuh"))
    assert sources
    run = _run([clang_format.get_executable("clang-format"), "--dry-run", "--Werror", *sources])
    assert run.returncode == 0, run.stderr[-3000:]
