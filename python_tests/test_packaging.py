"""Packaging and set-up: what the sdist carries, when setup.py builds the extension, and when
scripts/setup_env.sh installs again. Each works on a copy of the tree in a temporary folder."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The build settings setup.py and setup_env.sh read: the tests set them, not the caller's shell.
BUILD_VARS = ("ADAPPROX_SKIP_CUDA_BUILD", "ADAPPROX_FORCE_BUILD", "ADAPPROX_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")


def copy_tree(dest: Path, *names: str) -> Path:
    """``dest`` with a copy of each of ``names`` that this tree has."""
    for name in names:
        src = ROOT / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def clean_env(**settings: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in BUILD_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **settings}


def build_sdist(tree: Path, env: dict) -> Path:
    """The PEP 517 hook that ``python -m build --sdist --no-isolation`` calls."""
    code = "import sys; from setuptools.build_meta import build_sdist; print(build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, "dist"], cwd=tree, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return tree / "dist" / run.stdout.strip().splitlines()[-1]


PACKAGE_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "csrc", "adapprox_kernels")


@pytest.mark.parametrize("skip", ["1", ""], ids=["skip-cuda-build", "default"])
def test_sdist_carries_every_csrc_file(tmp_path, skip):
    # Without the header a wheel built from the sdist fails to compile cholqr.cpp; with
    # ADAPPROX_SKIP_CUDA_BUILD=1 (or no toolkit) setup.py names no extension sources at all.
    tree = copy_tree(tmp_path, *PACKAGE_FILES)
    sdist = build_sdist(tree, clean_env(ADAPPROX_SKIP_CUDA_BUILD=skip))
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames()}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= names, sorted(csrc - names)


def fake_toolkit(folder: Path, release: str) -> Path:
    """A CUDA_HOME whose nvcc only reports ``release`` (enough for setup.py's checks)."""
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.131"\n')
    nvcc.chmod(0o755)
    return folder


def test_toolkit_of_another_major_version_gives_the_pure_package_and_says_why(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never looks at the toolkit")
    major = int(torch.version.cuda.split(".")[0])
    toolkit = fake_toolkit(tmp_path / "cuda", f"{major - 1}.4")
    tree = copy_tree(tmp_path / "src", "setup.py")
    env = clean_env(CUDA_HOME=str(toolkit))
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "building without the CUDA extension" in run.stderr and f"is {major - 1}.4" in run.stderr
    forced = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, env=dict(env, ADAPPROX_FORCE_BUILD="1"),
                            capture_output=True, text=True)  # fmt: skip
    assert forced.returncode != 0 and f"is {major - 1}.4" in forced.stderr


@pytest.mark.slow
def test_wheel_built_from_the_sdist_holds_the_extension(tmp_path):
    """What ``python -m build`` does: the sdist first, then the wheel from its unpacked copy."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None or shutil.which("nvcc", path=f"{os.environ.get('PATH')}:/usr/local/cuda/bin") is None:
        pytest.skip("needs a CUDA torch and a CUDA toolkit")
    env = clean_env(ADAPPROX_FORCE_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    sdist = build_sdist(copy_tree(tmp_path / "src", *PACKAGE_FILES), clean_env(ADAPPROX_SKIP_CUDA_BUILD="1"))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (tree,) = (tmp_path / "unpacked").iterdir()
    code = "import sys; from setuptools.build_meta import build_wheel; print(build_wheel(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wheel")], cwd=tree, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-1000:]  # the compiler's errors, then the traceback
    wheel = tmp_path / "wheel" / run.stdout.strip().splitlines()[-1]
    assert any(n.startswith("adapprox_kernels/_C.") for n in zipfile.ZipFile(wheel).namelist())


# ----------------------------------------------------------------------------- scripts/setup_env.sh
# pip is replaced by a module that only logs its arguments (the real requirements are gigabytes),
# found first on PYTHONPATH by the ".venv/bin/python -m pip" of the script.
FAKE_PIP = """import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    print(" ".join(sys.argv[1:]), "| skip=" + os.environ.get("ADAPPROX_SKIP_CUDA_BUILD", ""), file=log)
"""


@pytest.fixture
def setup_env(tmp_path):
    """``run(**settings) -> pip calls of that run`` on a copy of the script and the files it hashes."""
    hashed = ("requirements.txt", "setup.py", "pyproject.toml", "csrc")
    tree = copy_tree(tmp_path / "repo", "scripts/setup_env.sh", *hashed)
    (tmp_path / "fake" / "pip").mkdir(parents=True)
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP)
    log = tmp_path / "pip.log"

    def run(**settings: str) -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        env = clean_env(PYTHON=sys.executable, PYTHONPATH=str(tmp_path / "fake"), FAKE_PIP_LOG=str(log), **settings)
        done = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tree, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return (log.read_text().splitlines() if log.exists() else [])[len(before) :]

    run.venv = tree / ".venv"
    return run


def usable_venv(venv: Path) -> None:
    """Stands for a working venv without making one (seconds each): its python runs."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)


def editable_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if "-e ." in c]


def test_setup_env_installs_again_when_a_build_setting_changes(setup_env):
    usable_venv(setup_env.venv)
    assert editable_installs(setup_env(ADAPPROX_SKIP_CUDA_BUILD="1")) == [
        "install -q --no-build-isolation --no-deps -e . | skip=1"
    ]
    # the extension, skipped before, is built now
    assert editable_installs(setup_env()) == ["install -q --no-build-isolation --no-deps -e . | skip="]
    assert setup_env() == []  # nothing changed: nothing to do
    assert editable_installs(setup_env(ADAPPROX_CUDA_ARCHS="8.0"))


def test_setup_env_remakes_a_venv_without_bin(setup_env):
    usable_venv(setup_env.venv)
    assert setup_env()
    shutil.rmtree(setup_env.venv / "bin")  # the stamp stays behind
    calls = setup_env()
    assert any("-r requirements.txt" in c for c in calls) and editable_installs(calls)
    subprocess.run([setup_env.venv / "bin" / "python", "-c", ""], check=True)


def test_setup_env_remakes_a_venv_whose_interpreter_is_gone(setup_env, tmp_path):
    # a venv's links, to a base interpreter that was removed since
    (setup_env.venv / "bin").mkdir(parents=True)
    version = f"python3.{sys.version_info.minor}"
    (setup_env.venv / "bin" / version).symlink_to(tmp_path / "removed" / version)
    for name in ("python", "python3"):
        (setup_env.venv / "bin" / name).symlink_to(version)
    calls = setup_env()
    assert any("-r requirements.txt" in c for c in calls) and editable_installs(calls)
    subprocess.run([setup_env.venv / "bin" / "python", "-c", ""], check=True)


# ------------------------------------------------------------------------- oldest torch / triton
def _python_with(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this tree first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("version, refused", [("2.7.1+cu126", True), ("2.8.0a0+git1234", False), ("3.0.0", False)])
def test_a_torch_older_than_the_declared_minimum_is_refused_at_import(version, refused):
    """setup.py's ``torch>=2.8`` is what ``import adapprox_kernels`` enforces, with a message that
    names both versions (torch 2.6 failed in infer_schema, deep inside the import, with a
    ValueError about ``list[torch.Tensor]``)."""
    code = f"import torch; torch.__version__ = {version!r}\nimport adapprox_kernels\nprint(adapprox_kernels.__file__)"
    done = _python_with(code)
    if refused:
        assert done.returncode != 0
        assert f"adapprox_kernels needs torch >= 2.8, found torch {version}" in done.stderr, done.stderr[-2000:]
    else:
        assert done.returncode == 0, done.stderr[-2000:]
    setup_py = (ROOT / "setup.py").read_text()
    assert '"torch>=2.8"' in setup_py and '"triton>=3.4"' in setup_py


def test_a_triton_older_than_the_declared_minimum_leaves_the_backend_unavailable():
    """triton 3.3 has no ``triton.knobs``: asking for the backend raised AttributeError from
    ``kernels._launch.interpreted``. Now the backend is unavailable, with the reason."""
    pytest.importorskip("triton")
    code = (
        "import triton; triton.__version__ = '3.3.1'\n"
        "import torch\n"
        "from adapprox_kernels.backends import availability, resolve_backend\n"
        "why = availability(torch.device('cpu'))['triton']\n"
        "assert why is not None and 'triton 3.3.1 is older than 3.4' in why, why\n"
        "assert resolve_backend('auto', torch.device('cpu')).name == 'reference'\n"
    )
    done = _python_with(code, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-2000:]
